"""The Fine-tune widget's versions: the user's fine-tuned models, renamed, exported, re-used.

:class:`VersionsPanel` lists the versions in the per-user model folder
(:func:`src_models.user_versions.list_versions`, newest first, their summary as tooltip), renames and
exports the chosen one (the weights are never rewritten), and holds the "Export for BioImage.IO..."
and "Re-segment other images with this version" buttons, whose work (in the worker thread) the
Fine-tune widget does; the panel asks where a package goes (:meth:`VersionsPanel.package_target`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QGroupBox, QHBoxLayout, QInputDialog, QPushButton, QVBoxLayout

from src_models.errors import R2UNetError  # torch-free
from src_models.user_versions import export_destination, export_version, list_versions, rename_version


class VersionsPanel(QGroupBox):
    """The fine-tuned versions, with Rename, Export, Export for BioImage.IO and Re-segment."""

    def __init__(self, guard: Callable[[Callable[[], Any]], Any], say: Callable[[str], None],
                 renamed: Callable[[], None]) -> None:
        super().__init__("Versions")
        self._say = say
        self._renamed = renamed  # the model menus show the new name
        layout = QVBoxLayout(self)
        self.version_combo = QComboBox()
        layout.addWidget(self.version_combo)
        row = QHBoxLayout()
        self.rename_button = QPushButton("Rename...")
        self.rename_button.clicked.connect(lambda: guard(self.rename_dialog))
        self.export_button = QPushButton("Export...")
        self.export_button.clicked.connect(lambda: guard(self.export_dialog))
        row.addWidget(self.rename_button)
        row.addWidget(self.export_button)
        layout.addLayout(row)
        self.package_button = QPushButton("Export for BioImage.IO...")
        self.package_button.setToolTip("a bioimage.io model package (.zip: TorchScript and ONNX weights, the model card, "
                                       "a test image) for other bioimage.io tools")
        layout.addWidget(self.package_button)
        self.resegment_button = QPushButton("Re-segment other images with this version")
        self.resegment_button.setToolTip("adds new Labels layers for every open image not used for training; edited layers are not touched")
        layout.addWidget(self.resegment_button)
        self.refresh_versions()

    def refresh_versions(self, select: str | None = None) -> None:
        keep = select or self.version_combo.currentData()
        self.version_combo.clear()
        for version in reversed(list_versions()):
            self.version_combo.addItem(version.name, str(version.path))
            self.version_combo.setItemData(self.version_combo.count() - 1, version.summary, Qt.ToolTipRole)
        index = self.version_combo.findData(keep) if keep else -1
        self.version_combo.setCurrentIndex(max(0, index))
        self.set_busy(False)

    def set_busy(self, busy: bool) -> None:
        """No renaming, exporting or re-segmenting while a job (an export too) runs, or before there is a version."""
        has = self.version_combo.count() > 0
        for button in (self.rename_button, self.export_button, self.package_button, self.resegment_button):
            button.setEnabled(has and not busy)
        self.version_combo.setEnabled(not busy)

    def chosen_version(self) -> str:
        path = self.version_combo.currentData()
        if not path:
            raise R2UNetError("no fine-tuned version yet: press Fine-tune first")
        return str(path)

    def rename_dialog(self) -> None:
        path = self.chosen_version()
        name, ok = QInputDialog.getText(self, "Rename version", "name", text=self.version_combo.currentText())
        if ok:
            self.rename(path, name)

    def rename(self, path: str, name: str) -> None:
        rename_version(path, name)
        self.refresh_versions(select=path)
        self._renamed()

    def export_dialog(self) -> None:
        path = self.chosen_version()
        target, _ = QFileDialog.getSaveFileName(self, "Export version", Path(path).name, "Checkpoints (*.safetensors)")
        if target:
            self.export(path, target)

    def export(self, path: str, target: str) -> Path:
        # the save dialog already asked about replacing the file it names; any other file is refused
        written = export_version(path, target, overwrite=export_destination(path, target) == Path(target).expanduser())
        self._say(f"exported to {written}")
        return written

    def package_target(self) -> tuple[str, str, bool] | None:
        """Ask where the chosen version's bioimage.io package goes: ``(version, target, overwrite)``,
        None when the dialog is cancelled. The dialog asked about replacing the ``.zip`` it names; a
        name typed without the suffix gets it, and then an existing file is refused, never replaced."""
        path = self.chosen_version()
        target, _ = QFileDialog.getSaveFileName(self, "Export for BioImage.IO", f"{Path(path).stem}.zip",
                                                "bioimage.io packages (*.zip)")
        if not target:
            return None
        if target.lower().endswith(".zip"):
            return path, target, True
        return path, f"{target}.zip", False
