"""The model menu of both dock widgets.

:class:`ModelMenu`: a combo box of the shipped models, the user's fine-tuned versions and the
checkpoint files and bioimage.io packages opened in this widget, plus "Load checkpoint..."; it
re-reads the model folders each time it opens, so a version made a moment ago is there. Entries are labelled and
explained by their model cards (:mod:`napari_r2unet._models`); ``chosen`` tells the widget
which :class:`ModelChoice` (card included) is now the current one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog

from src_models.errors import R2UNetError

from ._models import ModelChoice, all_choices, file_choice

LOAD_CHECKPOINT = "Load checkpoint..."
# the open dialog's filters: every model file first, then checkpoints alone and bioimage.io packages alone
MODEL_FILE_FILTERS = ";;".join((
    "Models (*.safetensors *.pt *.pth *.zip rdf.yaml bioimageio.yaml)",
    "Checkpoints (*.safetensors *.pt *.pth)",
    "bioimage.io packages (*.zip rdf.yaml bioimageio.yaml)",
))


class ModelMenu(QComboBox):
    """Shipped models, fine-tuned versions, opened files and "Load checkpoint..."."""

    chosen = Signal(object)  # the ModelChoice that became current (not emitted for "Load checkpoint...")

    def __init__(self, guard: Callable[[Callable[[], Any]], Any]) -> None:
        super().__init__()
        self._guard = guard
        self.opened: list[ModelChoice] = []  # checkpoint files opened in this widget
        self._choices: dict[str, ModelChoice] = {}
        self.refresh()
        self.activated.connect(self._on_activated)
        self.currentIndexChanged.connect(self._emit_chosen)

    def current_choice(self) -> ModelChoice | None:
        """The chosen model with its card (None while "Load checkpoint..." is current)."""
        spec = self.currentData()
        return self._choices.get(spec) if spec is not None else None

    def choose(self, model: str) -> ModelChoice:
        """Make ``model`` current: a name or path (the entry's spec), its label, or its own name."""
        for choice in self._choices.values():
            if model in (choice.spec, choice.label, choice.name):
                self.setCurrentIndex(self.findData(choice.spec))
                return choice
        raise R2UNetError(f"model {model!r} is not in the menu; choose one of: {', '.join(c.name for c in self._choices.values())}")

    def _emit_chosen(self, index: int = -1) -> None:
        choice = self.current_choice()
        if choice is not None:
            self.chosen.emit(choice)

    def refresh(self, select: str | None = None) -> None:
        """Re-list every model; keep the current choice (or ``select`` a spec)."""
        before = self.current_choice() if self.count() else None
        keep = select if select is not None else self.currentData()
        self.blockSignals(True)
        self.clear()
        self._choices = {}
        for choice in all_choices(self.opened):
            self._choices[choice.spec] = choice
            self.addItem(choice.label, choice.spec)
            self.setItemData(self.count() - 1, choice.tooltip, Qt.ToolTipRole)
        self.addItem(LOAD_CHECKPOINT, None)
        index = self.findData(keep) if keep else -1
        self.setCurrentIndex(index if index >= 0 else 0)
        self.blockSignals(False)
        now = self.current_choice()
        if now is not None and (before is None or (now.spec, now.card) != (before.spec, before.card)):
            self._emit_chosen()  # another model, or a changed card (a rename alone is not a new choice)

    def add_file(self, path: str) -> ModelChoice:
        """Offer a checkpoint file (validated from its header; weights load later) or a bioimage.io package, and choose it."""
        choice = file_choice(path)
        self.opened = [c for c in self.opened if c.spec != choice.spec] + [choice]
        self.refresh(select=choice.spec)
        return choice

    def showPopup(self) -> None:  # noqa: N802 (Qt API)
        self.refresh()
        super().showPopup()

    def _on_activated(self, index: int) -> None:
        if self.itemData(index) is not None:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Open a checkpoint", "", MODEL_FILE_FILTERS)
        if path:
            self._guard(lambda: self.add_file(path))
        else:
            self.setCurrentIndex(0)
