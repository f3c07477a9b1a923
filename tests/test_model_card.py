"""Model cards: validation, JSON round trip, stored in checkpoints, derived for older ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from src_models import checkpoint_files
from src_models.checkpoint import load_checkpoint, save_checkpoint
from src_models.errors import R2UNetError
from src_models.model_card import Geometry, ModelCard, Postprocess, derived_card
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig
from src_models.settings import DEFAULT_THRESHOLD

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(arch="unet", widths=(4, 8))
LESION = ModelCard(task="skin lesion", modality="dermoscopy", data="synthetic lesions (made in the test)",
                   licence="CC0", channels="RGB, percentile normalisation",
                   geometry=Geometry("resize", 64), threshold=0.4,
                   postprocess=Postprocess("largest_component", fill_holes=True),
                   metrics={"JS": 0.8}, metrics_on="synthetic test set")


def test_defaults_are_tiled_with_the_settings_threshold():
    card = ModelCard()
    assert card.geometry == Geometry("tiled") and card.threshold == DEFAULT_THRESHOLD
    assert not card.postprocess.active


def test_json_round_trip():
    assert ModelCard.from_json(LESION.to_json()) == LESION
    assert json.loads(LESION.to_json())["geometry"] == {"kind": "resize", "size": 64}
    assert ModelCard.from_dict({"task": "lungs"}) == ModelCard(task="lungs")


@pytest.mark.parametrize("data, word", [
    ({"geometry": {"kind": "warp"}}, "warp"),
    ({"geometry": {"kind": "resize"}}, "size"),
    ({"geometry": {"kind": "resize", "size": 8}}, "size"),
    ({"geometry": {"kind": "tiled", "size": 64}}, "no size"),
    ({"geometry": {"kind": "tiled", "tile": 3}}, "unknown"),
    ({"postprocess": {"kind": "erode"}}, "erode"),
    ({"postprocess": {"kind": "largest_components", "count": 0}}, "count"),
    ({"postprocess": {"kind": "largest_component", "count": 2}}, "largest_components"),
    ({"postprocess": {"fill_holes": "yes"}}, "fill_holes"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": True}, "threshold"),
    ({"metrics": {"F1": "high"}}, "metrics"),
    ({"task": 3}, "task"),
    ({"colour": "rgb"}, "unknown"),
    ([], "object"),
])
def test_bad_cards_are_refused_with_the_reason(data, word):
    with pytest.raises(ValueError, match=word):
        ModelCard.from_dict(data)


def test_lines_name_every_filled_field():
    text = "\n".join(LESION.lines())
    for word in ("skin lesion", "dermoscopy", "resize to 64x64", "0.4", "largest component, holes filled", "CC0", "JS 0.8"):
        assert word in text
    assert ModelCard().lines() == ["geometry: tiled (native resolution)", "threshold: 0.5", "postprocess: none"]


def test_save_stores_the_card_and_load_reads_it(tmp_path):
    path = tmp_path / "lesion.safetensors"
    save_checkpoint(path, build_model(TINY), TINY, PreprocessConfig(channels="rgb"), ["lesion"], {"name": "lesion"}, card=LESION)
    assert load_checkpoint(path).model_card == LESION
    assert checkpoint_files.describe(path)["card"] == LESION


def test_without_a_card_the_saved_card_is_derived(tmp_path):
    path = tmp_path / "v.safetensors"
    save_checkpoint(path, build_model(TINY), TINY, PreprocessConfig(), ["vessel"],
                    {"metrics": {"F1": 0.8}, "license": "BSD", "description": "synthetic vessels"})
    card = load_checkpoint(path).model_card
    assert card.task == "vessel" and card.geometry.kind == "tiled" and card.metrics == {"F1": 0.8}
    assert card.licence == "BSD" and card.data == "synthetic vessels" and card.threshold == DEFAULT_THRESHOLD


def _drop_card(path: Path) -> None:
    """Rewrite a checkpoint as an older version wrote it: the same weights, no ``card`` key."""
    meta = checkpoint_files.read_metadata(path)
    del meta["card"]
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_an_old_checkpoint_without_a_card_gets_a_derived_one(tmp_path):
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, build_model(TINY), TINY, PreprocessConfig(), ["vessel"], {"metrics": {"F1": 0.7}})
    _drop_card(path)
    expected = derived_card(["vessel"], {"metrics": {"F1": 0.7}}, PreprocessConfig().to_dict())
    assert checkpoint_files.describe(path)["card"].metrics == expected.metrics == {"F1": 0.7}
    assert load_checkpoint(path).model_card.geometry == Geometry("tiled")


def test_an_invalid_card_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, build_model(TINY), TINY, PreprocessConfig(), ["vessel"])
    meta = checkpoint_files.read_metadata(path)
    meta["card"] = json.dumps({"geometry": {"kind": "warp"}})
    save_file(load_file(str(path)), str(path), metadata=meta)
    for call in (load_checkpoint, checkpoint_files.describe):
        with pytest.raises(R2UNetError, match="card") as exc:
            call(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)


SHIPPED_TASKS = {  # the file-name suffix -> task, modality, geometry kind, data, post-processing, test Dice floor
    "drive": ("retinal vessels", "fundus photograph", "tiled", "DRIVE", "none", 0.8),
    "skin": ("skin lesion", "dermoscopy (RGB photograph)", "resize", "ISIC 2017", "largest_component", 0.6),
    "lung": ("lung fields", "chest X-ray (frontal)", "resize", "CXR-Lungs", "largest_components", 0.9),
}


def test_shipped_models_describe_their_task():
    catalog = checkpoint_files.pretrained_catalog()
    assert catalog and all(name.rsplit("-", 1)[-1] in SHIPPED_TASKS for name in catalog)
    for name, entry in catalog.items():
        card = entry["card"]
        task, modality, geometry, data, post, floor = SHIPPED_TASKS[name.rsplit("-", 1)[-1]]
        assert (card.task, card.modality, card.geometry.kind, card.postprocess.kind) == (task, modality, geometry, post), name
        assert data in card.data and card.licence and card.metrics["F1"] > floor and card.metrics_on, name
        if geometry == "resize":  # lesion and lungs: whole images at the training size, holes filled
            assert card.geometry.size and card.postprocess.fill_holes and card.short_data, name


def test_model_card_and_describe_are_torch_free():
    probe = ("import sys; from src_models import model_card, checkpoint_files; "
             "[e['card'] for e in checkpoint_files.pretrained_catalog().values()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_a_card_can_ask_for_test_time_augmentation(tmp_path, capsys):
    from src_models.checkpoint import load_checkpoint, save_checkpoint
    from src_models.inference import Segmenter
    from src_models.nets import ModelConfig, build_model
    from src_models.preprocessing import PreprocessConfig

    assert ModelCard().tta is False and "test-time augmentation: mean of the 4 flips" in ModelCard(tta=True).lines()
    with pytest.raises(ValueError, match="tta"):
        ModelCard.from_dict({"tta": "yes"})
    config = ModelConfig(arch="unet", in_channels=1, widths=(4, 8))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, build_model(config).state_dict(), config, PreprocessConfig(channels="gray"), ["x"], {}, card=ModelCard(tta=True))
    ck = load_checkpoint(path)
    assert Segmenter(ck, "cpu", backend="torch").tta is True  # as the card says
    assert Segmenter(ck, "cpu", backend="torch", tta=False).tta is False  # --no-tta
    from PIL import Image

    from src_models.cli import main

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "o1")]) == 0
    assert main(["predict", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "o2"), "--no-tta"]) == 0
    out = capsys.readouterr().out
    assert "test-time augmentation: mean of 4 flips (the model card)" in out and "test-time augmentation: off (--no-tta)" in out
