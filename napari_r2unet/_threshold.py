"""The Segment widget's threshold: which result layer it acts on, and what it shows.

:class:`ThresholdControl` is a "result" menu of the Labels layers the plugin made (those that
keep their probabilities, see :mod:`napari_r2unet._layers`), a slider with its value and a
"post-process" checkbox (``post_check``):

- the menu follows the viewer: a new result layer, or selecting one of ours in the layer list,
  becomes the chosen one; selecting any other layer (the image, say) keeps the choice;
- choosing a result shows its current threshold on the slider;
- moving the slider re-thresholds the chosen result from its stored probabilities (no new run,
  user edits kept) and says so in the status line; without a result layer it says that the
  value is for the next segmentation. It never does nothing silently;
- choosing a model (:meth:`ThresholdControl.set_model`) puts the slider at its card's threshold
  and sets the checkbox from its card's post-processing (enabled and ticked when the card asks
  for some), without touching any existing layer;
- the checkbox applies or removes the chosen result's post-processing (largest component(s),
  holes filled) on its thresholded labels; every slider move re-applies it (user edits kept).

The slider's value, and the checkbox where the model's card has post-processing, are also
those of the next segmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QSlider, QWidget

from src_models.model_card import ModelCard, Postprocess
from src_models.settings import DEFAULT_THRESHOLD, THRESHOLD_RANGE

from ._layers import META_KEY, layer_postprocess, rethreshold

SLIDER_STEPS = 100  # the slider moves in steps of 0.01
NO_RESULT = "none yet: the threshold is for the next segmentation"


def is_result_layer(layer: Any) -> bool:
    """A Labels layer made by the plugin, with the probabilities to re-threshold it from."""
    meta = getattr(layer, "metadata", {}).get(META_KEY)
    return isinstance(meta, dict) and "probabilities" in meta


class ThresholdControl(QWidget):
    """A result-layer menu (``result_combo``) and the threshold slider acting on it."""

    def __init__(self, viewer: Any, guard: Callable[[Callable[[], Any]], Any], say: Callable[[str], None]) -> None:
        super().__init__()
        self.viewer = viewer
        self._guard = guard
        self._say = say  # a line in the widget's status
        self.result_combo = QComboBox()
        self.result_combo.currentIndexChanged.connect(self._on_result_changed)
        self.slider = QSlider(Qt.Horizontal)
        low, high = THRESHOLD_RANGE
        self.slider.setRange(round(low * SLIDER_STEPS), round(high * SLIDER_STEPS))
        self.slider.setValue(round(DEFAULT_THRESHOLD * SLIDER_STEPS))
        self.label = QLabel(self._text(self.value))
        self.slider.valueChanged.connect(self._on_slider)
        self.model_post = Postprocess()  # the chosen model's card post-processing
        self.post_check = QCheckBox()
        self._show_post(self.model_post, False)
        self.post_check.toggled.connect(self._on_post_toggled)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.slider)
        row.addWidget(self.label)
        viewer.layers.selection.events.active.connect(self._on_selection)
        self.refresh()

    @property
    def value(self) -> float:
        return self.slider.value() / SLIDER_STEPS

    @staticmethod
    def _text(value: float) -> str:
        return f"{value:.2f}"

    def postprocess(self) -> Postprocess | None:
        """The post-processing of the next segmentation: the model card's, unless the user unticked it."""
        if not self.model_post.active:
            return None
        return self.model_post if self.post_check.isChecked() or not self.post_check.isEnabled() else None

    def set_model(self, card: ModelCard) -> None:
        """A model was chosen: its card's threshold and post-processing, for the next segmentation."""
        self._set_slider(card.threshold)
        self.model_post = card.postprocess
        self._show_post(card.postprocess, card.postprocess.active)

    def _set_slider(self, threshold: float) -> None:
        self.slider.blockSignals(True)
        self.slider.setValue(round(threshold * SLIDER_STEPS))
        self.slider.blockSignals(False)
        self.label.setText(self._text(self.value))

    def _show_post(self, post: Postprocess, checked: bool) -> None:
        """The checkbox for ``post``: its label and tooltip say what it does; off when there is nothing to do."""
        self.post_check.blockSignals(True)
        self.post_check.setText(f"post-process: {post.describe()}")
        self.post_check.setEnabled(post.active)
        self.post_check.setChecked(checked and post.active)
        self.post_check.blockSignals(False)
        self.post_check.setToolTip(
            f"the model card's post-processing ({post.describe()}), applied to the labels after each threshold, "
            "slice by slice; untick to see the thresholded mask as it is (your edits are kept)" if post.active else
            "the model's card asks for no post-processing")

    def chosen_layer(self) -> Any:
        """The result layer the slider acts on (None when there is none)."""
        name = self.result_combo.currentData()
        if name and name in self.viewer.layers and is_result_layer(self.viewer.layers[name]):
            return self.viewer.layers[name]
        return None

    # -- following the viewer ----------------------------------------------------------------
    def refresh(self, event: Any = None) -> None:
        """Re-list our result layers; a newly added one becomes the chosen one."""
        names = [layer.name for layer in self.viewer.layers if is_result_layer(layer)]
        for layer in self.viewer.layers:
            if is_result_layer(layer):
                layer.events.name.connect(self.refresh)  # once: napari ignores repeated connections
        known = {self.result_combo.itemData(i) for i in range(self.result_combo.count())}
        added = [name for name in names if name not in known]
        keep = added[-1] if added else self.result_combo.currentData()
        self.result_combo.blockSignals(True)
        self.result_combo.clear()
        for name in names:
            self.result_combo.addItem(name, name)
        if not names:
            self.result_combo.addItem(NO_RESULT, None)
        index = self.result_combo.findData(keep) if keep else -1
        self.result_combo.setCurrentIndex(index if index >= 0 else self.result_combo.count() - 1)
        self.result_combo.setEnabled(bool(names))
        self.result_combo.blockSignals(False)
        self._on_result_changed()

    def _on_selection(self, event: Any = None) -> None:
        layer = self.viewer.layers.selection.active
        if layer is not None and is_result_layer(layer):
            index = self.result_combo.findData(layer.name)
            if index < 0:
                self.refresh()
                index = self.result_combo.findData(layer.name)
            self.result_combo.setCurrentIndex(index)

    def _on_result_changed(self, index: int = -1) -> None:
        layer = self.chosen_layer()
        if layer is not None:
            meta = layer.metadata[META_KEY]
            self._set_slider(float(meta.get("threshold", DEFAULT_THRESHOLD)))
            self._show_post(layer_postprocess(meta), bool(meta.get("postprocessed")))
        self._update_tooltips(layer)

    def _update_tooltips(self, layer: Any) -> None:
        if layer is None:
            tip = ("probability at or above which a pixel is foreground, for the next segmentation; "
                   "once a result exists, moving it re-thresholds the chosen result layer")
        else:
            tip = (f"re-thresholds {layer.name!r} from its stored probabilities (no new run; your edits are kept); "
                   "also used by the next segmentation")
        self.slider.setToolTip(tip)
        self.label.setToolTip(tip)
        self.result_combo.setToolTip("the result layer the threshold acts on (follows the selected result layer)")

    # -- the slider ----------------------------------------------------------------------------
    def _on_slider(self, value: int) -> None:
        threshold = value / SLIDER_STEPS
        self.label.setText(self._text(threshold))
        layer = self.chosen_layer()
        if layer is None:
            self._say(f"threshold {threshold:.2f}: used by the next segmentation (no result layer to update yet)")
            return
        changed = self._guard(lambda: rethreshold(layer, threshold))
        if changed is not None:
            self._say(f"threshold {threshold:.2f} applied to {layer.name}: {changed:,} pixels changed (your edits kept)")

    def _on_post_toggled(self, checked: bool) -> None:
        layer = self.chosen_layer()
        if layer is None:
            self._say(f"post-processing {'on' if checked else 'off'} for the next segmentation")
            return
        threshold = float(layer.metadata[META_KEY].get("threshold", self.value))
        changed = self._guard(lambda: rethreshold(layer, threshold, postprocessed=checked))
        if changed is not None:
            self._say(f"post-processing {'applied to' if checked else 'removed from'} {layer.name}: "
                      f"{changed:,} pixels changed (your edits kept)")
