"""Model names: shipped pretrained files are found by name and described by their own metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DRIVE, random_checkpoint

from src_models import checkpoint_files, model_names
from src_models.checkpoint import load_checkpoint
from src_models.cli import main
from src_models.errors import R2UNetError

SHIPPED = sorted(checkpoint_files.WEIGHTS_DIR.glob("*.safetensors"))


def test_catalog_reads_metadata_without_torch(tmp_path):
    import subprocess
    import sys

    random_checkpoint(tmp_path / "x.safetensors")
    probe = f"import sys; from src_models.checkpoint_files import describe; d = describe({str(tmp_path / 'x.safetensors')!r}); print(d['config']['arch'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out == ["r2unet", "False"]
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(R2UNetError, match="is not a checkpoint"):  # 0xff... is no JSON header (the fix of issue 12)
        checkpoint_files.read_metadata(tmp_path / "bad.safetensors")


def test_pretrained_models_come_from_the_weights_folder(tmp_path, monkeypatch, capsys):
    random_checkpoint(tmp_path / "toy-drive.safetensors")
    monkeypatch.setattr(checkpoint_files, "WEIGHTS_DIR", tmp_path)
    found = model_names.pretrained_models()
    assert list(found) == ["toy-drive"] and found["toy-drive"].config.arch == "r2unet"
    assert model_names.load_model("toy-drive").path == tmp_path / "toy-drive.safetensors"
    assert main(["models", "--json"]) == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)["pretrained"]] == ["toy-drive"]
    with pytest.raises(R2UNetError, match="use 'toy-drive'"):
        model_names.load_model("r2unet")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_models_are_valid_small_and_documented(path):
    assert path.stat().st_size < 10 * 1024 * 1024
    ck = load_checkpoint(path)
    split = {"drive": "DRIVE test set", "skin": "ISIC 2017 val", "lung": "CXR-Lungs test"}[path.stem.rsplit("-", 1)[-1]]
    assert set(ck.provenance["metrics"]) >= {"F1", "AUC"} and split in ck.provenance["metrics_on"]
    assert ck.model_card.metrics["F1"] == ck.provenance["metrics"]["F1"] and split in ck.model_card.metrics_on
    assert ck.provenance["command"].split()[1:3] == ["train", ck.config.arch]


@pytest.mark.drive
@pytest.mark.skipif(not DRIVE.is_dir() or not SHIPPED, reason="needs DRIVE and shipped models")
@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.endswith("-drive")], ids=lambda p: p.stem)
def test_shipped_models_segment_a_drive_test_image(path):
    from src_models.data import read_image, read_mask
    from src_models.inference import Segmenter
    from src_models.metrics import segmentation_metrics

    probs = Segmenter(load_checkpoint(path), "cpu").predict(read_image(DRIVE / "test" / "images" / "01_test.tif"))[0]
    m = segmentation_metrics(probs, read_mask(DRIVE / "test" / "1st_manual" / "01_manual1.gif"), read_mask(DRIVE / "test" / "mask" / "01_test_mask.gif"))
    assert m["F1"] > 0.75 and m["AUC"] > 0.95 and np.isfinite(probs).all()


TASK_DATA = DRIVE.parent  # ../shared/datasets
TASK_SPLITS = {"skin": ("ISIC2017/val", 0.6), "lung": ("CXR-Lungs/test", 0.95)}  # split, floor of the pooled Dice of its first 8 images (measured: skin 0.86 R2U-Net / 0.93 U-Net, lung 0.978 / 0.977)


@pytest.mark.drive
@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.rsplit("-", 1)[-1] in TASK_SPLITS], ids=lambda p: p.stem)
def test_shipped_task_models_segment_their_test_images(path):
    """The first 8 test images of the task, through the card (resize geometry, post-processing)."""
    from src_models.data import pair_files, read_image, read_mask
    from src_models.inference import Segmenter
    from src_models.metrics import confusion
    from src_models.predict import card_options, final_labels

    split, floor = TASK_SPLITS[path.stem.rsplit("-", 1)[-1]]
    if not (TASK_DATA / split).is_dir():
        pytest.skip(f"needs ../shared/datasets/{split}")
    ck = load_checkpoint(path)
    segmenter, options = Segmenter(ck, "cpu"), card_options(ck)
    total = None
    for sample in pair_files(TASK_DATA / split / "images", TASK_DATA / split / "masks")[:8]:
        probs = segmenter.predict(read_image(sample.image))
        one = confusion(final_labels(probs, options, binary=True).astype(np.float64), read_mask(sample.mask))
        total = one if total is None else total + one
    assert total.metrics()["F1"] > floor
