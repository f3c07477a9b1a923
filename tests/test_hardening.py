"""Regression tests for problems found in review: mutation, overwrites, hostile files, odd layouts."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import tifffile
import torch
from conftest import random_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.cli import main
from src_models.errors import R2UNetError
from src_models.inference import Segmenter
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig, preprocess


def test_inference_never_modifies_the_callers_image(tmp_path):
    path = tmp_path / "all.safetensors"
    config = ModelConfig(widths=(4, 8), in_channels=1)
    save_checkpoint(path, build_model(config), config, PreprocessConfig(channels="all"), ["fg"])
    image = np.random.default_rng(0).normal(100, 30, (96, 80)).astype(np.float32)
    before = image.copy()
    Segmenter(load_checkpoint(path), "cpu").predict(image, channel_axis=None, tile=32, overlap=0.5)
    assert np.array_equal(image, before)


def test_overlapping_bands_are_normalised_once(tmp_path):
    from src_models.preprocessing import measure_stats, normalize_tile, to_chw
    from src_models.tiling import sliding_window_inference

    image = np.random.default_rng(1).normal(100, 30, (70, 50)).astype(np.float32)
    config = PreprocessConfig(channels="all")
    chw = to_chw(image, None)
    stats = measure_stats(chw, config)
    out = sliding_window_inference(chw, 32, 2, lambda b: b, 0.5, transform=lambda band: normalize_tile(band, stats, config))
    assert np.allclose(out, preprocess(image, config, None), atol=1e-6)


def test_predict_refuses_to_overwrite_its_inputs(tmp_path, tiny_checkpoint, capsys):
    image = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", image)
    assert main(["predict", str(tiny_checkpoint), str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert np.array_equal(tifffile.imread(tmp_path / "a.tif"), image)
    tifffile.imwrite(tmp_path / "a_prob.tif", image)
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "a.tif"), str(tmp_path / "a_prob.tif"), "--out", str(tmp_path / "o"), "--save-prob"]) == 1
    assert "would both write" in capsys.readouterr().err


def _rewrite(src, dst, metadata=None, tensors=None):
    with safe_open(str(src), "pt") as handle:
        meta = dict(handle.metadata())
        data = {k: handle.get_tensor(k) for k in handle.keys()}
    meta.update(metadata or {})
    data.update(tensors or {})
    save_file(data, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize(
    "config",
    [{"arch": "r2unet", "widths": [1e999]}, {"arch": "r2unet", "widths": [2**40, 2**40]}, {"arch": "r2unet", "widths": [10**30]},
     {"arch": "r2unet", "widths": "16"}, {"arch": "r2unet", "t": True}, {"arch": "r2unet", "in_channels": 10**9}],
)
def test_hostile_configs_are_refused(tmp_path, tiny_checkpoint, config):
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad.safetensors", {"config": json.dumps(config)})
    with pytest.raises(R2UNetError, match="cannot load checkpoint"):
        load_checkpoint(bad)


def test_deeply_nested_provenance_is_refused(tmp_path, tiny_checkpoint):
    bad = _rewrite(tiny_checkpoint, tmp_path / "deep.safetensors", {"provenance": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(R2UNetError, match="cannot load checkpoint"):
        load_checkpoint(bad)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.float8_e4m3fn])
def test_unexpected_weight_dtypes_are_refused(tmp_path, tiny_checkpoint, dtype):
    ck = load_checkpoint(tiny_checkpoint)
    bad = _rewrite(tiny_checkpoint, tmp_path / "dtype.safetensors", tensors={"head.weight": ck.state_dict["head.weight"].to(dtype)})
    with pytest.raises(R2UNetError, match="dtype"):
        load_checkpoint(bad)


def test_compressed_pt_zip_is_refused_before_inflating(tmp_path):
    config = ModelConfig(widths=(4, 8))
    path = tmp_path / "bomb.pt"
    torch.save({"config": config.to_dict(), "state_dict": build_model(config).state_dict()}, str(path))
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "z.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(R2UNetError, match="zip bomb"):
        load_checkpoint(tmp_path / "z.pt")


@pytest.mark.parametrize(("names", "message"), [(5, "class_names"), (["a", "b", "c"], "class_names")])
def test_legacy_class_names_are_checked(tmp_path, names, message):
    config = ModelConfig(widths=(4, 8))
    path = tmp_path / "old.pt"
    torch.save({"config": config.to_dict(), "state_dict": build_model(config).state_dict(), "class_names": names}, str(path))
    with pytest.raises(R2UNetError, match=message):
        load_checkpoint(path)
    torch.save({"config": config.to_dict(), "state_dict": {1: torch.zeros(1)}}, str(path))
    with pytest.raises(R2UNetError, match="mapping of names"):
        load_checkpoint(path)


@pytest.mark.parametrize("shape", [(1, 1), (10, 10), (17, 3)])
def test_instance_norm_models_take_tiny_images(shape):
    model = build_model(ModelConfig(widths=(4, 8, 8, 8, 8), norm="instance")).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 1, *shape)).shape == (1, 1, *shape)


def test_gray_plus_alpha_ignores_alpha():
    gray = np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)
    alpha = np.zeros_like(gray)
    alpha[:, :5] = 255
    for mode in ("gray", "green", "rgb"):
        assert np.array_equal(preprocess(np.stack([gray, alpha], -1), PreprocessConfig(channels=mode)), preprocess(gray, PreprocessConfig(channels=mode)))


def test_sparse_images_are_not_binarised():
    image = np.zeros((100, 100), np.uint16)
    image[0, :50] = np.arange(50) * 1000
    out = preprocess(image, PreprocessConfig(channels="gray"))
    assert len(np.unique(out)) > 10 and out.max() <= 2.0


def test_many_channel_images_are_explained(tmp_path, tiny_checkpoint, capsys):
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((40, 50, 5), np.uint8))
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "m.tif"), "--out", str(tmp_path / "o")]) == 1
    assert "5-channel image" in capsys.readouterr().err
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "m.tif"), "--out", str(tmp_path / "o"), "--stack"]) == 0


def test_evaluate_accepts_planar_images(tmp_path, capsys):
    from PIL import Image

    ckpt = random_checkpoint(tmp_path / "c.safetensors")
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    tifffile.imwrite(tmp_path / "i" / "1.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8), photometric="rgb", planarconfig="separate")
    Image.fromarray((np.eye(64) * 255).astype(np.uint8)).save(tmp_path / "m" / "1.png")
    assert main(["evaluate", str(ckpt), "--images", str(tmp_path / "i"), "--masks", str(tmp_path / "m")]) == 0, capsys.readouterr().err


def test_a_folder_named_like_an_architecture_does_not_hide_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unet").mkdir()
    assert main(["predict", "unet", "x.png", "--out", "o"]) == 1
    assert "architecture without trained weights" in capsys.readouterr().err
