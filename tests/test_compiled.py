"""--compile: when a run compiles (the rule, the environment, the compiler), a compiled network
giving the eager network's probabilities, and the fall-back to eager when inductor fails."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from src_models import compiled
from src_models.checkpoint import load_checkpoint
from src_models.compiled import COMPILE_MIN_PIXELS, DRIVE_PIXELS, resolve_compile, worth_compiling
from src_models.errors import R2UNetError
from src_models.inference import Segmenter
from src_models.nets import FoldedRecurrentConv, RecurrentConv, SplitBF16RecurrentConv
from src_models.precision import cpu_has_native_bf16
from src_models.synthetic import vessel_image


def _files(folder, count, size=10):
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        path.write_bytes(b"\0" * size)
        paths.append(path)
    return paths


def test_auto_compiles_long_runs_only(tmp_path, monkeypatch):
    monkeypatch.delenv("R2UNET_COMPILE", raising=False)
    monkeypatch.setattr(compiled, "compiler_available", lambda: True)
    files_needed = COMPILE_MIN_PIXELS // DRIVE_PIXELS  # files whose size no header tells count as DRIVE images
    assert not worth_compiling(_files(tmp_path, files_needed - 1))  # a cold compile is repaid after 60-150 DRIVE images
    big = _files(tmp_path, files_needed)
    assert worth_compiling(big) and resolve_compile("auto", big)
    assert not resolve_compile("auto", big[:1])
    assert not resolve_compile("auto", big, bf16=False)  # float32: onnxruntime beats the compiled network
    assert resolve_compile("on") and not resolve_compile("off", big)
    monkeypatch.setattr(compiled, "compiler_available", lambda: False)  # inductor writes C++: no compiler, no compiling
    assert not resolve_compile("auto", big) and resolve_compile("on")
    monkeypatch.setenv("R2UNET_COMPILE", "on")  # the environment replaces auto, not an explicit choice
    assert resolve_compile("auto") and not resolve_compile("off")
    monkeypatch.setenv("R2UNET_COMPILE", "sometimes")
    with pytest.raises(R2UNetError, match="must be one of auto, on, off"):
        resolve_compile("auto")


def test_auto_weighs_the_images_pixels_from_their_headers(tmp_path):
    """One 8192^2 image repays a compile (69 s compiled against 112 s); a hundred small images do
    not. Sizes come from the headers: TIFF (planes counted, colour channels not) and Pillow's."""
    import tifffile
    from PIL import Image

    from src_models.data import image_pixels

    large = tmp_path / "large.tif"
    tifffile.imwrite(large, np.zeros((8192, 8192, 3), np.uint8), compression="zlib", photometric="rgb")
    assert image_pixels(large) == 8192 * 8192 and worth_compiling([large])
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 40, 50), np.uint16))
    assert image_pixels(stack) == 5 * 40 * 50  # (three planes would be taken as colour channels, as the CLI does)
    small = []
    for i in range(100):
        small.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 48)).save(small[-1])
    assert image_pixels(small[0]) == 64 * 48 and not worth_compiling(small)
    assert image_pixels(tmp_path / "missing.png") is None


