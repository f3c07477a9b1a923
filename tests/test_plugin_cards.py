"""The napari widgets follow the model card: menu labels and tooltips.

Every checkpoint here is a tiny random network saved with a card made in the test; results are
compared with the probabilities the same widget run stored, never with fixed values, so the
tests hold whichever geometry inference uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_checkpoint
from scipy import ndimage

from src_models import checkpoint_files
from src_models.checkpoint import save_checkpoint
from src_models.model_card import Geometry, ModelCard, Postprocess
from src_models.nets import ModelConfig, build_model
from src_models.preprocessing import PreprocessConfig
from src_models.user_versions import new_version_path

LESION = ModelCard(task="skin lesion", modality="dermoscopy", data="ISIC 2017 Challenge (synthetic stand-in made in the test)",
                   data_short="ISIC 2017", licence="CC0", channels="RGB", geometry=Geometry("resize", 32), threshold=0.3,
                   postprocess=Postprocess("largest_component", fill_holes=True))
LUNG = ModelCard(task="lung fields", modality="chest X-ray", data="chest X-ray (synthetic, made in the test)",
                 geometry=Geometry("resize", 32), threshold=0.45, postprocess=Postprocess("largest_components", count=2))


def card_checkpoint(path: Path, card: ModelCard | None, channels: str = "rgb", arch: str = "r2unet", name: str = "") -> Path:
    """A random tiny network saved with ``card`` (None: the card derived from its class names)."""
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, widths=(4, 8, 16), in_channels=3 if channels == "rgb" else 1)
    save_checkpoint(path, build_model(config), config, PreprocessConfig(channels=channels), ["lesion"], {"name": name or path.stem}, card=card)
    return path


def lesion_image(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark disc on a noisy skin-coloured RGB background, and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - size / 2) ** 2 + (xx - size / 2.5) ** 2 < (size / 4) ** 2).astype(np.uint8)
    image = rng.normal(190, 12, (size, size, 3)) * np.array([1.0, 0.8, 0.7]) - 90 * mask[..., None]
    return image.clip(0, 255).astype(np.uint8), mask


def components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask > 0, structure=np.ones((3, 3)))[1])


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """A temporary shipped-weights folder: a skin and a lung model with cards, one without a task."""
    folder = tmp_path / "weights"
    folder.mkdir()
    card_checkpoint(folder / "r2unet-skin.safetensors", LESION)
    card_checkpoint(folder / "unet-lung.safetensors", LUNG, channels="gray", arch="unet")
    random_checkpoint(folder / "toy.safetensors")
    monkeypatch.setattr(checkpoint_files, "WEIGHTS_DIR", folder)
    return folder


# -- labels and tooltips ----------------------------------------------------------------------
def test_the_shipped_drive_models_are_named_by_their_task():
    from napari_r2unet._models import builtin_choices

    labels = {c.name: c.label for c in builtin_choices()}
    assert labels["r2unet-drive"] == "R2U-Net: retinal vessels (DRIVE)"
    assert labels["runet-drive"] == "RU-Net: retinal vessels (DRIVE)" and labels["unet-drive"] == "U-Net: retinal vessels (DRIVE)"


def test_labels_come_from_the_card_not_from_a_table(weights_dir, tmp_path):
    from napari_r2unet._models import builtin_choices, file_choice, version_choices

    assert [c.label for c in builtin_choices()] == ["R2U-Net: skin lesion (ISIC 2017)", "toy", "U-Net: lung fields (chest X-ray)"]
    assert file_choice(card_checkpoint(tmp_path / "mine.safetensors", LESION)).label == "mine.safetensors: skin lesion"
    assert file_choice(random_checkpoint(tmp_path / "plain.safetensors")).label == "plain.safetensors"  # no task of its own
    card_checkpoint(new_version_path("r2unet-skin"), LESION.with_(metrics={}), name="skin v2")
    card_checkpoint(new_version_path("toy"), None, name="toy v2")
    versions = version_choices()
    assert sorted(c.label for c in versions) == ["skin v2 (fine-tuned, skin lesion)", "toy v2 (fine-tuned)"]
    assert all(c.name + " (fine-tuned" in c.label for c in versions)


def test_short_data_names_the_data_set_in_a_few_words():
    assert ModelCard(data="DRIVE: 20 training fundus photographs (565x584)").short_data == "DRIVE"
    assert ModelCard(data="JSRT (247 chest X-rays), Montgomery").short_data == "JSRT"
    assert ModelCard(data="long words, more", data_short=" ISIC 2017 ").short_data == "ISIC 2017"
    assert ModelCard().short_data == ""


@pytest.mark.gui
def test_the_menu_shows_each_card_as_tooltip_and_chooses_by_name(make_napari_viewer, weights_dir):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    menu = widget.model_combo
    index = menu.findText("R2U-Net: skin lesion (ISIC 2017)")
    assert index >= 0 and menu.itemData(index, Qt.ToolTipRole) == "\n".join(LESION.lines())
    assert "geometry: resize to 32x32" in menu.itemData(index, Qt.ToolTipRole)
    assert menu.choose("unet-lung").label == "U-Net: lung fields (chest X-ray)"
    assert menu.currentText() == "U-Net: lung fields (chest X-ray)"
    widget._guard(lambda: menu.choose("no-such-model"))
    assert "is not in the menu" in widget.status.text()
