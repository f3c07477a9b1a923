"""The OpenVINO backend: bf16 with float32 ends on CPUs with native bf16, float32 anywhere, the
marks that keep layers float32 (and the check that they held), Cancel, and the fall-backs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_checkpoint, with_trained_statistics

from src_models import inference, openvino_backend
from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.errors import CancelledError, R2UNetError
from src_models.inference import Segmenter
from src_models.openvino_backend import mark_precise, precise_prefixes
from src_models.precision import cpu_has_native_bf16
from src_models.synthetic import vessel_image

needs_openvino = pytest.mark.skipif(not openvino_backend.openvino_available(), reason="openvino is not installed")
needs_native_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="OpenVINO's bf16 runs on CPUs with AMX or AVX-512 BF16")

IR = """<?xml version="1.0"?>
<net name="m" version="11"><layers>
<layer id="0" name="image" type="Parameter" version="opset1"/>
<layer id="1" name="/encoder.0/r1/convs.0/Conv/WithoutBiases" type="Convolution" version="opset1"/>
<layer id="2" name="/encoder.0/r1/Add" type="Add" version="opset1"><rt_info><attribute name="fused_names" version="0" value="x"/></rt_info></layer>
<layer id="3" name="/encoder.0/r2/convs.0/Conv/WithoutBiases" type="Convolution" version="opset1"/>
<layer id="4" name="/head/Conv/WithoutBiases" type="Convolution" version="opset1"/>
<layer id="5" name="/encoder.0/conv1x1/Conv/WithoutBiases" type="Const" version="opset1"/>
</layers></net>"""


def test_marks_go_on_the_named_layers_only():
    import xml.etree.ElementTree as ET

    prefixes = precise_prefixes("r2unet", 5)
    assert prefixes == ("/encoder.0/conv1x1/", "/encoder.0/r1/", "/head/")
    assert precise_prefixes("unet", 5) == ("/encoder.0/", "/head/") and precise_prefixes("r2unet", 1) == ("/",)
    text, marked = mark_precise(IR, prefixes)
    assert marked == 3
    layers = {layer.get("name"): layer for layer in ET.fromstring(text).iter("layer")}
    precise = {name for name, layer in layers.items() if any(a.get("name") == "precise" for a in layer.iter("attribute"))}
    assert precise == {"/encoder.0/r1/convs.0/Conv/WithoutBiases", "/encoder.0/r1/Add", "/head/Conv/WithoutBiases"}
    add = layers["/encoder.0/r1/Add"].findall("rt_info")
    assert len(add) == 1 and {a.get("name") for a in add[0]} == {"fused_names", "precise"}  # one rt_info, kept
    assert mark_precise(text, prefixes)[0].count('name="precise"') == 3  # marking twice adds nothing


def _trained(tmp_path, name="net.safetensors", **config):
    path = random_checkpoint(tmp_path / "raw.safetensors", seed=3, **config)
    checkpoint = load_checkpoint(path)
    model = with_trained_statistics(checkpoint.build("cpu"), seed=3)
    out = tmp_path / name
    save_checkpoint(out, model.state_dict(), checkpoint.config, checkpoint.preprocess, checkpoint.class_names,
                    checkpoint.provenance, card=checkpoint.model_card.with_(bf16=True))
    return load_checkpoint(out)


def _logits(checkpoint, x):
    with torch.no_grad():
        return checkpoint.build("cpu").eval()(torch.from_numpy(x)).numpy()


@needs_openvino
def test_float32_openvino_gives_pytorchs_logits(tmp_path):
    checkpoint = _trained(tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 1, 48, 40)).astype(np.float32)
    predictor = openvino_backend.OpenVinoPredictor(checkpoint, precision="fp32")
    assert np.abs(predictor(x) - _logits(checkpoint, x)).max() < 1e-3  # float32 both: summation order only
    segmenter = Segmenter(checkpoint, "cpu", backend="openvino", precision="fp32")
    assert segmenter.backend == "openvino" and segmenter.precision == "fp32"
    image = vessel_image((60, 52), seed=1)[0]
    reference = Segmenter(checkpoint, "cpu", backend="torch", precision="fp32").predict(image)
    assert np.abs(segmenter.predict(image) - reference).max() < 1e-4


@needs_openvino
@needs_native_bf16
def test_bf16_keeps_the_marked_convolutions_float32_and_agrees_with_float32(tmp_path):
    checkpoint = _trained(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 1, 64, 64)).astype(np.float32)
    predictor = openvino_backend.OpenVinoPredictor(checkpoint)
    logits = predictor(x)
    compiled = next(iter(predictor._compiled.values()))
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            precisions[info["originalLayersNames"].astype(str).split(",")[0]] = info["runtimePrecision"].astype(str)
    kept = {name: p for name, p in precisions.items() if name.startswith(predictor.prefixes)}
    assert kept and set(kept.values()) == {"f32"}  # the first block's 1x1 conv and first recurrent layer, the head
    rest = [p for name, p in precisions.items() if name not in kept]
    assert rest.count("bf16") > len(rest) / 2  # the rest: AMX / AVX-512 BF16 (OpenVINO may keep an odd small one)
    reference = _logits(checkpoint, x)
    difference = np.abs(logits - reference)
    assert 0 < difference.max() < 0.1 * np.abs(reference).max()  # bf16's 8-bit mantissa, not float32 (0) nor garbage
    assert ((logits > 0) == (reference > 0)).mean() > 0.98


@needs_openvino
@needs_native_bf16
def test_auto_runs_bf16_on_openvino_and_a_dropped_mark_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("R2UNET_PRECISION")
    checkpoint = _trained(tmp_path)
    messages = []
    segmenter = Segmenter(checkpoint, "cpu", log=messages.append)  # the card allows bf16; no compiling needed
    assert (segmenter.backend, segmenter.precision) == ("openvino", "bf16")
    image = vessel_image((60, 52), seed=1)[0]
    probabilities = segmenter.predict(image)
    reference = Segmenter(checkpoint, "cpu", backend="torch", precision="fp32").predict(image)
    assert np.abs(probabilities - reference).max() < 0.1
    # the marked graph is cached beside the exported one: the next predictor reads it, marks nothing
    marked = openvino_backend.OpenVinoPredictor(checkpoint).marked_path
    assert marked.is_file() and marked.with_suffix(".bin").is_file()
    monkeypatch.setattr(openvino_backend, "mark_precise", lambda text, prefixes: pytest.fail("marked again"))
    assert openvino_backend.OpenVinoPredictor(checkpoint).session() is not None
    # an OpenVINO that ignored the mark would run the first block in bf16: refused, not silently less precise
    monkeypatch.setenv("R2UNET_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(openvino_backend, "mark_precise", lambda text, prefixes: (text, 1))
    with pytest.raises(R2UNetError, match="not float32"):
        openvino_backend.OpenVinoPredictor(checkpoint)(np.zeros((1, 1, 32, 32), np.float32))
    # auto falls back to float32 (onnxruntime) and says why; asked for by name, the error stands
    fallback = Segmenter(checkpoint, "cpu", log=messages.append)
    assert np.abs(fallback.predict(image) - reference).max() < 1e-4
    assert (fallback.backend, fallback.precision) == ("onnxruntime", "fp32")
    assert any("OpenVINO not used" in m and "not float32" in m for m in messages)
    by_name = Segmenter(checkpoint, "cpu", backend="openvino", precision="bf16")
    for _ in range(2):  # and stays: a second Segment does not quietly run something else
        with pytest.raises(R2UNetError, match="OpenVINO backend failed .*not float32"):
            by_name.predict(image)
    assert by_name.backend == "openvino" and by_name.onnx is not None
    # bf16 asked for by name (backend auto): PyTorch's bf16 runs instead, said so
    torch_bf16 = Segmenter(checkpoint, "cpu", precision="bf16", log=messages.append)
    assert np.abs(torch_bf16.predict(image) - reference).max() < 0.1
    assert (torch_bf16.backend, torch_bf16.precision) == ("torch", "bf16")
    assert any("running bf16 on PyTorch" in m for m in messages)


@needs_openvino
def test_cancel_stops_before_the_network_runs(tmp_path):
    checkpoint = _trained(tmp_path)
    predictor = openvino_backend.OpenVinoPredictor(checkpoint, precision="fp32")
    x = np.zeros((1, 1, 32, 32), np.float32)
    with pytest.raises(CancelledError):
        predictor(x, lambda: True)
    with pytest.raises(CancelledError):  # a callback that fails cancels too (a run that cannot stop is worse)
        predictor(x, lambda: 1 / 0)
    assert predictor(x, lambda: False).shape == (1, 1, 32, 32)


@needs_openvino
def test_cancel_stops_a_run_inside_the_network(tmp_path):
    """The first poll of a running request (after 50 ms) cancels it: a full-width R2U-Net on
    1024^2 takes far longer than that on any CPU (about 270 GFLOP)."""
    checkpoint = load_checkpoint(random_checkpoint(tmp_path / "wide.safetensors", widths=(16, 32, 64, 128, 256)))
    predictor = openvino_backend.OpenVinoPredictor(checkpoint, precision="fp32")
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 1  # not before the run: while it runs

    with pytest.raises(CancelledError):
        predictor(np.zeros((1, 1, 1024, 1024), np.float32), should_stop)
    assert len(calls) == 2
    assert predictor(np.zeros((1, 1, 64, 64), np.float32)).shape == (1, 1, 64, 64)  # usable afterwards


@needs_openvino
def test_a_cpu_without_native_bf16_keeps_float32_and_refuses_openvinos_bf16(tmp_path, monkeypatch):
    import src_models.precision as precision

    monkeypatch.delenv("R2UNET_PRECISION")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    checkpoint = _trained(tmp_path)
    segmenter = Segmenter(checkpoint, "cpu")
    assert (segmenter.backend, segmenter.precision) == ("onnxruntime", "fp32")
    assert Segmenter(checkpoint, "cpu", precision="bf16").backend == "torch"  # emulated, and says so
    with pytest.raises(R2UNetError, match="needs a CPU with AMX or AVX-512 BF16"):  # OpenVINO would run fp32 and call it bf16
        Segmenter(checkpoint, "cpu", backend="openvino", precision="bf16")


def test_without_openvino_auto_keeps_float32(tmp_path, monkeypatch):
    import src_models.precision as precision

    monkeypatch.delenv("R2UNET_PRECISION")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_tile"}))
    monkeypatch.setattr(inference, "_openvino_available", lambda: False)
    segmenter = Segmenter(_trained(tmp_path), "cpu")
    assert (segmenter.backend, segmenter.precision) == ("onnxruntime", "fp32")  # eager bf16 is no faster than fp32


def test_scratch_folders_a_killed_process_left_are_removed(tmp_path):
    import os

    old, fresh, other = tmp_path / ".r2unet-ov-old", tmp_path / ".r2unet-ov-new", tmp_path / "keep-me"
    for folder in (old, fresh, other):
        folder.mkdir()
        (folder / "model.bin").write_bytes(b"w" * 100)
    os.utime(old, (1_700_000_000, 1_700_000_000))
    os.utime(other, (1_700_000_000, 1_700_000_000))
    openvino_backend._remove_abandoned(tmp_path)
    assert not old.exists() and fresh.exists() and other.exists()  # another process may be writing the new one
