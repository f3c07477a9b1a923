"""The tiler and the Segmenter: exact blending, seamless tiles, stacks, dask, cancel, OOM fallback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from src_models.checkpoint import load_checkpoint
from src_models.devices import select_device
from src_models.errors import CancelledError, R2UNetError
from src_models.inference import Segmenter
from src_models.labels import LabelSink, probabilities_to_labels
from src_models.preprocessing import preprocess
from src_models.settings import AUTO_OVERLAP_PIXELS, DEFAULT_OVERLAP
from src_models.synthetic import vessel_image
from src_models.tiling import balanced_tile, sliding_window_inference, tile_starts


def _pointwise(batch: np.ndarray) -> np.ndarray:
    return np.concatenate([1 / (1 + np.exp(-batch[:, :1])), np.tanh(batch[:, :1]) ** 2], axis=1)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 150), w=st.integers(1, 150), c=st.integers(1, 3),
    tile=st.integers(8, 96), overlap=st.floats(0, 0.9), batch=st.integers(1, 5),
    multiple=st.sampled_from([1, 2, 8]), mode=st.sampled_from(["gaussian", "constant"]),
)
def test_blending_is_exact_for_a_pointwise_predictor(h, w, c, tile, overlap, batch, multiple, mode):
    x = np.random.default_rng(h * w).normal(size=(c, h, w)).astype(np.float32)
    out = sliding_window_inference(x, tile, batch, _pointwise, overlap, mode, size_multiple=multiple)
    assert out.shape == (2, h, w) and np.isfinite(out).all()
    # numpy only (no ATen): each pixel is sum(w_i * f) / sum(w_i) over <= 4 tiles of the SAME f in
    # [0, 1], so it differs from f by a few float32 roundings (~4 * 6e-8); 1e-5 is 40x that
    assert np.allclose(out, _pointwise(x[None])[0], atol=1e-5)


@pytest.mark.parametrize(("size", "tile", "overlap", "multiple"), [(100, 32, 0.25, 1), (640, 256, 0.25, 8), (64, 64, 0.5, 16), (1008, 128, 0.9, 16)])
def test_tile_starts_cover_and_align(size, tile, overlap, multiple):
    starts = tile_starts(size, tile, round(overlap * tile), multiple)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(s % multiple == 0 for s in starts)
    assert all(b - a <= tile * (1 - overlap) + multiple for a, b in zip(starts, starts[1:]))


def test_single_tile_equals_the_network_on_the_whole_image(trained_checkpoint):
    pytest.importorskip("onnxruntime")
    seg = Segmenter(load_checkpoint(trained_checkpoint), "cpu")
    img, _ = vessel_image((150, 133), seed=5)
    x = torch.from_numpy(preprocess(img, seg.checkpoint.preprocess))[None]
    with torch.inference_mode():
        reference = torch.sigmoid(seg.model(x))[0].numpy()
    # the auto backend (onnxruntime) against eager PyTorch on the same padded input: only the
    # kernels' summation order differs. Both stay within ~1e-6 relative of the float64 logits
    # (measured vs a float64 run, AVX2 and ATEN_CPU_CAPABILITY=default alike), and a probability
    # moves by at most 1/4 of its logit: max measured 1.5e-6, so 1e-5 holds on any CPU's order
    assert np.abs(seg.predict(img) - reference).max() < 1e-5
    assert seg.backend == "onnxruntime"  # not PyTorch against itself after a quiet fallback


@pytest.mark.parametrize("tile", [512, 1024])
def test_tiled_matches_whole_image_at_the_default_overlap(trained_checkpoint, tile):
    seg = Segmenter(load_checkpoint(trained_checkpoint), "cpu")
    img, _ = vessel_image((1100, 1050), seed=7, n_vessels=30, rgb=True)
    whole = seg.predict(img, tile=2048)
    tiled = seg.predict(img, tile=tile, batch_size=3)  # default overlap: 192 pixels
    assert tiled.shape == whole.shape == (1, 1100, 1050)
    # a property of the overlap (context lost at the tiles' borders, measured in settings.py), not of
    # float rounding: summation order moves these probabilities by ~1e-6, three orders below
    assert np.abs(tiled - whole).max() < 1e-3
    assert np.abs(seg.predict(img, tile=512, overlap=DEFAULT_OVERLAP) - whole).max() < 1e-3


@given(size=st.integers(1, 400), max_tile=st.integers(2, 60), overlap=st.integers(0, 30), multiple=st.sampled_from([1, 2, 16]))
@settings(max_examples=300, deadline=None)
def test_balanced_tiles_cover_with_the_overlap_and_never_waste_more_than_fixed_ones(size, max_tile, overlap, multiple):
    size, max_tile = size * multiple, max_tile * multiple
    overlap = min(overlap * multiple // 2, max_tile - multiple)
    tile = balanced_tile(size, max_tile, overlap, multiple)
    assert tile % multiple == 0 and multiple <= tile <= min(size, max_tile)
    starts = tile_starts(size, tile, overlap, multiple)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])), "every overlap at least what was asked"
    fixed = min(max_tile, size)
    assert len(starts) * tile <= len(tile_starts(size, fixed, overlap, multiple)) * fixed


def test_balanced_tile_examples():
    assert balanced_tile(1424, 1024, 192, 16) == 816  # two tiles (1632 pixels computed) instead of two of 1024
    assert balanced_tile(8192, 1280, 192, 16) == 1200  # 8 tiles per axis, none sticking out
    assert balanced_tile(1000, 1024, 192, 16) == 1000  # fits: one tile


@pytest.mark.parametrize("tile", [None, 96])
def test_label_sink_gives_the_thresholded_probabilities_without_keeping_them(trained_checkpoint, tile):
    seg = Segmenter(load_checkpoint(trained_checkpoint), "cpu")
    img, _ = vessel_image((300, 280), seed=3)
    probs = seg.predict(img, tile=tile)
    for threshold in (0.3, 0.5):
        sink = LabelSink(1, 300, 280, threshold=threshold)
        assert seg.predict(img, tile=tile, out=sink) is sink
        np.testing.assert_array_equal(sink.labels, probabilities_to_labels(probs, threshold))
    with pytest.raises(R2UNetError, match="threshold"):
        LabelSink(1, 3, 3, threshold=2.0)


def test_default_overlap_keeps_the_shipped_model_seamless_on_a_real_retina():
    """The default overlap, checked where it matters: the shipped R2U-Net on skimage's retina
    (reflect-padded to 1856^2), in two 1024-pixel tiles per axis, against the whole image."""
    data = pytest.importorskip("skimage.data")
    try:
        retina = data.retina()
    except Exception as exc:  # an install without the bundled images
        pytest.skip(f"skimage's retina image is not available: {exc}")
    from src_models.model_names import load_model

    image = np.pad(retina, ((300, 300), (300, 300), (0, 0)), mode="reflect")[:1856, :1856]
    seg = Segmenter(load_model("r2unet-drive"), "cpu", scale=1)  # the tiler at native resolution
    whole = seg.predict(image, channel_axis=-1, tile=1856)
    tiled = seg.predict(image, channel_axis=-1, tile=1024)  # default overlap
    # measured with the camera-robust r2unet-drive: 1.3e-3 at 192 px, 1.2e-3 at 256 px (a floor), 2.8e-2 at 128 px
    assert AUTO_OVERLAP_PIXELS == 192 and np.abs(tiled - whole).max() < 2e-3
    np.testing.assert_array_equal(tiled >= 0.5, whole >= 0.5)
    # and what a 128-pixel overlap would lose here (why the default is not smaller)
    assert np.abs(seg.predict(image, channel_axis=-1, tile=1024, overlap=128 / 1024) - whole).max() > 8e-3


def test_progress_and_cancel(tiny_checkpoint):
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu")
    img, _ = vessel_image((200, 200), seed=1)
    seen: list[float] = []
    seg.predict(img, tile=64, overlap=0.25, batch_size=2, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 3
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        seg.predict(img, tile=64, batch_size=1, should_stop=stop_after_two)
    assert len(calls) == 3


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_cancel_stops_inside_a_single_tile(backend):
    """An image that runs as ONE tile still cancels: torch checks before every conv, onnxruntime
    is terminated by a watcher thread. Without that, this run would finish and return."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    from src_models.model_names import load_model

    seg = Segmenter(load_model("r2unet-drive"), "cpu", backend=backend)
    polls, done = [], []
    image = vessel_image((768, 768), seed=4)[0]  # about a second of network on 2 cores: the watcher polls every 50 ms
    with pytest.raises(CancelledError):
        seg.predict(image, should_stop=lambda: polls.append(1) or len(polls) > 1, progress=done.append)
    assert done == [] and seg._should_stop is None  # stopped before the only tile finished
    assert seg.predict(vessel_image((64, 64), seed=4)[0]).shape == (1, 64, 64)  # and the segmenter still works


