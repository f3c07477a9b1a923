"""The Segment widget: pick an image and a model, segment in a worker thread, get editable labels.

The network runs in a napari worker thread (torch is imported there, not at napari start-up);
progress shows in the widget and in napari's activity dock (a busy bar while the first or only
tile runs); Cancel stops within a fraction of a second, even inside a tile; the
threshold slider re-derives the chosen result layer's labels from its stored probabilities
without running the network again (:mod:`napari_r2unet._threshold`). Choosing a model sets the
threshold and the "post-process" checkbox from its model card; an image whose channels do not
fit the model (a gray image for an RGB model, say) is still segmented, with a one-line notice
(a notification the first time for that image and model, and the status line). Tiling defaults and bounds
come from :mod:`src_models.settings`. Buttons, worker and errors: :class:`~napari_r2unet._dock.DockWidget`.
"""

from __future__ import annotations

import os
from math import isqrt
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox, QVBoxLayout

from src_models.errors import R2UNetError  # torch-free
from src_models.model_card import Postprocess
from src_models.preprocessing import input_notice
from src_models.resources import require_memory
from src_models.settings import AUTO_OVERLAP_PIXELS, AUTO_TILE, AUTO_WHOLE_IMAGE_PIXELS, MAX_OVERLAP, MIN_USER_TILE

from ._dock import DockWidget
from ._layers import META_KEY, add_result_layers, fill_unlabelled, labels_from, plan_job, result_bytes
from ._model_menu import ModelMenu
from ._models import ModelChoice, model_classes
from ._threshold import ThresholdControl
from ._worker import WARMUP_ENV, SegmenterCache, available_devices, segment, warm_up

if TYPE_CHECKING:
    import napari

NEW_LAYER = "new Labels layer"
AUTO_TILE_VALUE = 0  # the tile spin box's minimum stands for "auto" (0: its steps stay on multiples of TILE_STEP)
OVERLAP_STEP = 0.05
AUTO_OVERLAP_VALUE = -OVERLAP_STEP  # the overlap spin box's minimum stands for "auto"
MAX_TILE = 8192
TILE_STEP = 128


def _auto_spin(spin: Any, low: float, high: float, step: float, tooltip: str) -> Any:
    """``spin`` ranging over [low, high], its minimum standing for "auto" (and chosen)."""
    spin.setRange(low, high)
    spin.setSingleStep(step)
    spin.setSpecialValueText("auto")
    spin.setValue(low)
    spin.setToolTip(tooltip)
    return spin


