"""The model menu of both dock widgets.

:class:`ModelMenu`: a combo box of the shipped models, the user's fine-tuned versions and the
checkpoint files opened in this widget, plus "Load checkpoint..."; it re-reads the model
folders each time it opens, so a version made a moment ago is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog

from ._models import ModelChoice, all_choices, file_choice

LOAD_CHECKPOINT = "Load checkpoint..."


class ModelMenu(QComboBox):
    """Shipped models, fine-tuned versions, opened files and "Load checkpoint..."."""

    def __init__(self, guard: Callable[[Callable[[], Any]], Any]) -> None:
        super().__init__()
        self._guard = guard
        self.opened: list[ModelChoice] = []  # checkpoint files opened in this widget
        self.refresh()
        self.activated.connect(self._on_activated)

    def refresh(self, select: str | None = None) -> None:
        """Re-list every model; keep the current choice (or ``select`` a spec)."""
        keep = select if select is not None else self.currentData()
        self.blockSignals(True)
        self.clear()
        for choice in all_choices(self.opened):
            self.addItem(choice.label, choice.spec)
            self.setItemData(self.count() - 1, choice.tooltip, Qt.ToolTipRole)
        self.addItem(LOAD_CHECKPOINT, None)
        index = self.findData(keep) if keep else -1
        self.setCurrentIndex(index if index >= 0 else 0)
        self.blockSignals(False)

    def add_file(self, path: str) -> ModelChoice:
        """Offer a checkpoint file (validated from its header; weights load later) and choose it."""
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
        path, _ = QFileDialog.getOpenFileName(self, "Open a checkpoint", "", "Checkpoints (*.safetensors *.pt *.pth)")
        if path:
            self._guard(lambda: self.add_file(path))
        else:
            self.setCurrentIndex(0)
