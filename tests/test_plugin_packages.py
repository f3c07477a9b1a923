"""bioimage.io packages in the widgets: the Versions panel's "Export for BioImage.IO..." (in the worker,
one-line messages) and packages offered by the model menu's open dialog (under Xvfb)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from conftest import random_checkpoint

from src_models.errors import R2UNetError
from src_models.user_versions import new_version_path

FOREIGN_RDF = "type: model\nformat_version: 0.5.4\nname: Someone's nuclei model\n"


@pytest.fixture
def fine(make_napari_viewer, user_models_dir):
    """The Fine-tune widget with one fine-tuned version in the (temporary) model folder."""
    random_checkpoint(new_version_path("tiny"))
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Fine-tune")
    widget.refresh_versions()
    return widget


def _save_dialog(monkeypatch, target: Path | str) -> list[tuple]:
    asked: list[tuple] = []

    def answer(*args, **kwargs):
        asked.append(args)
        return str(target), "bioimage.io packages (*.zip)"

    monkeypatch.setattr("napari_r2unet._versions_panel.QFileDialog.getSaveFileName", answer)
    return asked


@pytest.mark.gui
def test_export_for_bioimageio_runs_in_the_worker_and_says_where_or_why(fine, qtbot, monkeypatch, tmp_path):
    shown: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_info", shown.append)
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    calls: list[tuple] = []

    def fake_export(model, out, *, overwrite=False, log=None):
        calls.append((model, out, overwrite))
        log("exporting: TorchScript and ONNX")
        if Path(out).name == "broken.zip":
            raise R2UNetError("the package's preprocessing steps do not reproduce the model's normalisation; not written")
        Path(out).write_bytes(b"PK\x05\x06" + bytes(18))
        return Path(out)

    monkeypatch.setattr("src_models.bioimageio.export_package", fake_export)  # what the worker imports when it runs
    version, name = Path(fine.version_combo.currentData()), fine.version_combo.currentText()
    asked = _save_dialog(monkeypatch, tmp_path / "tiny.zip")
    fine.package_button.click()
    assert fine.running and not fine.package_button.isEnabled() and not fine.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not fine.running, timeout=30_000)
    assert asked[0][2] == f"{version.stem}.zip" and "*.zip" in asked[0][3]  # the default name, and the filter
    assert calls == [(version, tmp_path / "tiny.zip", True)]  # the dialog confirmed replacing the file it names
    assert (tmp_path / "tiny.zip").is_file()
    assert fine.status.text() == shown[-1] == f"exported {name} to {tmp_path / 'tiny.zip'}"
    assert fine.package_button.isEnabled() and fine.run_button.isEnabled()

    _save_dialog(monkeypatch, tmp_path / "broken.zip")
    fine.package_button.click()
    qtbot.waitUntil(lambda: not fine.running, timeout=30_000)
    message = "the package's preprocessing steps do not reproduce the model's normalisation; not written"
    assert fine.status.text() == shown[-1] == message  # one line, no traceback
    assert not (tmp_path / "broken.zip").exists() and fine.package_button.isEnabled()


@pytest.mark.gui
def test_a_package_name_without_zip_gets_it_and_never_replaces_a_file(fine, qtbot, monkeypatch, tmp_path):
    _save_dialog(monkeypatch, tmp_path / "shared")
    path, target, overwrite = fine.versions.package_target()
    assert (path, target, overwrite) == (fine.version_combo.currentData(), f"{tmp_path / 'shared'}.zip", False)
    (tmp_path / "shared.zip").write_bytes(b"someone else's package")  # the dialog never asked about shared.zip
    fine.package_button.click()
    qtbot.waitUntil(lambda: not fine.running, timeout=60_000)
    assert (tmp_path / "shared.zip").read_bytes() == b"someone else's package" and "already exists" in fine.status.text()
    _save_dialog(monkeypatch, "")
    assert fine.versions.package_target() is None  # cancelled


@pytest.mark.gui
def test_the_model_menu_opens_bioimageio_packages(qtbot, monkeypatch, tmp_path):
    from napari_r2unet._model_menu import ModelMenu

    errors: list[str] = []

    def guard(action):
        try:
            return action()
        except R2UNetError as exc:
            errors.append(str(exc))
            return None

    menu = ModelMenu(guard)
    qtbot.addWidget(menu)
    package = tmp_path / "nuclei.zip"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("rdf.yaml", FOREIGN_RDF)
    filters: list[str] = []

    def answer(parent, caption, folder, file_filter):
        filters.append(file_filter)
        return str(package), ""

    monkeypatch.setattr("napari_r2unet._model_menu.QFileDialog.getOpenFileName", answer)
    menu._on_activated(menu.count() - 1)  # "Load checkpoint..."
    first = filters[0].split(";;")[0]
    assert all(pattern in first for pattern in ("*.safetensors", "*.zip", "rdf.yaml", "bioimageio.yaml"))
    choice = menu.current_choice()
    assert choice.spec == str(package.resolve()) and choice.label == "nuclei.zip: Someone's nuclei model (bioimage.io)"
    assert not errors

    (tmp_path / "notes.zip").write_bytes(b"not a zip")
    package = tmp_path / "notes.zip"
    menu._on_activated(menu.count() - 1)
    assert len(errors) == 1 and "notes.zip" in errors[0] and "\n" not in errors[0]


def test_model_files_are_checkpoints_and_packages_and_name_their_versions():
    from napari_r2unet._models import file_model_name, is_model_file

    assert is_model_file("/a/m.safetensors") and is_model_file("/a/m.zip") and is_model_file("/a/unet/rdf.yaml")
    assert is_model_file("/a/unet/bioimageio.yaml") and not is_model_file("r2unet-drive")
    assert file_model_name("/a/m.zip") == "m" and file_model_name("/a/unet-nuclei/rdf.yaml") == "unet-nuclei"
    assert file_model_name("/a/v.safetensors") == "v"