class SegmentWidget(DockWidget):
    """Dock widget: image -> model -> Labels layer (and probability map)."""

    busy_message = "a segmentation is already running: wait for it or press Cancel"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer)
        self._cache = SegmenterCache()
        self._warming: set[Any] = set()  # warm-up workers still running
        self._start_after_warm_up = False  # Segment was pressed during a warm-up
        self._progress_bar: Any = None
        self._noticed: set[tuple[str, str]] = set()  # (image, model) pairs whose input notice was shown
        self._build()
        self._refresh_layers()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed, self.viewer.layers.events.reordered):
            event.connect(self._refresh_layers)
        self._detect_devices()

    # -- UI ----------------------------------------------------------------------------------
    def _build(self) -> None:
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("the Image layer to segment")
        form.addRow("image", self.image_combo)
        self.model_combo = ModelMenu(self._guard)
        self.model_combo.chosen.connect(self._on_model_chosen)
        form.addRow("model", self.model_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu"])
        self.device_combo.setToolTip("auto: CUDA > Apple MPS > CPU")
        form.addRow("device", self.device_combo)
        self._add_tiling_rows(form)
        self.threshold_control = ThresholdControl(self.viewer, self._guard, lambda line: self.status.setText(line))
        self.result_combo = self.threshold_control.result_combo
        self.threshold_slider = self.threshold_control.slider
        self.threshold_label = self.threshold_control.label
        form.addRow("result", self.result_combo)
        form.addRow("threshold", self.threshold_control)
        self.post_check = self.threshold_control.post_check
        form.addRow("", self.post_check)
        choice = self.model_combo.current_choice()
        if choice is not None:
            self.threshold_control.set_model(choice.card)
        self.target_combo = QComboBox()
        self.target_combo.setToolTip("write into a new layer, or fill only the unlabelled (0) pixels of an existing one")
        form.addRow("output", self.target_combo)
        self._add_option_rows(form)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(self._run_controls("Segment", "Open an image, choose a model, press Segment."))
        layout.addStretch(1)

    def _add_tiling_rows(self, form: QFormLayout) -> None:
        side = isqrt(AUTO_WHOLE_IMAGE_PIXELS)
        self.tile_spin = _auto_spin(QSpinBox(), AUTO_TILE_VALUE, MAX_TILE, TILE_STEP,
                                    f"largest tile side in pixels (at least {MIN_USER_TILE}), tiles evened out; "
                                    f"auto = whole image up to {side} x {side} if memory allows, else {AUTO_TILE}")
        form.addRow("tile", self.tile_spin)
        self.overlap_spin = _auto_spin(QDoubleSpinBox(), AUTO_OVERLAP_VALUE, MAX_OVERLAP, OVERLAP_STEP,
                                       f"overlap of neighbouring tiles, as a fraction of the largest tile (at most {MAX_OVERLAP:g}); "
                                       f"auto = {AUTO_OVERLAP_PIXELS} pixels ({AUTO_OVERLAP_PIXELS / AUTO_TILE:.2f} of {AUTO_TILE})")
        form.addRow("overlap", self.overlap_spin)
        self.scale_combo = QComboBox()
        self.scale_combo.setEditable(True)
        self.scale_combo.addItems(["auto", "1"])
        self.scale_combo.setToolTip("auto: an image whose field of view differs by more than 10 % from the model's training images is "
                                    "resized to their scale and the result resized back (models whose card records a scale: the vessel "
                                    "models); 1: native resolution; or type a factor such as 0.6")
        form.addRow("scale", self.scale_combo)

    def _add_option_rows(self, form: QFormLayout) -> None:
        self.all_slices = QCheckBox("all slices (stacks, time series)")
        form.addRow("", self.all_slices)
        self.add_probability = QCheckBox("add probability map")
        self.add_probability.setChecked(True)
        form.addRow("", self.add_probability)
        self.add_uncertainty = QCheckBox("add uncertainty map (where to correct first)")
        self.add_uncertainty.setToolTip("entropy of the predicted probability: bright where the model hesitates")
        form.addRow("", self.add_uncertainty)
        self.tta = QCheckBox("test-time augmentation (4 flips: 4x slower, steadier)")
        self.tta.setToolTip("average the predictions of the 4 flipped images; the uncertainty map then also shows where they disagree")
        form.addRow("", self.tta)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(["auto", "fp32", "bf16"])
        self.precision_combo.setToolTip("auto: bf16 on CPUs with AMX or AVX-512 BF16 for models validated in it (OpenVINO, about 3x "
                                        "fp32's speed), mixed precision on CUDA, else fp32; bf16 elsewhere is emulated by PyTorch, slower")
        form.addRow("precision", self.precision_combo)

    @property
    def scale(self) -> str:
        """The scale asked for: ``auto``, ``1`` or a factor (checked here, before the worker starts)."""
        from src_models.scale import parse_scale_option

        text = self.scale_combo.currentText().strip() or "auto"
        parse_scale_option(text)
        return text

    @property
    def tile(self) -> int | None:
        """The tile side asked for (None = automatic)."""
        value = self.tile_spin.value()
        return value or None  # 1-15 reach the core, which says the tile is too small

    @property
    def overlap(self) -> float | None:
        """The overlap asked for, a fraction of the tile (None = automatic)."""
        value = self.overlap_spin.value()
        return value if value >= 0 else None

    def _on_model_chosen(self, choice: ModelChoice) -> None:
        """The card of the chosen model sets the threshold, post-processing and TTA of the next
        segmentation; the model loads and warms up in the background meanwhile."""
        self.threshold_control.set_model(choice.card)
        self.tta.setChecked(choice.card.tta)
        self._warm_up(choice)
        post = choice.card.postprocess
        self.status.setText(f"{choice.label}: threshold {self.threshold:.2f}"
                            + (f", post-processing ({post.describe()})" if post.active else "")
                            + (", test-time augmentation" if choice.card.tta else "")
                            + " from its model card, for the next segmentation")

    def _warm_up(self, choice: ModelChoice) -> None:
        """Load the chosen model and run a small forward pass in a worker thread (the first
        Segment then costs what the next ones do); a Segment pressed meanwhile waits for it.
        Errors are left to that Segment, which reports them."""
        if os.environ.get(WARMUP_ENV, "1") == "0":
            return
        from napari.qt.threading import create_worker

        try:
            scale = self.scale
        except R2UNetError:  # a bad scale text: Segment will say so; nothing to warm up with
            return
        worker = create_worker(warm_up, self._cache, choice.spec, self.device_combo.currentText(), self.tta.isChecked(),
                               scale, self.precision_combo.currentText(), lambda message: None,
                               _start_thread=False, _ignore_errors=True)
        worker.errored.connect(lambda exc: None)
        worker.finished.connect(lambda: self._warm_up_ended(worker))
        self._warming.add(worker)  # a reference until it ends
        worker.start()

    def refresh_models(self, select: str | None = None) -> None:
        """Re-list pretrained models, fine-tuned versions and opened files; ``select`` a spec."""
        self.model_combo.refresh(select)

    def add_model(self, path: str) -> ModelChoice:
        """Offer a checkpoint file as a model (the reader and 'Load checkpoint...' use this)."""
        return self.model_combo.add_file(path)

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Image, Labels

        current = self.image_combo.currentText()
        self.image_combo.clear()
        self.image_combo.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Image)])
        if current:
            self.image_combo.setCurrentText(current)
        target = self.target_combo.currentText()
        self.target_combo.clear()
        self.target_combo.addItem(NEW_LAYER)
        self.target_combo.addItems([f"fill {layer.name}" for layer in self.viewer.layers if isinstance(layer, Labels)])
        if target:
            self.target_combo.setCurrentText(target)
        self.threshold_control.refresh()

    def _detect_devices(self) -> None:
        """Ask torch for accelerators in a worker (torch's import stays off the GUI thread)."""
        from napari.qt.threading import create_worker

        worker = create_worker(available_devices, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._set_devices)
        worker.errored.connect(lambda exc: None)  # keep auto/cpu
        worker.start()

    def _set_devices(self, devices: list[str]) -> None:
        current = self.device_combo.currentText()
        self.device_combo.clear()
        self.device_combo.addItems(["auto", *devices])
        self.device_combo.setCurrentText(current)

    # -- run -------------------------------------------------------------------------------
    def _image_layer(self) -> Any:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise R2UNetError("no Image layer to segment: open an image first (File > Open, or File > Open Sample)")
        return self.viewer.layers[name]

    def start(self) -> None:
        """Segment the chosen image in a worker thread (refused while one runs). While the chosen
        model still warms up, the Segment starts when that ends: two threads never load or run
        torch at once (torch.set_num_threads and module construction in two threads deadlocked
        under Qt in our tests)."""
        if self._warming:
            self._start_after_warm_up = True
            self.status.setText("loading the model: the segmentation starts when it is ready ...")
            return
        self._unless_busy(self.busy_message, self._start)

    def _warm_up_ended(self, worker: Any) -> None:
        self._warming.discard(worker)
        if not self._warming and self._start_after_warm_up:
            self._start_after_warm_up = False
            self.start()

    def _start(self) -> None:
        from napari.utils import progress

        image = self._image_layer()
        choice = self.model_combo.current_choice()
        if choice is None:
            raise R2UNetError("no model chosen: pick a pretrained model or load a checkpoint")
        spec = choice.spec
        job = plan_job(image, tuple(self.viewer.dims.current_step), self.all_slices.isChecked(),
                       tile=self.tile, overlap=self.overlap, tta=self.tta.isChecked(), scale=self.scale,
                       precision=self.precision_combo.currentText())
        require_memory(result_bytes(job, model_classes(spec), self.add_probability.isChecked(), self.add_uncertainty.isChecked()),
                       f"the result for {image.name} {job.spatial_shape}",
                       "segment the current slice only, untick the probability/uncertainty maps, or crop the image")
        target = self._target_layer()
        if target is not None and tuple(target.data.shape) != job.spatial_shape:
            raise R2UNetError(f"labels layer {target.name!r} has shape {tuple(target.data.shape)} but the image {job.spatial_shape}; choose a new layer")
        device = self.device_combo.currentText()
        notice = self._input_notice(image.name, job, choice)
        post, card_post = self.threshold_control.postprocess(), choice.card.postprocess
        self._progress_bar = progress(total=1000, desc=f"Segmenting {image.name}")
        self._launch(segment, self._cache, spec, device, job, self._bridge.progress.emit, self._stop.is_set, self._bridge.message.emit,
                     on_result=lambda result: self._apply(image, job, target, spec, result, (card_post, post), notice),
                     status=f"segmenting {image.name} with {self.model_combo.currentText()} ...")
        self.progress.setRange(0, 0)  # busy until the first tile is done: an image that runs whole has one

    def _input_notice(self, image: str, job: Any, choice: ModelChoice) -> str | None:
        """How the image was fitted to the model's channels (None if it fits); a notification the first time."""
        if choice.preprocess is None:
            return None
        notice = input_notice(job.channels, choice.preprocess, choice.card.task)
        if notice and (image, choice.spec) not in self._noticed:
            from napari.utils.notifications import show_info

            self._noticed.add((image, choice.spec))
            show_info(notice)
        return notice

    def _target_layer(self) -> Any:
        text = self.target_combo.currentText()
        if not text or text == NEW_LAYER:
            return None
        return self.viewer.layers[text.removeprefix("fill ")]

    def _on_progress(self, fraction: float) -> None:
        super()._on_progress(fraction)
        if self._progress_bar is not None:
            value = self.progress.value()
            self._progress_bar.update(max(0, value - self._progress_bar.n))

    def _apply(self, image: Any, job: Any, target: Any, spec: str, result: tuple[Any, str],
               posts: tuple[Postprocess, Postprocess | None], notice: str | None) -> None:
        """Add the result (or fill the target's unlabelled pixels); ``posts``: the card's post-processing and the one applied."""
        probs, model_name = result
        threshold, (card_post, post) = self.threshold, posts
        if target is None:
            layer = add_result_layers(self.viewer, image, job, probs, threshold, model_name, self.add_probability.isChecked(),
                                      self.add_uncertainty.isChecked(), spec, postprocess=card_post, postprocessed=post is not None)
            fraction = float((layer.metadata[META_KEY]["prediction"] > 0).mean())
            line = f"done: {layer.name} ({fraction:.1%} foreground). Correct it with the brush, then save or fine-tune."
        else:
            filled = fill_unlabelled(target, job, labels_from(probs, threshold, post))
            line = f"done: filled {filled} unlabelled pixels of {target.name}; painted pixels kept (Ctrl+Z undoes)"
        self.status.setText(f"{line} Note: {notice}." if notice else line)

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        if not running and self._progress_bar is not None:
            self._progress_bar.close()
            self._progress_bar = None

    @property
    def threshold(self) -> float:
        """The slider's threshold: the chosen result layer's, and the next segmentation's."""
        return self.threshold_control.value
