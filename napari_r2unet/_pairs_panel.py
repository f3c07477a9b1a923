"""The Fine-tune widget's training pairs: which corrected Labels layers to learn from, and validation.

:class:`PairsPanel` lists every Labels layer that has an image to train with
(:func:`~napari_r2unet._finetune.candidate_pairs`), each with a tick box and its count of
corrected pixels (brush strokes update it, at most about three times a second); the user can
pair a layer with another image of its shape, tick every layer with corrections at once, and
choose what to hold out for validation (nothing, 20% of each image, or one of the ticked pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
)

from ._finetune import FinetuneRequest, PairChoice, candidate_pairs, matching_images

HOLDOUT_FRACTION = next(f.default for f in dataclasses.fields(FinetuneRequest) if f.name == "holdout_fraction")
VALIDATION_NONE = "none (train on everything)"
VALIDATION_HOLDOUT = f"hold out {HOLDOUT_FRACTION:.0%} of each image"
REFRESH_MS = 300  # brush strokes refresh the corrected-pixel counts at most this often


class PairsPanel(QGroupBox):
    """Ticked (labels <- image) pairs and the validation choice."""

    def __init__(self, viewer: Any, guard: Callable[[Callable[[], Any]], Any], say: Callable[[str], None],
                 correction_weight: Callable[[], float]) -> None:
        super().__init__("Training pairs (labels <- image)")
        self.viewer = viewer
        self._guard = guard
        self._say = say
        self._correction_weight = correction_weight
        self._image_for: dict[str, str] = {}  # labels layer -> the image the user paired it with
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_MS)
        self._refresh_timer.timeout.connect(self.refresh_pairs)
        self._build()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.refresh_pairs)

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.pair_list = QListWidget()
        self.pair_list.setToolTip("tick the corrected Labels layers to learn from")
        self.pair_list.setMaximumHeight(110)
        self.pair_list.itemChanged.connect(self._update_summary)
        self.pair_list.currentRowChanged.connect(self._show_pair_images)
        layout.addWidget(self.pair_list)
        form = QFormLayout()
        self.pair_image_combo = QComboBox()
        self.pair_image_combo.setToolTip("the image the selected labels annotate (when several images have its shape)")
        self.pair_image_combo.activated.connect(self._choose_pair_image)
        form.addRow("its image", self.pair_image_combo)
        self.validation_combo = QComboBox()
        self.validation_combo.setToolTip("images (or parts) kept out of training to measure Dice and pick the best epoch")
        form.addRow("validation", self.validation_combo)
        layout.addLayout(form)
        row = QHBoxLayout()
        self.all_corrected_button = QPushButton("All layers with corrections")
        self.all_corrected_button.clicked.connect(self.select_corrected)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh_pairs)
        row.addWidget(self.all_corrected_button)
        row.addWidget(refresh)
        layout.addLayout(row)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)

    # -- the list ------------------------------------------------------------------------------
    def _schedule_refresh(self, event: Any = None) -> None:
        self._refresh_timer.start()

    def refresh_pairs(self, event: Any = None) -> None:
        self._guard(self._refresh_pairs)

    def _refresh_pairs(self) -> None:
        from napari.layers import Labels

        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and hasattr(layer.events, "paint"):
                layer.events.paint.connect(self._schedule_refresh)  # once: napari ignores repeated connections
        checked = {pair.labels for pair in self.checked_pairs()}
        current = self.pair_list.currentItem().data(Qt.UserRole).labels if self.pair_list.currentItem() else None
        self.pair_list.blockSignals(True)
        self.pair_list.clear()
        for pair in candidate_pairs(self.viewer, self._image_for):
            item = QListWidgetItem(pair.label)
            item.setData(Qt.UserRole, pair)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if pair.labels in checked else Qt.Unchecked)
            self.pair_list.addItem(item)
            if pair.labels == current:
                self.pair_list.setCurrentItem(item)
        self.pair_list.blockSignals(False)
        self._show_pair_images()
        self._update_validation_choices()
        self._update_summary()

    def _show_pair_images(self, row: int = -1) -> None:
        item = self.pair_list.currentItem()
        self.pair_image_combo.clear()
        if item is None or item.data(Qt.UserRole).labels not in self.viewer.layers:
            self.pair_image_combo.setEnabled(False)
            return
        pair = item.data(Qt.UserRole)
        self.pair_image_combo.addItems([im.name for im in matching_images(self.viewer, self.viewer.layers[pair.labels])])
        self.pair_image_combo.setCurrentText(pair.image)
        self.pair_image_combo.setEnabled(self.pair_image_combo.count() > 1)

    def _choose_pair_image(self, index: int) -> None:
        item = self.pair_list.currentItem()
        if item is not None:
            self.choose_image(item.data(Qt.UserRole).labels, self.pair_image_combo.itemText(index))

    def choose_image(self, labels: str, image: str) -> None:
        """Pair the Labels layer ``labels`` with the Image layer ``image`` (same shape)."""
        self._image_for[labels] = image
        self.refresh_pairs()

    # -- ticks -----------------------------------------------------------------------------------
    def select_corrected(self) -> int:
        """Tick every pair whose labels differ from the model's prediction; returns how many."""
        self.refresh_pairs()
        count = 0
        for i in range(self.pair_list.count()):
            item = self.pair_list.item(i)
            corrected = bool(item.data(Qt.UserRole).corrected)
            item.setCheckState(Qt.Checked if corrected else Qt.Unchecked)
            count += corrected
        if not count:
            self._say("no layer has corrections yet: paint or erase in a result layer (or tick a hand-drawn one)")
        return count

    def set_checked(self, labels_names: list[str]) -> None:
        for i in range(self.pair_list.count()):
            item = self.pair_list.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole).labels in labels_names else Qt.Unchecked)

    def checked_pairs(self) -> list[PairChoice]:
        return [self.pair_list.item(i).data(Qt.UserRole) for i in range(self.pair_list.count())
                if self.pair_list.item(i).checkState() == Qt.Checked]

    def validation(self) -> str:
        """``none``, ``holdout`` or ``pair:<labels layer>`` (see :class:`FinetuneRequest`)."""
        return self.validation_combo.currentData() or "none"

    def _update_validation_choices(self) -> None:
        current = self.validation_combo.currentText()
        self.validation_combo.clear()
        self.validation_combo.addItem(VALIDATION_NONE, "none")
        self.validation_combo.addItem(VALIDATION_HOLDOUT, "holdout")
        for pair in self.checked_pairs():
            self.validation_combo.addItem(f"hold out {pair.labels}", f"pair:{pair.labels}")
        index = self.validation_combo.findText(current)
        self.validation_combo.setCurrentIndex(index if index >= 0 else 1)

    def _update_summary(self, item: Any = None) -> None:
        if item is not None:
            self._update_validation_choices()
        pairs = self.checked_pairs()
        corrected = sum(p.corrected or 0 for p in pairs)
        self.summary.setText(f"{len(pairs)} pair(s) ticked, {corrected:,} corrected pixels (weighted {self._correction_weight():g}x in the loss)"
                             if pairs else "tick the corrected layers to learn from")
