"""Scale normalisation: the field-of-view estimate, --scale auto|1|F, the card's training scale,
and the Segmenter running a resized image and giving probabilities at the original size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from src_models.errors import R2UNetError
from src_models.geometry import resize_planes
from src_models.model_card import ModelCard
from src_models.scale import Scale, estimate_fov_diameter, parse_scale_option, scale_factor
from src_models.synthetic import vessel_image


def fundus(side: int = 200, diameter: int = 180, seed: int = 0, crop: int = 0) -> np.ndarray:
    """``(3, H, W)`` float32: a synthetic RGB fundus disc of ``diameter`` on a noisy near-black
    border, its periphery dimmer; ``crop`` rows cut off at the top and the bottom."""
    image, _ = vessel_image((side, side), seed=seed, rgb=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    r = np.hypot(yy - side / 2, xx - side / 2) / (diameter / 2)
    disc = (r <= 1) * (1.0 - 0.6 * r**2)  # vignetting: the rim is 0.4 of the centre
    chw = image.transpose(2, 0, 1).astype(np.float32) * disc + rng.uniform(0, 6, (3, side, side))
    return chw[:, crop : side - crop] if crop else chw


def test_fov_diameter_of_discs_cropped_or_not():
    assert estimate_fov_diameter(fundus(200, 180)) == pytest.approx(180, abs=3)
    assert estimate_fov_diameter(fundus(200, 150, seed=1)) == pytest.approx(150, abs=3)
    # a disc cut at the top and bottom (as many cameras crop it) keeps its width
    assert estimate_fov_diameter(fundus(200, 190, crop=30)) == pytest.approx(190, abs=3)
    # a large image is measured on a reduced copy, still to about a pixel of the copy
    assert estimate_fov_diameter(fundus(1200, 1000)) == pytest.approx(1000, abs=8)


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.7])
def test_fov_diameter_follows_a_rescaled_image(factor):
    chw = fundus(240, 210, seed=2)
    shape = (round(240 * factor), round(240 * factor))
    rescaled = resize_planes(chw, shape, order=1, anti_aliasing=factor < 1)
    assert estimate_fov_diameter(rescaled) == pytest.approx(210 * factor, rel=0.03)


def test_no_fov_without_a_dark_border():
    image, _ = vessel_image((120, 160), rgb=True)
    assert estimate_fov_diameter(image.transpose(2, 0, 1).astype(np.float32)) is None  # a crop inside the disc
    assert estimate_fov_diameter(np.zeros((1, 64, 64), np.float32)) is None  # blank
    assert estimate_fov_diameter(np.full((3, 64, 64), 200, np.float32)) is None


def test_scale_option_and_factor():
    reference = Scale("fov_diameter", 180.0)
    assert parse_scale_option("auto") == "auto" and parse_scale_option(" Auto ") == "auto"
    assert parse_scale_option("1") == 1.0 and parse_scale_option(0.6) == 0.6
    for bad in ("big", "0", "-1", "nan", "100"):
        with pytest.raises(R2UNetError, match="must be 'auto' or a factor"):
            parse_scale_option(bad)
    assert scale_factor("auto", reference, fundus(200, 180)) == (1.0, "")  # at the training scale
    assert scale_factor("auto", reference, fundus(200, 190)) == (1.0, "")  # within 10 %: left native
    factor, why = scale_factor("auto", reference, fundus(330, 300))
    assert factor == pytest.approx(0.6, abs=0.02) and "resized x0.6" in why and "the model's 180" in why
    assert scale_factor("auto", Scale(), fundus(330, 300)) == (1.0, "")  # a card without a scale: native
    image, _ = vessel_image((120, 160), rgb=True)
    factor, why = scale_factor("auto", reference, image.transpose(2, 0, 1))
    assert factor == 1.0 and "no field of view" in why
    assert scale_factor("1", reference, fundus(330, 300)) == (1.0, "")  # native, as asked
    assert scale_factor("0.5", reference, fundus(200, 180))[0] == 0.5


def test_card_scale_round_trip_and_checks():
    card = ModelCard(task="retinal vessels", scale=Scale("fov_diameter", 540))
    again = ModelCard.from_json(card.to_json())
    assert again.scale == Scale("fov_diameter", 540.0) and any(line.startswith("scale: field of view 540 px") for line in again.lines())
    assert ModelCard.from_dict({"task": "x"}).scale == Scale()  # a card saved before scales: native
    assert not any(line.startswith("scale:") for line in ModelCard().lines())
    for bad in ({"kind": "zoom"}, {"kind": "fov_diameter", "value": 3}, {"kind": "fov_diameter"},
                {"kind": "none", "value": 100}, {"kind": "fov_diameter", "value": True}, {"size": 1}):
        with pytest.raises(ValueError):
            ModelCard.from_dict({"scale": bad})


def _tiny_checkpoint(scale: Scale):
    import torch

    from src_models.checkpoint import Checkpoint
    from src_models.nets import ModelConfig, build_model
    from src_models.preprocessing import PreprocessConfig

    config = ModelConfig(arch="unet", in_channels=1, widths=(4, 8))
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    return Checkpoint(config, state, PreprocessConfig(channels="green"), ("vessel",), {"name": "tiny"}, None, "0" * 64,
                      ModelCard(task="vessels", scale=scale))


def test_segmenter_runs_at_the_training_scale_and_answers_at_the_original_size(monkeypatch):
    from src_models.inference import Segmenter

    checkpoint = _tiny_checkpoint(Scale("fov_diameter", 100.0))
    logged: list[str] = []
    seen: list[tuple[int, ...]] = []
    segmenter = Segmenter(checkpoint, device="cpu", backend="torch", log=logged.append)
    tiled = segmenter._predict_tiled

    def record(chw, *args, **kwargs):
        seen.append(tuple(chw.shape))
        return tiled(chw, *args, **kwargs)

    monkeypatch.setattr(segmenter, "_predict_tiled", record)
    image = fundus(180, 170).transpose(1, 2, 0)  # (H, W, 3), FOV 1.7x the training one
    probs = segmenter.predict(image)
    assert probs.shape == (1, 180, 180) and np.isfinite(probs).all() and 0 <= probs.min() <= probs.max() <= 1
    assert seen[-1][1:] == pytest.approx((106, 106), abs=2)  # the network saw it at the training scale
    assert logged and "resized x0.5" in logged[-1] and "the model's 100" in logged[-1]
    native = Segmenter(checkpoint, device="cpu", backend="torch", scale="1")
    monkeypatch.setattr(native, "_predict_tiled", record)
    assert native.predict(image).shape == (1, 180, 180) and seen[-1][1:] == (180, 180)
    plain = dataclasses.replace(checkpoint, card=ModelCard(task="vessels"))  # no training scale: native
    unscaled = Segmenter(plain, device="cpu", backend="torch")
    monkeypatch.setattr(unscaled, "_predict_tiled", record)
    unscaled.predict(image)
    assert seen[-1][1:] == (180, 180)
    with pytest.raises(R2UNetError, match="--scale"):
        Segmenter(checkpoint, device="cpu", backend="torch", scale="tiny")


def test_train_records_the_training_scale_and_predict_takes_scale(tmp_path, capsys):
    from PIL import Image

    from src_models.checkpoint import load_checkpoint
    from src_models.cli import main

    for name in ("images", "masks", "flat"):
        (tmp_path / name).mkdir()
    for i in range(2):
        chw = fundus(96, 80 + 4 * i, seed=i)
        Image.fromarray(chw.transpose(1, 2, 0).clip(0, 255).astype(np.uint8)).save(tmp_path / "images" / f"f{i}.png")
        Image.fromarray((chw[1] < 60).astype(np.uint8) * 255).save(tmp_path / "masks" / f"f{i}.png")
        Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(tmp_path / "flat" / f"f{i}.png")
    out = tmp_path / "m.safetensors"
    common = ["train", "unet", "--widths", "4,8", "--patch-size", "32", "--epochs", "1", "--steps-per-epoch", "1",
              "--batch-size", "2", "--masks", str(tmp_path / "masks")]
    assert main([*common, "--images", str(tmp_path / "images"), "--out", str(out), "--fov-diameter", "auto"]) == 0
    assert load_checkpoint(out).model_card.scale.value == pytest.approx(82, abs=3)  # the median of 80 and 84
    capsys.readouterr()
    assert main([*common, "--images", str(tmp_path / "flat"), "--out", str(tmp_path / "x.safetensors"), "--fov-diameter", "auto"]) != 0
    err = capsys.readouterr().err
    assert "no field of view" in err and "--fov-diameter PIXELS" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["predict", str(out), str(tmp_path / "images"), "--out", str(tmp_path / "pred"), "--scale", "2"]) == 0
    assert main(["predict", str(out), str(tmp_path / "images"), "--out", str(tmp_path / "bad"), "--scale", "big"]) != 0
    err = capsys.readouterr().err
    assert "--scale 'big' must be 'auto' or a factor" in err and "Traceback" not in err and not (tmp_path / "bad").exists()


def test_fine_tuning_trains_at_the_scale_inference_runs(tmp_path):
    from src_models.finetune import FinetuneRequest, PairData, build_samples

    checkpoint = _tiny_checkpoint(Scale("fov_diameter", 100.0))
    image = fundus(180, 170).transpose(1, 2, 0)
    mask = (image[..., 1] < 60).astype(np.uint8)
    changed = np.zeros(mask.shape, bool)
    changed[40:60, 40:60] = True
    pair = PairData("p", image, -1, mask, changed)
    request = FinetuneRequest(base=checkpoint, pairs=[pair], out=tmp_path / "v.safetensors", name="v")
    (sample,), _ = build_samples(request, checkpoint, request.config())
    assert sample.image.shape[1:] == sample.mask.shape == sample.weight.shape == pytest.approx((106, 106), abs=2)
    assert set(np.unique(sample.mask)) <= {0, 1} and sample.weight.max() == request.config().correction_weight
    near = dataclasses.replace(checkpoint, card=ModelCard(task="vessels"))  # no training scale: native pixels
    (native,), _ = build_samples(request, near, request.config())
    assert native.mask.shape == (180, 180) and np.array_equal(native.mask, mask)


def test_the_same_scale_notice_is_said_once():
    from src_models.inference import Segmenter

    logged: list[str] = []
    segmenter = Segmenter(_tiny_checkpoint(Scale("fov_diameter", 100.0)), device="cpu", backend="torch", log=logged.append)
    image, _ = vessel_image((64, 64))  # no dark border: no field of view to measure
    segmenter.predict_stack(np.stack([image] * 3))
    assert len(logged) == 1 and "no field of view" in logged[0]


def test_fov_estimate_imports_neither_scipy_nor_numpy_ma():
    """A fresh process's first image estimates the FOV: scipy (0.4 s) and numpy.ma (17-27 ms,
    which np.unique and np.percentile import on first use) would be paid by it."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys, numpy as np; from src_models.scale import estimate_fov_diameter; "
             "yy, xx = np.mgrid[:200, :200]; r = np.hypot(yy - 100, xx - 100) / 90; "  # a vignetted disc on a noisy black border
             "chw = np.stack([(r <= 1) * 200 * (1 - 0.6 * r**2) + np.random.default_rng(0).uniform(0, 6, (200, 200))] * 3); "
             "print(round(estimate_fov_diameter(chw.astype(np.float32))), sorted(m for m in ('scipy', 'numpy.ma') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    diameter, imported = result.stdout.split(maxsplit=1)
    assert abs(int(diameter) - 180) <= 3 and imported.strip() == "[]"
