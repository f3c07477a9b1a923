"""--precision fp32|bf16|auto: what auto picks on which CPU and card, bf16 inference against
fp32, bf16 training steps, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import PP, TINY, fast, synthetic_samples

from src_models import inference
from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.errors import R2UNetError
from src_models.inference import Segmenter
from src_models.precision import check_precision, cpu_has_native_bf16, resolve_precision
from src_models.synthetic import vessel_image
from src_models.training import TrainConfig, Trainer, make_sample

AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})
AVX2 = frozenset({"avx2", "fma"})


def test_auto_picks_bf16_only_with_native_bf16_and_a_card_that_allows_it():
    assert cpu_has_native_bf16(AMX) and cpu_has_native_bf16(frozenset({"avx512_bf16"})) and not cpu_has_native_bf16(AVX2)
    assert resolve_precision("auto", "cpu", True, AMX)[0] == "bf16"
    assert resolve_precision("auto", "cpu", True, AMX, fast=False) == ("fp32", "")  # bf16 pays only on OpenVINO or compiled
    assert resolve_precision("bf16", "cpu", True, AMX, fast=False) == ("bf16", "")  # asked for by name: bf16
    assert resolve_precision("auto", "cpu", False, AMX) == ("fp32", "")  # the card has not been validated in bf16
    assert resolve_precision("auto", "cpu", True, AVX2) == ("fp32", "")  # emulated bf16 is slower than fp32
    assert resolve_precision("auto", "cuda", False, AVX2) == ("amp", "")  # CUDA keeps its mixed precision
    assert resolve_precision("auto", "mps", True, AMX) == ("fp32", "")
    assert resolve_precision("fp32", "cuda", True, AMX) == ("fp32", "")
    precision, note = resolve_precision("bf16", "cpu", False, AVX2)
    assert precision == "bf16" and "emulated" in note
    assert resolve_precision("bf16", "cpu", False, AMX) == ("bf16", "")
    with pytest.raises(R2UNetError, match="must be one of auto, fp32, bf16"):
        check_precision("fp16")


def test_bf16_inference_agrees_with_fp32(trained_checkpoint):
    checkpoint = load_checkpoint(trained_checkpoint)
    image = vessel_image((128, 120), seed=4)[0]
    fp32 = Segmenter(checkpoint, "cpu", backend="torch", precision="fp32").predict(image)
    messages = []
    segmenter = Segmenter(checkpoint, "cpu", backend="torch", precision="bf16", log=messages.append)
    assert segmenter.backend == "torch" and segmenter.precision == "bf16"  # (OpenVINO's bf16: tests/test_openvino.py)
    bf16 = segmenter.predict(image)
    # the first block and the head run in float32 (the finest detail and the logits)
    assert type(segmenter.model.encoder[0]).__name__ == type(segmenter.model.head).__name__ == "Float32"
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    difference = np.abs(bf16 - fp32)
    # bf16 keeps 8 bits of mantissa: probabilities move by up to a few 1e-2 near 0.5 and the
    # masks by a few pixels in ten thousand; a float32 run would show 0, a broken cast ~0.5
    assert 0 < difference.max() < 0.1
    assert ((bf16 >= 0.5) == (fp32 >= 0.5)).mean() >= 0.99
    assert any("emulated" in m for m in messages) == (not cpu_has_native_bf16())


def test_the_tests_run_fp32_and_auto_follows_the_card(trained_checkpoint, tmp_path, monkeypatch):
    checkpoint = load_checkpoint(trained_checkpoint)
    assert Segmenter(checkpoint, "cpu").precision == "fp32"  # R2UNET_PRECISION=fp32 (conftest)
    allowed = tmp_path / "allowed.safetensors"
    save_checkpoint(allowed, checkpoint.state_dict, checkpoint.config, checkpoint.preprocess, checkpoint.class_names,
                    checkpoint.provenance, card=checkpoint.model_card.with_(bf16=True))
    monkeypatch.delenv("R2UNET_PRECISION")
    import src_models.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(inference, "_openvino_available", lambda: False)
    assert Segmenter(load_checkpoint(allowed), "cpu", compile=True).precision == "bf16"
    assert Segmenter(load_checkpoint(allowed), "cpu").precision == "fp32"  # eager bf16 is no faster than onnxruntime's fp32
    assert "bfloat16: validated" in "\n".join(load_checkpoint(allowed).model_card.lines())
    assert Segmenter(checkpoint, "cpu").precision == "fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2)
    assert Segmenter(load_checkpoint(allowed), "cpu").precision == "fp32"


def test_bf16_does_not_run_on_onnxruntime(tiny_checkpoint):
    with pytest.raises(R2UNetError, match="bf16 runs on the OpenVINO or PyTorch backend"):
        Segmenter(load_checkpoint(tiny_checkpoint), "cpu", precision="bf16", backend="onnxruntime")
    with pytest.raises(R2UNetError, match="must be one of"):
        Segmenter(load_checkpoint(tiny_checkpoint), "cpu", precision="half")


def test_bf16_training_steps(tmp_path):
    out = tmp_path / "bf16.safetensors"
    trainer = Trainer(TINY, PP, synthetic_samples(4), fast(val_fraction=0.25, epochs=1, steps_per_epoch=2, precision="bf16"), out)
    events = list(trainer.run())
    assert "bf16 autocast" in events[0].message
    losses = [e.loss for e in events if e.kind == "step"]
    assert losses and all(np.isfinite(losses))
    weights = load_checkpoint(out).state_dict
    assert all(t.dtype != torch.bfloat16 for t in weights.values())  # autocast: the weights stay float32
    with pytest.raises(R2UNetError, match="precision='fp16' must be fp32, bf16 or auto"):
        TrainConfig(precision="fp16")


def test_cli_precision_option(tmp_path, trained_checkpoint, capsys):
    from PIL import Image

    from src_models.cli import main

    image = tmp_path / "eye.png"
    Image.fromarray(vessel_image((96, 80), seed=2)[0]).save(image)
    assert main(["predict", str(trained_checkpoint), str(image), "--out", str(tmp_path / "out"), "--precision", "bf16"]) == 0
    assert (tmp_path / "out" / "eye.tif").is_file()
    assert main(["predict", str(trained_checkpoint), str(image), "--out", str(tmp_path / "o2"), "--precision", "bf16",
                 "--backend", "onnxruntime"]) == 1
    assert "bf16 runs on the OpenVINO or PyTorch backend" in capsys.readouterr().err


def test_auto_with_onnxruntime_by_name_keeps_fp32_and_a_cuda_fallback_runs_fp32(trained_checkpoint, tmp_path, monkeypatch):
    import src_models.precision as precision

    checkpoint = load_checkpoint(trained_checkpoint)
    allowed = tmp_path / "allowed.safetensors"
    save_checkpoint(allowed, checkpoint.state_dict, checkpoint.config, checkpoint.preprocess, checkpoint.class_names,
                    checkpoint.provenance, card=checkpoint.model_card.with_(bf16=True))
    monkeypatch.delenv("R2UNET_PRECISION")
    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX)
    segmenter = Segmenter(load_checkpoint(allowed), "cpu", backend="onnxruntime")  # auto would be bf16 here
    assert segmenter.precision == "fp32" and segmenter.backend == "onnxruntime"
    segmenter.precision = "amp"  # as on CUDA, then out of memory there
    segmenter._move_to_cpu()
    assert segmenter.precision == "fp32" and not segmenter.amp
    monkeypatch.setenv("R2UNET_PRECISION", "half")
    with pytest.raises(R2UNetError, match="R2UNET_PRECISION 'half' must be one of"):
        Segmenter(checkpoint, "cpu")


def test_a_model_trained_from_a_bf16_card_is_not_taken_as_validated(trained_checkpoint, tmp_path):
    checkpoint = load_checkpoint(trained_checkpoint)
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, checkpoint.state_dict, checkpoint.config, checkpoint.preprocess, checkpoint.class_names,
                    checkpoint.provenance, card=checkpoint.model_card.with_(bf16=True))
    out = tmp_path / "tuned.safetensors"
    samples = [make_sample(str(i), *vessel_image((64, 64), seed=i), checkpoint.preprocess) for i in range(2)]
    list(Trainer(None, None, samples, fast(epochs=1, steps_per_epoch=1), out, base=load_checkpoint(base)).run())
    assert load_checkpoint(base).model_card.bf16 and not load_checkpoint(out).model_card.bf16
    assert "bf16" not in checkpoint.model_card.to_dict()  # cards without it stay readable by older releases


def test_the_float32_first_block_hands_on_bf16_without_changing_a_value():
    """keep_float32_ends casts the first block's output to bf16 (a full-resolution float32 copy
    less in a compiled graph): whatever reads it (max pooling, the concatenation before a bf16
    1x1 conv) rounded it to bf16 anyway, so the logits are bit for bit those of a float32 hand-on."""
    import copy

    import torch

    from src_models.nets import ModelConfig, build_model
    from src_models.precision import keep_float32_ends

    torch.manual_seed(0)
    model = keep_float32_ends(build_model(ModelConfig(arch="r2unet", widths=(8, 16, 32), in_channels=3)).eval())
    float32_hand_on = copy.deepcopy(model)
    float32_hand_on.encoder[0].out_dtype = None
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encoder[0](x).dtype == torch.bfloat16 and float32_hand_on.encoder[0](x).dtype == torch.float32
        assert torch.equal(model(x).float(), float32_hand_on(x).float())
    one_level = keep_float32_ends(build_model(ModelConfig(arch="r2unet", widths=(8,))).eval())
    assert one_level.encoder[0].out_dtype is None  # its block feeds the float32 head directly: nothing to round


def test_split_bf16_recurrent_layer_keeps_more_of_its_input_than_plain_bf16():
    """The compiled bf16 path runs the first block's recurrent layers as split bf16 (inputs as
    hi + lo bf16 halves, one bf16 conv of both): float32 in and out, bf16 weights, float32 bias.
    Against the same layer with its weights rounded to bf16 (float32 arithmetic otherwise), only
    the rounding of the inputs separates it from plain bf16 autocast, and it removes about half
    of the error (measured over 6 seeds: 0.49-0.60 of plain bf16's mean error)."""
    import torch
    from conftest import with_trained_statistics

    from src_models.nets import FoldedRecurrentConv, RecurrentConv, SplitBF16RecurrentConv

    folded = FoldedRecurrentConv(with_trained_statistics(RecurrentConv(16, 2, "batch")))
    with torch.no_grad():
        for conv in folded.convs:
            conv.weight.copy_(conv.weight.to(torch.bfloat16).float())  # what either bf16 layer multiplies by
    split = SplitBF16RecurrentConv(folded)
    assert [tuple(w.shape) for w in split.weights] == [(16, 32, 3, 3)] * 3 and split.weights[0].dtype == torch.bfloat16
    assert split.biases[0].dtype == torch.float32
    x = torch.randn(1, 16, 48, 40) * 2 + 0.5
    with torch.no_grad():
        reference = folded(x)
        out = split(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = folded(x).float()
    assert out.dtype == torch.float32 and out.shape == reference.shape
    split_error, plain_error = (out - reference).abs().mean(), (plain - reference).abs().mean()
    assert 0 < split_error < 0.75 * plain_error, (split_error, plain_error)
