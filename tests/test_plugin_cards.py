"""The napari widgets follow the model card: menu labels and tooltips, the threshold, the
post-processing checkbox, the channel notice, and fine-tuning a resize-geometry model.

Every checkpoint here is a tiny random network saved with a card made in the test; results are
compared with the probabilities the same widget run stored, never with fixed values, so the
tests hold whichever geometry inference uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import docked_finetune, random_checkpoint, run_to_end
from scipy import ndimage

from src_models import checkpoint_files
from src_models.checkpoint import save_checkpoint
from src_models.model_card import Geometry, ModelCard, Postprocess
from src_models.nets import ModelConfig, build_model
from src_models.postprocess import apply_postprocess
from src_models.preprocessing import PreprocessConfig, input_notice
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


# -- threshold, post-processing, channel notice ---------------------------------------------------
@pytest.fixture
def lesion_widget(make_napari_viewer, weights_dir):
    viewer = make_napari_viewer(show=True)
    image, _ = lesion_image(64)
    viewer.add_image(image, name="skin", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    widget.model_combo.choose("r2unet-skin")
    widget.image_combo.setCurrentText("skin")
    return widget


@pytest.mark.gui
def test_choosing_a_model_sets_the_threshold_and_the_post_process_box_from_its_card(lesion_widget, qtbot):
    widget = lesion_widget
    assert widget.threshold == LESION.threshold and widget.threshold_label.text() == "0.30"
    assert widget.post_check.isEnabled() and widget.post_check.isChecked()
    assert widget.post_check.text() == "post-process: largest component, holes filled"
    assert "largest component, holes filled" in widget.post_check.toolTip()
    widget.model_combo.choose("toy")  # a card without post-processing
    assert widget.threshold == 0.5 and not widget.post_check.isEnabled() and not widget.post_check.isChecked()
    widget.model_combo.choose("unet-lung")
    assert widget.threshold == LUNG.threshold and widget.post_check.text() == "post-process: 2 largest components"
    widget.model_combo.choose("r2unet-skin")
    run_to_end(widget, qtbot)
    layer = widget.viewer.layers["skin [r2unet-skin]"]
    assert layer.metadata["r2unet"]["threshold"] == LESION.threshold


@pytest.mark.gui
def test_the_post_process_box_removes_a_second_component_and_unticking_restores_it(lesion_widget, qtbot):
    widget = lesion_widget
    run_to_end(widget, qtbot)
    layer = widget.viewer.layers["skin [r2unet-skin]"]
    probs = layer.metadata["r2unet"]["probabilities"][0].astype(np.float32)
    value = next(v for v in range(5, 96) if components(probs >= v / 100) >= 2)  # a threshold with several components
    widget.threshold_slider.setValue(value)  # a slider move re-applies the post-processing
    raw = (probs >= value / 100).astype(np.uint8)
    assert components(raw) >= 2 and components(layer.data) == 1
    assert np.array_equal(layer.data, apply_postprocess(raw, LESION.postprocess))
    widget.post_check.setChecked(False)
    assert np.array_equal(layer.data, raw) and "removed from" in widget.status.text()
    far = np.nonzero(layer.data == 0)
    painted = (far[0][:5], far[1][:5])
    layer.data_setitem(painted, 2)  # the user's brush: kept whatever the box says
    widget.post_check.setChecked(True)
    assert (layer.data[painted] == 2).all()
    kept = layer.data != 2
    assert np.array_equal(layer.data[kept], apply_postprocess(raw, LESION.postprocess)[kept])
    widget.post_check.setChecked(False)  # unticking gives the thresholded mask back (edits still kept)
    assert np.array_equal(layer.data[kept], raw[kept]) and (layer.data[painted] == 2).all()


@pytest.mark.gui
def test_unticked_post_processing_is_the_next_segmentations_too(lesion_widget, qtbot, monkeypatch):
    widget = lesion_widget
    probs = np.zeros((1, 64, 64), np.float32)
    probs[0, 5:25, 5:25], probs[0, 40:44, 40:44] = 0.9, 0.6  # a lesion and a speck: the card would keep the lesion alone
    monkeypatch.setattr("napari_r2unet._segment_widget.segment", lambda *args: (probs, "r2unet-skin"))
    widget.threshold_slider.setValue(40)  # no result layer yet: for the next segmentation
    widget.post_check.setChecked(False)
    assert "for the next segmentation" in widget.status.text()
    run_to_end(widget, qtbot)
    layer = widget.viewer.layers["skin [r2unet-skin]"]
    assert components(layer.data) == 2 and np.array_equal(layer.data, (probs[0] >= widget.threshold).astype(np.uint8))
    assert layer.metadata["r2unet"]["postprocessed"] is False and not widget.post_check.isChecked()


@pytest.mark.gui
def test_a_gray_image_on_an_rgb_model_segments_with_one_notice(lesion_widget, qtbot, monkeypatch):
    widget, viewer = lesion_widget, lesion_widget.viewer
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_info", shown.append)
    run_to_end(widget, qtbot)  # an RGB image on an RGB model: nothing to say
    assert not shown and "Note:" not in widget.status.text()
    viewer.add_image(lesion_image(64, seed=1)[0][..., 0], name="gray")
    widget.image_combo.setCurrentText("gray")
    run_to_end(widget, qtbot)
    expected = input_notice(1, PreprocessConfig(channels="rgb"), "skin lesion")
    assert shown == [expected] and "gray image was repeated to 3 channels" in expected
    assert expected in widget.status.text()
    layer = viewer.layers["gray [r2unet-skin]"]
    probs = layer.metadata["r2unet"]["probabilities"][0].astype(np.float32)
    assert layer.data.shape == (64, 64)
    assert np.array_equal(layer.data, apply_postprocess((probs >= widget.threshold).astype(np.uint8), LESION.postprocess))
    run_to_end(widget, qtbot)  # the same image and model again: the status says it, no second notification
    assert shown == [expected] and expected in widget.status.text()


# -- fine-tuning a resize-geometry model ---------------------------------------------------------
@pytest.mark.gui
def test_the_settings_panel_leaves_geometry_to_the_card(qtbot, weights_dir):
    from napari_r2unet._settings_panel import SettingsPanel
    from src_models.training.config import setting

    panel = SettingsPanel(lambda action: action())
    qtbot.addWidget(panel)
    assert not {"geometry", "rotate", "scale", "rot90"} & set(panel.editors)
    patch = panel.editors["patch_size"]
    assert panel.base_combo.currentText() == "R2U-Net: skin lesion (ISIC 2017)" and not patch.isEnabled()  # the first model
    panel.base_combo.choose("toy")
    assert patch.isEnabled()
    patch.setValue(80)
    panel.base_combo.choose("r2unet-skin")
    assert not patch.isEnabled() and patch.value() == 32 and "card fixes the training size" in patch.toolTip()
    assert "patch_size" not in panel.advanced_settings()
    panel.base_combo.choose("toy")  # a tiled model trains on patches again, of the size the user chose
    assert patch.isEnabled() and patch.value() == 80 and patch.toolTip() == setting("patch_size")["help"]
    assert panel.advanced_settings()["patch_size"] == 80


@pytest.mark.gui
def test_fine_tuning_a_resize_card_model_runs_to_a_new_version(make_napari_viewer, weights_dir, qtbot):
    from src_models.user_versions import list_versions

    viewer = make_napari_viewer()
    image, mask = lesion_image(64)
    viewer.add_image(image, name="skin", rgb=True)
    viewer.add_labels(mask, name="skin lesion drawn")
    fine = docked_finetune(viewer, "r2unet-skin", "skin lesion drawn")
    fine.epochs_spin.setValue(1)
    fine.steps_spin.setValue(2)
    fine.minutes_spin.setValue(0)
    assert not fine.patch_spin.isEnabled()
    events = []
    fine._bridge.event.connect(events.append)
    fine.start()
    qtbot.waitUntil(lambda: not fine.running, timeout=120_000)
    assert events and events[-1].kind == "done", fine.status.text()
    (version,) = list_versions()
    entry = checkpoint_files.describe(version.path)
    assert entry["card"].geometry == Geometry("resize", 32) and entry["card"].postprocess == LESION.postprocess
    assert re.fullmatch(r"r2unet-skin ft \d\d-\d\d \d\d:\d\d, 1 image", version.name)  # no validation: no score
    assert fine.base_combo.findText(f"{version.name} (fine-tuned, skin lesion)") >= 0


@pytest.mark.gui
def test_resegmenting_applies_the_versions_card(make_napari_viewer, weights_dir, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="other")
    full = "unet-lung ft 12-02 21:05, 1 image, val Dice 0.812"
    card_checkpoint(new_version_path("unet-lung"), LUNG, channels="gray", arch="unet", name=full)
    _, fine = viewer.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune")
    probs = np.zeros((1, 32, 32), np.float32)
    probs[0, 2:12, 2:12], probs[0, 2:12, 20:30], probs[0, 25:27, 5:7] = 0.9, 0.8, 0.7  # two lungs and a speck
    monkeypatch.setattr("napari_r2unet._worker.segment", lambda cache, spec, device, job, *rest: (probs, "v"))
    fine.resegment()
    qtbot.waitUntil(lambda: not fine.running, timeout=10_000)
    layer = [layer for layer in viewer.layers if "r2unet" in layer.metadata][-1]
    assert layer.metadata["r2unet"]["threshold"] == LUNG.threshold  # no Segment widget: the card's threshold
    assert [x.name for x in viewer.layers] == ["other", "other [unet-lung ft 12-02 21:05]"]  # a short name, no uncertainty layer
    assert layer.metadata["r2unet"]["model"] == full and "probabilities" in layer.metadata["r2unet"]  # "Next doubtful region" still works
    raw = (probs[0] >= LUNG.threshold).astype(np.uint8)
    assert components(raw) == 3 and components(layer.data) == 2 and layer.data[25:27, 5:7].max() == 0
