"""The Fine-tune widget's settings panel, built from :class:`~src_models.training.config.TrainConfig`.

Each training setting is one :class:`TrainConfig` field; :func:`setting_editor` turns a field
into a spin box or a menu: its default from :data:`~src_models.finetune.WIDGET_BUDGET` (the
budget) or :data:`FINETUNE_DEFAULTS` (else the field's own), its range from the field's bounds
(``ui_min`` / ``ui_max`` where the config sets none), its tooltip from the field's help.
Nothing about a setting is written here but how it is shown (its label, step and decimals).

The panel holds the base model, the budget and, behind "advanced", the learning rate, patch and
batch size, steps per epoch, correction weight, what to freeze, the loss's weight of missed
foreground (``fn_weight``; it starts at "as the base model", the value the base was trained with,
see :func:`~src_models.finetune.inherit_training`) and the pull toward the base's weights (``l2sp``). The budget is epochs and
minutes, each of which may be "no limit" (the spin box's minimum, which the config refuses as a
value); it starts as a time budget (5 minutes, no epoch limit) and the run follows
:func:`~src_models.training.config.resolve_budget`, as the CLI does.
Settings that come from the base model's card are not offered: ``geometry`` never is (a
``resize`` model is fine-tuned on whole images letterboxed to its card's size, a ``tiled`` one on
patches, see :func:`src_models.finetune.card_geometry`), and the patch size is shown but disabled
for a ``resize`` base (its card fixes the training size). The augmentation fields (``rotate``,
``scale``, ``rot90``) keep their ``TrainConfig`` defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox, QToolButton, QVBoxLayout, QWidget

from src_models.finetune import INHERITED, WIDGET_BUDGET  # torch-free
from src_models.model_card import ModelCard
from src_models.training.config import FINETUNE_DEFAULTS, TrainConfig, default, setting  # torch-free

from ._model_menu import ModelMenu
from ._models import ModelChoice

BUDGET = ("epochs", "minutes")
ADVANCED = ("lr", "patch_size", "batch_size", "steps_per_epoch", "correction_weight", "freeze", "fn_weight", "l2sp", "precision")
LABELS = {"lr": "learning rate", "minutes": "at most (min)", "fn_weight": "missed-foreground weight", "l2sp": "pull to base (L2-SP)"}  # otherwise the field name, spaced
STEPS = {"lr": 1e-4, "patch_size": 16, "fn_weight": 0.05, "l2sp": 1e-3}
DECIMALS = {"lr": 5, "minutes": 1, "l2sp": 4}
UNSET = {"epochs": "no limit", "minutes": "no limit", "fn_weight": "as the base model"}  # spin box minimum = None (not set)


def finetune_default(name: str) -> Any:
    """What the widget starts with: its budget (:data:`~src_models.finetune.WIDGET_BUDGET`, a
    time budget), else the fine-tuning default, else the field's; None ("as the base model") for
    what a fine-tune inherits from its base (:data:`~src_models.finetune.INHERITED`)."""
    if name in INHERITED:
        return None
    if name in WIDGET_BUDGET:
        return WIDGET_BUDGET[name]
    return FINETUNE_DEFAULTS[name] if name in FINETUNE_DEFAULTS else default(name)


def _field_type(name: str) -> str:
    return str(next(f.type for f in dataclasses.fields(TrainConfig) if f.name == name))


def _bounds(meta: Any) -> tuple[float, float]:
    low = meta.get("ui_min", meta.get("min"))
    high = meta.get("ui_max", meta.get("max"))
    if low is None or high is None:
        raise ValueError(f"a settings panel needs bounds: give the field min/max or ui_min/ui_max ({meta.get('help')})")
    return low, high


def setting_editor(name: str, value: Any = None) -> QWidget:
    """A spin box (numbers) or menu (choices) for the :class:`TrainConfig` field ``name``."""
    meta = setting(name)
    value = finetune_default(name) if value is None else value
    if "choices" in meta:
        editor: Any = QComboBox()
        editor.addItems([str(c) for c in meta["choices"]])
        editor.setCurrentText(str(value))
    else:
        low, high = _bounds(meta)
        editor = QSpinBox() if _field_type(name).startswith("int") else QDoubleSpinBox()
        if isinstance(editor, QDoubleSpinBox):
            editor.setDecimals(DECIMALS.get(name, 2))
        editor.setRange(low, high)
        editor.setSingleStep(STEPS.get(name, 1))
        if name in UNSET:
            editor.setSpecialValueText(UNSET[name])
        editor.setValue(editor.minimum() if value is None else value)
    tip = meta["help"] + (f"; {editor.minimum():g} = {UNSET[name]}" if name in UNSET else "")
    editor.setToolTip(tip)
    return editor


def editor_value(name: str, editor: QWidget) -> Any:
    """The value an editor holds, as :class:`TrainConfig` takes it (None where not set)."""
    if isinstance(editor, QComboBox):
        return editor.currentText()
    value = editor.value()
    return None if name in UNSET and value == editor.minimum() else value


class SettingsPanel(QWidget):
    """Base model, budget and advanced training settings of a fine-tuning run."""

    def __init__(self, guard: Callable[[Callable[[], Any]], Any]) -> None:
        super().__init__()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        form = QFormLayout()
        self.base_combo = ModelMenu(guard)
        form.addRow("base model", self.base_combo)
        self.editors: dict[str, QWidget] = {}
        self._patch_size: int | None = None  # the user's patch size while a resize card fixes it
        self._add_rows(form, BUDGET)
        layout.addLayout(form)
        self.advanced_button = QToolButton()
        self.advanced_button.setText("advanced")
        self.advanced_button.setCheckable(True)
        self.advanced_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.advanced_button.setArrowType(Qt.RightArrow)
        self.advanced_button.toggled.connect(self._toggle_advanced)
        layout.addWidget(self.advanced_button)
        self.advanced = QWidget()
        self._add_rows(QFormLayout(self.advanced), ADVANCED)
        self.advanced.setVisible(False)
        layout.addWidget(self.advanced)
        self.base_combo.chosen.connect(self._on_base_chosen)
        choice = self.base_combo.current_choice()
        if choice is not None:
            self.follow_card(choice.card)

    def _on_base_chosen(self, choice: ModelChoice) -> None:
        self.follow_card(choice.card)

    def follow_card(self, card: ModelCard) -> None:
        """Offer the patch size only when the base model trains on patches (a ``tiled`` card)."""
        editor: Any = self.editors["patch_size"]
        size = card.geometry.size if card.geometry.kind == "resize" else None
        if size is not None:
            if self._patch_size is None:
                self._patch_size = editor.value()
            editor.setRange(min(editor.minimum(), size), max(editor.maximum(), size))
            editor.setValue(size)
            editor.setToolTip(f"the model's card fixes the training size: whole images letterboxed to {size} x {size} "
                              "(as it segments), not patches")
        elif self._patch_size is not None:
            editor.setRange(*_bounds(setting("patch_size")))
            editor.setValue(self._patch_size)
            editor.setToolTip(setting("patch_size")["help"])
            self._patch_size = None
        editor.setEnabled(size is None)

    def _add_rows(self, form: QFormLayout, names: tuple[str, ...]) -> None:
        for name in names:
            self.editors[name] = setting_editor(name)
            form.addRow(LABELS.get(name, name.replace("_", " ")), self.editors[name])

    def _toggle_advanced(self, shown: bool) -> None:
        self.advanced.setVisible(shown)
        self.advanced_button.setArrowType(Qt.DownArrow if shown else Qt.RightArrow)

    def value(self, name: str) -> Any:
        return editor_value(name, self.editors[name])

    def advanced_settings(self) -> dict[str, Any]:
        """The advanced settings as :func:`~src_models.training.finetune_config` overrides (not those the card fixes)."""
        fixed = {"patch_size"} if self._patch_size is not None else set()
        return {name: self.value(name) for name in ADVANCED if name not in fixed}