def test_compiler_found_through_cxx(monkeypatch, tmp_path):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: "/opt/cc/bin/mycxx" if name == "mycxx" else None)
    monkeypatch.setattr(compiled.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    (tmp_path / "Python.h").write_text("")
    monkeypatch.delenv("CXX", raising=False)
    assert not compiled.compiler_available()  # inductor looks for g++ only (clang++ on macOS), not any compiler
    monkeypatch.setenv("CXX", "mycxx")
    assert compiled.compiler_available()
    (tmp_path / "Python.h").unlink()  # inductor's modules include Python's headers
    assert not compiled.compiler_available()


@pytest.mark.slow
@pytest.mark.skipif(not compiled.compiler_available(), reason="no C++ compiler (g++ or $CXX) or Python headers for torch.compile here")
def test_compiled_segmenter_gives_the_eager_probabilities(trained_checkpoint):
    checkpoint = load_checkpoint(trained_checkpoint)
    image = vessel_image((72, 80), seed=5)[0]
    eager = Segmenter(checkpoint, "cpu", backend="torch", precision="fp32").predict(image)
    messages = []
    segmenter = Segmenter(checkpoint, "cpu", precision="fp32", compile=True, log=messages.append)
    assert segmenter.backend == "torch (compiled)" and segmenter.onnx is None
    first = segmenter.predict(image)
    again = segmenter.predict(image, should_stop=lambda: False)  # the compiled graph is reused; Cancel is checked per tile
    assert not any("failed" in m for m in messages), messages
    assert segmenter.backend == "torch (compiled)"
    np.testing.assert_allclose(first, eager, atol=1e-4)  # the same float32 network, fused: not a different model
    np.testing.assert_array_equal(first, again)
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and platform.machine().lower() in ("x86_64", "amd64"):
        # frozen for real: oneDNN's prepacked convolutions with the pointwise ops fused in (x86; ARM builds differ)
        from torch.profiler import profile

        with profile() as trace:
            segmenter.predict(image)
        names = {event.key for event in trace.key_averages()}
        assert "mkldnn::_convolution_pointwise" in names and "aten::convolution" not in names, sorted(names)


def test_a_failing_compile_runs_the_eager_network_and_says_why(trained_checkpoint, monkeypatch):
    calls = []

    def broken_compile(network, **options):
        calls.append(options)

        def run(x):
            calls.append({"freezing while called": torch._inductor.config.freezing})
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    checkpoint = load_checkpoint(trained_checkpoint)
    image = vessel_image((64, 64), seed=6)[0]
    messages = []
    segmenter = Segmenter(checkpoint, "cpu", precision="fp32", compile=True, log=messages.append)
    probs = segmenter.predict(image)
    segmenter.predict(image)
    # compiled once, not retried per tile; inductor's freezing on while it compiles (set around the call)
    assert calls == [{"dynamic": False}, {"freezing while called": True}]
    assert not torch._inductor.config.freezing  # and only then: the process's other compiles keep their settings
    assert messages == ["compiling the network for 64 x 64 inputs (once per shape; 10-30 s on 2 cores)",
                        "torch.compile failed (InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx); "
                        "running the network uncompiled"]
    assert segmenter.backend == "torch" and not segmenter.compile  # eager from now on: Cancel inside a tile again
    eager = Segmenter(checkpoint, "cpu", backend="torch", precision="fp32").predict(image)
    np.testing.assert_allclose(probs, eager, atol=1e-5)  # channels_last against NCHW: float rounding only


@pytest.mark.parametrize("error", [MemoryError("no room"), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")])
def test_compile_keeps_out_of_memory_as_it_is(trained_checkpoint, monkeypatch, error):
    monkeypatch.setattr(torch, "compile", lambda network, **options: lambda x: (_ for _ in ()).throw(error))
    segmenter = Segmenter(load_checkpoint(trained_checkpoint), "cpu", precision="fp32", compile=True)
    with pytest.raises(type(error)):  # the tiler retries smaller, still compiled
        segmenter._predict_batch_torch(np.zeros((1, 1, 32, 32), np.float32))
    assert segmenter.compile and not segmenter._compiled.failed


def test_cli_auto_compiles_only_what_would_run_bf16(trained_checkpoint, tmp_path, monkeypatch):
    import argparse
    import dataclasses

    import src_models.precision as precision
    from src_models.cli import _bf16_possible

    checkpoint = load_checkpoint(trained_checkpoint)  # its card does not validate bf16
    allowed = dataclasses.replace(checkpoint, card=checkpoint.model_card.with_(bf16=True))

    def args(precision="auto", device="auto"):
        return argparse.Namespace(precision=precision, device=device)

    monkeypatch.delenv("R2UNET_PRECISION")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert _bf16_possible(args(), allowed) and not _bf16_possible(args(), checkpoint)
    assert _bf16_possible(args("bf16"), checkpoint)  # asked for by name
    assert not _bf16_possible(args("fp32"), allowed) and not _bf16_possible(args(device="cuda"), allowed)
    monkeypatch.setenv("R2UNET_PRECISION", "fp32")
    assert not _bf16_possible(args(), allowed)
    monkeypatch.delenv("R2UNET_PRECISION")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))  # emulated bf16: auto stays fp32
    assert not _bf16_possible(args(), allowed)


def test_each_shape_compiles_once_up_to_a_limit(monkeypatch):
    from src_models.compiled import MAX_SHAPES, CompiledNetwork

    compiled_calls = []

    def fake_compile(network, **options):
        def run(x):
            compiled_calls.append(tuple(x.shape))
            return x
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    eager_calls = []
    messages = []
    network = CompiledNetwork(lambda x: eager_calls.append(tuple(x.shape)) or x, messages.append)
    sides = [16 * (i + 1) for i in range(MAX_SHAPES + 2)]
    for side in sides + sides[:2]:
        network(torch.zeros(1, 1, side, side))
    compiled_shapes = [(1, 1, side, side) for side in sides[:MAX_SHAPES]]
    assert compiled_calls == compiled_shapes + compiled_shapes[:2]  # seen shapes keep running compiled
    assert eager_calls == [(1, 1, side, side) for side in sides[MAX_SHAPES:]]  # a folder of many sizes: no endless compiling
    assert messages == [f"compiling the network for {side} x {side} inputs (once per shape; 10-30 s on 2 cores)" for side in sides[:MAX_SHAPES]] + [
        f"{MAX_SHAPES} input shapes compiled already: inputs of other shapes run uncompiled"]


@pytest.mark.slow
@pytest.mark.skipif(not compiled.compiler_available(), reason="no C++ compiler (g++ or $CXX) or Python headers for torch.compile here")
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="the split runs only on CPUs with native bf16 (inductor's AVX2 code dropped lo)")
def test_compiled_split_keeps_the_low_half():
    """The split bf16 layers take z as hi + lo (src_models.nets.split_bf16). Written as
    bf16(z - float(bf16(z))), inductor's fused kernels kept bf16(z) in float32 and lo came out
    zero; Veltkamp's split compiles to what eager PyTorch computes, in every shape."""
    from src_models.nets import split_bf16

    class Split(torch.nn.Module):
        def forward(self, z):
            return torch.cat(split_bf16(z), 1)

    network = compiled.CompiledNetwork(Split(), log=lambda message: None)
    for shape in [(1, 16, 40, 48), (2, 16, 40, 48), (1, 3, 7, 9)]:  # recompiles, odd sizes
        z = torch.randn(*shape) * 3
        with torch.inference_mode():
            out = network(z)
        assert not network.failed and torch.equal(out, Split()(z))
        hi, lo = out[:, : shape[1]].float(), out[:, shape[1]:].float()
        assert lo.abs().max() > 0 and torch.allclose(hi + lo, z, rtol=2**-15, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(not compiled.compiler_available(), reason="no C++ compiler (g++ or $CXX) or Python headers for torch.compile here")
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="auto compiles bf16 only on CPUs with native bf16 (AMX, AVX-512 BF16)")
def test_compiled_bf16_runs_folded_split_layers_and_keeps_the_masks(trained_checkpoint):
    """What --precision auto runs on an AMX CPU in a long run: batch norms folded, the first
    block's recurrent layers in split bf16, the rest in bf16; the masks stay those of fp32."""
    checkpoint = load_checkpoint(trained_checkpoint)
    image = vessel_image((96, 88), seed=7)[0]
    fp32 = Segmenter(checkpoint, "cpu", backend="torch", precision="fp32").predict(image)
    segmenter = Segmenter(checkpoint, "cpu", precision="bf16", compile=True)
    bf16 = segmenter.predict(image)
    network = segmenter._compiled.network
    split = [m for m in network.encoder[0].inner.children() if isinstance(m, SplitBF16RecurrentConv)]
    assert len(split) == 2
    later = list(network.encoder[1].modules())
    assert any(isinstance(m, FoldedRecurrentConv) for m in later) and not any(isinstance(m, RecurrentConv) for m in later)
    assert segmenter.backend == "torch (compiled)" and not segmenter._compiled.failed
    assert 0 < np.abs(bf16 - fp32).max() < 0.1
    assert ((bf16 >= 0.5) == (fp32 >= 0.5)).mean() >= 0.99
    assert isinstance(segmenter.model.encoder[1].r1, RecurrentConv)  # the model itself is not folded (fine-tuning swaps it)