def test_whole_image_runs_tile_when_memory_is_short(tiny_checkpoint, monkeypatch):
    import src_models.inference as inference

    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu")
    monkeypatch.setattr(inference, "available_memory", lambda: None)
    m = seg.size_multiple
    assert seg.auto_tile(1400, 1400) == -(-1400 // m) * m  # whole (padded to the size multiple)
    monkeypatch.setattr(inference, "available_memory", lambda: 1024**3)  # 1 GiB free: 1400^2 needs ~1.8 GB
    assert seg.auto_tile(1400, 1400) == inference.AUTO_TILE
    assert seg.auto_tile(500, 500) == -(-500 // m) * m


def test_dask_input_is_read_lazily_and_matches_numpy(tiny_checkpoint):
    da = pytest.importorskip("dask.array")
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu")
    img, _ = vessel_image((300, 260), seed=2, rgb=True)
    lazy = da.from_array(img, chunks=(64, 64, 3))
    assert np.allclose(seg.predict(lazy, tile=128), seg.predict(img, tile=128), atol=1e-6)


def test_out_can_be_a_memmap(tiny_checkpoint, tmp_path):
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu")
    img, _ = vessel_image((200, 180), seed=3)
    out = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(1, 200, 180))
    result = seg.predict(img, tile=64, out=out)
    assert result is out
    assert np.allclose(np.load(tmp_path / "p.npy"), seg.predict(img, tile=64))


def test_stacks_and_time_series_go_slice_by_slice(tiny_checkpoint):
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu")
    gray = np.stack([vessel_image((48, 40), seed=s)[0] for s in range(3)])
    probs = seg.predict_stack(gray)
    assert probs.shape == (3, 1, 48, 40)
    assert np.allclose(probs[1], seg.predict(gray[1]))
    rgb_t = np.stack([np.stack([vessel_image((40, 40), seed=s + 2 * t, rgb=True)[0] for s in range(2)]) for t in range(2)])
    assert seg.predict_stack(rgb_t, channel_axis=-1).shape == (2, 2, 1, 40, 40)
    fractions = []
    seg.predict_stack(gray, progress=fractions.append)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_out_of_memory_retries_smaller_and_says_so(tiny_checkpoint):
    messages: list[str] = []
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu", log=messages.append)
    img, _ = vessel_image((300, 300), seed=4)
    reference = seg.predict(img, tile=128, batch_size=1)
    real = seg._predict_batch

    def limited(batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] > 1 or batch.shape[-1] > 128:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    seg._predict_batch = limited
    result = seg.predict(img, tile=512, batch_size=4)
    assert any("batch size 1" in m for m in messages) and any("128-pixel tiles" in m for m in messages)
    # the retry ends on the very tiles (128 pixels, batch 1) the reference ran: equal up to rounding
    assert np.abs(result - reference).max() < 1e-5

    def always(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    seg._predict_batch = always
    with pytest.raises(R2UNetError, match="out of memory even with batch 1"):
        seg.predict(img, tile=256)


def test_other_errors_are_not_mistaken_for_oom(tiny_checkpoint):
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu")
    seg._predict_batch = lambda batch: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        seg.predict(np.zeros((32, 32), np.uint8))


def test_devices():
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    assert select_device("cpu").type == "cpu"
    with pytest.raises(R2UNetError, match="unknown"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(R2UNetError, match="not available here; available: .*cpu"):
            select_device("cuda")


def test_channel_mismatch_is_explained(tmp_path):
    from conftest import random_checkpoint

    seg = Segmenter(load_checkpoint(random_checkpoint(tmp_path / "rgb.safetensors", in_channels=3)), "cpu")
    # default preprocessing (green) makes one channel; this model wants 3
    with pytest.raises(R2UNetError, match="takes 3 channel"):
        seg.predict(np.zeros((32, 32, 3), np.uint8))


def test_bad_settings():
    x = np.zeros((1, 20, 20), np.float32)
    with pytest.raises(R2UNetError, match="overlap"):
        sliding_window_inference(x, 8, 1, _pointwise, overlap=0.99)
    with pytest.raises(R2UNetError, match="blend mode"):
        sliding_window_inference(x, 8, 1, _pointwise, mode="cubic")
    with pytest.raises(R2UNetError, match="batch size"):
        sliding_window_inference(x, 8, 0, _pointwise)


def test_labels():
    probs = np.array([[[0.2, 0.5], [0.7, 0.49]]], np.float32)
    assert probabilities_to_labels(probs).tolist() == [[0, 1], [1, 0]]
    assert probabilities_to_labels(probs, 0.6).tolist() == [[0, 0], [1, 0]]
    multi = np.stack([1 - probs[0], probs[0] * 0.5, probs[0] * 0.5])
    assert probabilities_to_labels(multi).dtype == np.uint8
    with pytest.raises(R2UNetError):
        probabilities_to_labels(probs, 1.5)


def test_tta_averages_the_four_flips(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    plain, tta = Segmenter(checkpoint, "cpu"), Segmenter(checkpoint, "cpu", tta=True)
    img, _ = vessel_image((40, 56), seed=9)
    flips = [img, img[:, ::-1], img[::-1], img[::-1, ::-1]]
    manual = [plain.predict(np.ascontiguousarray(f))[0] for f in flips]
    expected = (manual[0] + manual[1][:, ::-1] + manual[2][::-1] + manual[3][::-1, ::-1]) / 4
    # the same network on flipped copies, in a batch or one by one: at most a mirrored summation
    # order inside each conv (measured 0.0 on AVX2 and default kernels); 1e-5 is ~100 float32 ulps of p
    assert np.allclose(tta.predict(img)[0], expected, atol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_onnxruntime_backend_matches_pytorch(trained_checkpoint, tta):
    pytest.importorskip("onnxruntime")
    checkpoint = load_checkpoint(trained_checkpoint)
    image = vessel_image((150, 133), seed=5, rgb=True)[0]
    fast = Segmenter(checkpoint, "cpu", tta=tta, backend="onnxruntime")
    plain = Segmenter(checkpoint, "cpu", tta=tta, backend="torch")
    assert fast.backend == "onnxruntime" and plain.backend == "torch"
    # two float32 engines: probabilities differ by rounding only (measured 1.5e-6); 1e-3 is the
    # product's promise ("same results"), far above any CPU's summation order, far below a real bug
    assert np.abs(fast.predict(image, tile=64) - plain.predict(image, tile=64)).max() < 1e-3
    assert Segmenter(checkpoint, "cpu").backend == "onnxruntime"  # auto picks it on the CPU


def test_backend_falls_back_to_pytorch_and_says_why(tiny_checkpoint, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    messages = []
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu", log=messages.append)
    assert seg.backend == "torch" and "onnxruntime not used" in messages[0]
    with pytest.raises(R2UNetError, match="install onnxruntime or use --backend torch"):
        Segmenter(load_checkpoint(tiny_checkpoint), "cpu", backend="onnxruntime")
    with pytest.raises(R2UNetError, match="must be one of"):
        Segmenter(load_checkpoint(tiny_checkpoint), "cpu", backend="tensorrt")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_is_checked_against_pytorch(tmp_path, trained_checkpoint, capsys, fmt):
    from src_models.cli import main

    out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert main(["export", str(trained_checkpoint), "--format", fmt, "--out", str(out)]) == 0
    assert "max |logit difference| vs PyTorch" in capsys.readouterr().out
    x = np.random.default_rng(1).normal(size=(1, 1, 48, 80)).astype(np.float32)
    with torch.inference_mode():
        reference = load_checkpoint(trained_checkpoint).build("cpu")(torch.from_numpy(x)).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    else:
        got = torch.jit.load(str(out))(torch.from_numpy(x)).detach().numpy()
    # logits (|max| ~21 here) of the same float32 graph in two engines: each is within a few float32
    # roundings per layer of the float64 value (~1e-6 relative: 1.9e-5 measured, AVX2 and default
    # kernels alike); 1e-4 is 5x that, while a wrong graph moves logits by > 1e-1
    assert np.abs(got - reference).max() < 1e-4
    assert main(["export", str(trained_checkpoint), "--format", fmt, "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_onnxruntime_out_of_memory_retries_with_smaller_tiles(trained_checkpoint, monkeypatch):
    pytest.importorskip("onnxruntime")
    from src_models.export import OnnxPredictor

    real_call, calls = OnnxPredictor.__call__, []

    def allocation_fails_once(self, batch, should_stop=None):
        calls.append(batch.shape)
        if len(calls) == 1:
            raise Exception("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")
        return real_call(self, batch, should_stop)

    monkeypatch.setattr(OnnxPredictor, "__call__", allocation_fails_once)
    messages = []
    seg = Segmenter(load_checkpoint(trained_checkpoint), "cpu", log=messages.append, backend="onnxruntime")
    probs = seg.predict(vessel_image((300, 280), seed=1)[0], tile=256)
    assert probs.shape == (1, 300, 280) and np.isfinite(probs).all()
    assert any("retrying with 128-pixel tiles" in m for m in messages) and calls[1][-1] <= 128  # at most 128, evened out


def test_a_corrupt_onnx_cache_file_is_rebuilt(trained_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from src_models.export import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # a cache of its own: no optimised graph from other tests
    checkpoint = load_checkpoint(trained_checkpoint)
    first = Segmenter(checkpoint, "cpu", backend="onnxruntime")
    first.onnx.session()  # built before the files are damaged
    first.onnx.path.write_bytes(b"not a model")
    first.onnx.optimized_path.unlink()  # so that the next session reads the exported graph
    again = Segmenter(checkpoint, "cpu", backend="onnxruntime")
    image = vessel_image((64, 64), seed=2)[0]
    assert np.abs(again.predict(image) - Segmenter(checkpoint, "cpu", backend="torch").predict(image)).max() < 1e-3
    assert again.backend == "onnxruntime" and again.onnx.path.stat().st_size > 1000  # exported again


def test_two_exports_at_once_both_succeed(trained_checkpoint, tmp_path):
    """torch.onnx.export keeps global state: two threads exporting at once (the widget's warm-up of
    one model while another loads) failed with "GLOBALS.in_onnx_export must be False"."""
    ort = pytest.importorskip("onnxruntime")
    import threading

    from src_models.export import export_onnx

    checkpoint, start, errors = load_checkpoint(trained_checkpoint), threading.Barrier(2), []

    def export(name: str) -> None:
        start.wait()
        try:
            export_onnx(checkpoint, tmp_path / name)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(f"{i}.onnx",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(2):
        ort.InferenceSession(str(tmp_path / f"{i}.onnx"), providers=["CPUExecutionProvider"])


def test_a_new_onnx_graph_replaces_the_stale_ones_of_the_same_weights(trained_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from src_models.export import CACHE_ENV, OnnxPredictor

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    checkpoint = load_checkpoint(trained_checkpoint)
    folder = tmp_path / "onnx"
    folder.mkdir(parents=True)
    stale = folder / f"{checkpoint.sha256[:32]}-0.0.1-oldcode-opset17.onnx"
    other = folder / f"{'0' * 32}-0.0.1-oldcode-opset17.onnx"  # another model's graph: kept
    stale.write_bytes(b"old graph"), other.write_bytes(b"other model")
    predictor = OnnxPredictor(checkpoint)
    assert predictor.path.is_file() and not stale.exists() and other.exists()


def test_a_failing_stop_callback_cancels_instead_of_running_on():
    pytest.importorskip("onnxruntime")
    from src_models.export import OnnxPredictor
    from src_models.model_names import load_model

    predictor = OnnxPredictor(load_model("r2unet-drive"))
    small = np.zeros((1, 1, 64, 64), np.float32)
    assert predictor(small, lambda: False).shape[-2:] == (64, 64)

    def broken() -> bool:
        raise RuntimeError("callback bug")

    with pytest.raises(CancelledError):  # 768^2 runs for about a second: the watcher's first poll lands inside it
        predictor(np.zeros((1, 1, 768, 768), np.float32), broken)


# -- the tiling geometry in pixels gives the layouts of the former fraction-based code ---------
def _former_tile_starts(size: int, tile: int, overlap: float, multiple: int) -> list[int]:
    """tile_starts as it was (overlap a fraction, with its 1e-6 fudge): the reference."""
    if tile >= size:
        return [0]
    stride = max(multiple, int(tile * (1.0 - overlap) + 1e-6) // multiple * multiple)
    count = -(-(size - tile) // stride) + 1
    return sorted({round(i * (size - tile) / (count - 1) / multiple) * multiple for i in range(count)})


def _former_layout(size: int, max_tile: int, overlap: float, multiple: int) -> tuple[int, list[int]]:
    """One axis of the former sliding_window_inference: fraction -> pixels -> fraction -> stride."""
    overlap_px = round(overlap * max_tile)
    tile = balanced_tile(size, max_tile, overlap_px, multiple)  # unchanged: it always took pixels
    return tile, _former_tile_starts(size, tile, min(0.95, overlap_px / tile), multiple)


@pytest.mark.parametrize("multiple", [1, 2, 16])
@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.15, 0.25, 1 / 3, 0.5, 0.75, 0.9, 0.95])
def test_tile_layouts_equal_the_former_fraction_based_ones(overlap, multiple):
    from src_models.tiling import tile_grid

    for size in (16, 64, 100, 304, 1008, 1424, 2000, 8192):
        for roi in (16, 40, 96, 128, 256, 1024, 1280):
            grid = tile_grid(size, size, roi, multiple, overlap=overlap)
            padded = -(-size // multiple) * multiple
            largest = max(multiple, min(roi, padded) // multiple * multiple)
            tile, starts = _former_layout(padded, largest, overlap, multiple)
            assert (grid.tile[0], list(grid.ys)) == (tile, starts), (size, roi)


def test_the_default_overlap_is_192_pixels_of_the_tile_at_most_half(tiny_checkpoint):
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu")
    # the default tile, its out-of-memory halvings, and tiles off the size multiple (the GUI and --tile allow any)
    for tile in (1280, 640, 320, 160, 128, 300, 143, 1000):
        grid = seg.tile_grid(3000, 3000, tile)
        former = _former_layout(-(-3000 // seg.size_multiple) * seg.size_multiple, tile, min(0.5, 192 / tile), seg.size_multiple)
        assert (grid.tile[0], list(grid.ys)) == former, tile
        largest = tile // seg.size_multiple * seg.size_multiple
        assert min(grid.tile[0] - (b - a) for a, b in zip(grid.ys, grid.ys[1:])) >= min(192, largest // 2)


def test_the_onnx_session_loads_this_cpus_optimised_graph_and_rebuilds_a_corrupt_one(trained_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from src_models.export import CACHE_ENV, OnnxPredictor

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # a cache of its own: the first session must optimise and write
    optimised, real = [], OnnxPredictor._save_optimized
    monkeypatch.setattr(OnnxPredictor, "_save_optimized", lambda self, *args: optimised.append(1) or real(self, *args))
    checkpoint = load_checkpoint(trained_checkpoint)
    image = vessel_image((96, 80), seed=3)[0]
    first = Segmenter(checkpoint, "cpu", backend="onnxruntime")
    expected = first.predict(image)
    optimized = first.onnx.optimized_path
    assert optimized.is_file() and not list(optimized.parent.glob(".*.tmp"))  # written atomically, once
    again = Segmenter(checkpoint, "cpu", backend="onnxruntime")  # a fresh process would load the optimised file
    assert np.array_equal(again.predict(image), expected)
    assert len(optimised) == 1  # loaded, not optimised again
    optimized.write_bytes(b"garbage")
    mended = Segmenter(checkpoint, "cpu", backend="onnxruntime")  # optimises the graph afresh
    assert np.array_equal(mended.predict(image), expected) and optimized.stat().st_size > 1000
    assert len(optimised) == 2
    for segmenter in (first, again, mended):  # workers sleep after a run: the cores go to what follows
        assert _spins(segmenter.onnx.session()) == "0"


def _spins(session: Any) -> str:
    return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_an_onnx_session_that_cannot_be_built_falls_back_or_says_so(tiny_checkpoint, monkeypatch):
    pytest.importorskip("onnxruntime")
    from src_models.export import OnnxPredictor

    def broken(self, threads):
        raise RuntimeError("no session today")

    monkeypatch.setattr(OnnxPredictor, "_new_session", broken)
    messages = []
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu", log=messages.append)  # the session builds in the background
    probs = seg.predict(vessel_image((40, 40))[0])
    assert probs.shape == (1, 40, 40) and seg.backend == "torch"
    assert any("onnxruntime not used (no session today)" in m for m in messages)
    with pytest.raises(R2UNetError, match="onnxruntime backend is not available.*use --backend torch"):
        Segmenter(load_checkpoint(tiny_checkpoint), "cpu", backend="onnxruntime").predict(vessel_image((40, 40))[0])


def test_two_threads_asking_for_a_session_while_it_builds_get_the_same_one(trained_checkpoint, monkeypatch):
    pytest.importorskip("onnxruntime")
    import threading
    import time

    from src_models.export import OnnxPredictor

    real = OnnxPredictor._new_session
    builds = []

    def slow(self, threads):
        builds.append(threads)
        time.sleep(0.3)
        return real(self, threads)

    monkeypatch.setattr(OnnxPredictor, "_new_session", slow)
    # new threads take torch's last set_num_threads, which an earlier test may have called in
    # another thread; this thread's own count may differ: make the two agree, as in one process
    torch.set_num_threads(torch.get_num_threads())
    predictor = OnnxPredictor(load_checkpoint(trained_checkpoint))
    predictor.prepare()
    got, errors = [], []

    def ask():
        try:
            got.append(predictor.session())
        except Exception as exc:  # the race would show here
            errors.append(exc)

    workers = [threading.Thread(target=ask) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors and len(got) == 2 and got[0] is got[1] and len(builds) == 1


def test_a_cache_folder_that_takes_no_optimised_graph_still_runs_onnxruntime(trained_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from src_models.export import OnnxPredictor

    monkeypatch.setattr(OnnxPredictor, "optimized_path", property(lambda self: tmp_path / "missing" / "graph.opt.onnx"))
    checkpoint = load_checkpoint(trained_checkpoint)
    segmenter = Segmenter(checkpoint, "cpu", backend="onnxruntime")
    image = vessel_image((64, 64), seed=2)[0]
    probs = segmenter.predict(image)
    assert segmenter.backend == "onnxruntime" and segmenter.onnx.path.is_file()  # the exported graph was kept
    assert _spins(segmenter.onnx.session()) == "0"
    assert np.abs(probs - Segmenter(checkpoint, "cpu", backend="torch").predict(image)).max() < 1e-3
