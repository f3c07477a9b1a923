"""The Fine-tune widget: correct the labels, retrain in the background, re-segment the rest.

The loop a clinician runs: segment an image (Segment widget), fix the mistakes with napari's
brushes, press Fine-tune here. Training runs in a worker thread with a live loss / validation
Dice curve, an ETA and a Cancel that stops after the current step and keeps the best checkpoint.
Every run writes a NEW version into the per-user model folder (the base model and older
versions are only read); versions can be renamed, exported and chosen again at any time, and
one click re-segments the other open images with the chosen version (new layers only: edited
layers are never touched). "Next doubtful region" moves the view to where the model hesitates
most, so corrections go where they teach the model the most.

The widget composes three panels (:mod:`~napari_r2unet._pairs_panel`,
:mod:`~napari_r2unet._settings_panel`, built from ``TrainConfig``, and
:mod:`~napari_r2unet._versions_panel`) on the :class:`~napari_r2unet._dock.DockWidget` base
(buttons, progress, worker lifecycle, errors); re-segmenting runs
:func:`~napari_r2unet._worker.segment_all` at the Segment widget's threshold (without one docked,
the version's card threshold) and applies the version's card post-processing.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QPushButton, QVBoxLayout

from src_models.errors import R2UNetError  # torch-free
from src_models.model_card import ModelCard
from src_models.settings import DEFAULT_THRESHOLD
from src_models.training.events import EventKind  # torch-free
from src_models.user_versions import (
    Version,
    list_versions,
    rename_version,
    reserved_version_path,
    scored_name,
    version_name,
)

from ._dock import PROGRESS_STEPS, DockWidget
from ._finetune import FinetuneRequest, PairChoice, corrections, doubtful_regions, finetune, is_output_layer, pair_data
from ._layers import META_KEY, add_result_layers, plan_job
from ._models import ModelChoice, file_model_name, is_model_file, model_card
from ._pairs_panel import PairsPanel
from ._plot import CurvePlot
from ._settings_panel import SettingsPanel
from ._versions_panel import VersionsPanel
from ._worker import SegmenterCache, export_package, segment_all


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f", about {seconds / 60:.1f} min left" if seconds >= 90 else f", about {seconds:.0f} s left"


def _position(event: Any) -> str:
    """Where a run is: "epoch 3/10, step 52/250", or "epoch 3, step 52" without an epoch limit."""
    if event.epochs is None:
        return f"epoch {event.epoch + 1}, step {event.step}"
    return f"epoch {event.epoch + 1}/{event.epochs}, step {event.step}/{event.total_steps}"


class FinetuneWidget(DockWidget):
    """Dock widget: corrected labels -> a new fine-tuned model version -> re-segmented images."""

    busy_message = "a fine-tuning run is already going: wait for it or press Cancel"
    cancel_message = "cancelling: finishing the current step ..."

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        self._bridge.event.connect(self._on_event)
        self._bridge.line.connect(self.status_line)
        self._cache = SegmenterCache()
        self._doubtful: list[tuple[int, int, float]] = []
        self._doubtful_layer: str | None = None
        self._started = 0.0
        self._finish_message = "finished"
        self._build()
        self.refresh_pairs()

    # -- UI ----------------------------------------------------------------------------------
    def _build(self) -> None:
        say = self.status_line
        self.settings = SettingsPanel(self._guard)
        self.pairs = PairsPanel(self.viewer, self._guard, say, lambda: self.settings.value("correction_weight"))
        self.versions = VersionsPanel(self._guard, say, self._refresh_model_menus)
        self.versions.resegment_button.clicked.connect(self.resegment)
        self.versions.package_button.clicked.connect(self.bioimageio_dialog)
        self.plot = CurvePlot()
        self.doubt_button = QPushButton("Next doubtful region")
        self.doubt_button.setToolTip("move the view to the next place where the selected result's model is least sure")
        self.doubt_button.clicked.connect(lambda: self._guard(self.next_doubtful_region))
        layout = QVBoxLayout(self)
        layout.addWidget(self.pairs)
        layout.addWidget(self.settings)
        layout.addLayout(self._run_controls("Fine-tune", "Segment an image, correct the labels with the brush, then press Fine-tune."))
        layout.addWidget(self.plot)
        layout.addWidget(self.versions)
        layout.addWidget(self.doubt_button)
        layout.addStretch(1)
        self._name_parts()

    def _name_parts(self) -> None:
        """The panels' controls under the names scripts and tests use."""
        self.pair_list, self.summary, self.validation_combo = self.pairs.pair_list, self.pairs.summary, self.pairs.validation_combo
        self.base_combo, editors = self.settings.base_combo, self.settings.editors
        self.epochs_spin, self.minutes_spin = editors["epochs"], editors["minutes"]
        self.lr_spin, self.patch_spin, self.batch_spin = editors["lr"], editors["patch_size"], editors["batch_size"]
        self.steps_spin, self.weight_spin, self.freeze_combo = editors["steps_per_epoch"], editors["correction_weight"], editors["freeze"]
        self.version_combo, self.resegment_button = self.versions.version_combo, self.versions.resegment_button
        self.package_button = self.versions.package_button

    def status_line(self, line: str) -> None:
        self.status.setText(line)

    # -- models, versions and pairs (the panels do the work) --------------------------------------
    def refresh_models(self, select: str | None = None) -> None:
        self.base_combo.refresh(select)

    def add_model(self, path: str) -> ModelChoice:
        """Offer a checkpoint file as a base model."""
        return self.base_combo.add_file(path)

    def refresh_versions(self, select: str | None = None) -> None:
        self.versions.refresh_versions(select)

    def rename(self, path: str, name: str) -> None:
        self.versions.rename(path, name)

    def export(self, path: str, target: str) -> Path:
        return self.versions.export(path, target)

    def bioimageio_dialog(self) -> None:
        """The "Export for BioImage.IO..." button: ask for the ``.zip``, then export (refused while a job runs)."""
        self._unless_busy("wait for the running job to end (or press Cancel)", self._bioimageio_dialog)

    def _bioimageio_dialog(self) -> None:
        asked = self.versions.package_target()
        if asked is not None:
            self.export_bioimageio(*asked)

    def export_bioimageio(self, path: str, target: str, overwrite: bool = False) -> Any:
        """Write the version ``path`` as a bioimage.io package at ``target`` in the worker thread (the
        TorchScript and ONNX exports and their check take seconds); the status line follows its
        steps and says where it went, or why it failed, in one line."""
        index = self.version_combo.findData(path)
        name = self.version_combo.itemText(index) if index >= 0 else Path(path).stem
        worker = self._launch(export_package, Path(path), Path(target), overwrite, self._bridge.line.emit,
                              on_result=lambda written: self._notify_info(f"exported {name} to {written}"),
                              status=f"exporting {name} for BioImage.IO (TorchScript, ONNX and a check run) ...")
        self.cancel_button.setEnabled(False)  # seconds long, with no step to stop between
        self.progress.setRange(0, 0)  # busy, without a fraction to show
        return worker

    def _refresh_model_menus(self) -> None:
        """Show new or renamed versions in the model menus of this viewer's widgets."""
        for widget in list(self.viewer.window.dock_widgets.values()):
            refresh = getattr(widget, "refresh_models", None)
            if callable(refresh) and widget is not self:
                refresh()
        self.refresh_models()

    def refresh_pairs(self, event: Any = None) -> None:
        self.pairs.refresh_pairs()

    def choose_image(self, labels: str, image: str) -> None:
        """Pair the Labels layer ``labels`` with the Image layer ``image`` (same shape)."""
        self.pairs.choose_image(labels, image)

    def select_corrected(self) -> int:
        """Tick every pair whose labels differ from the model's prediction; returns how many."""
        return self.pairs.select_corrected()

    def set_checked(self, labels_names: list[str]) -> None:
        self.pairs.set_checked(labels_names)

    def checked_pairs(self) -> list[PairChoice]:
        return self.pairs.checked_pairs()

    # -- training ----------------------------------------------------------------------------
    def request(self) -> FinetuneRequest:
        """The run the widget's settings describe (layers are copied now, on the GUI thread)."""
        pairs = self.checked_pairs()
        if not pairs:
            raise R2UNetError("no training pair ticked: tick a corrected Labels layer (or press 'All layers with corrections')")
        choice = self.base_combo.current_choice()
        if choice is None:
            raise R2UNetError("no base model chosen: pick a pretrained model, a version or a checkpoint file")
        epochs, minutes = self.settings.value("epochs"), self.settings.value("minutes")
        if epochs is None and minutes is None:
            raise R2UNetError("epochs and minutes are both 'no limit': set a time budget ('at most (min)'), a number of epochs, or both")
        base = choice.spec
        data = [piece for p in pairs for piece in pair_data(self.viewer, p)]
        with reserved_version_path(file_model_name(base) if is_model_file(base) else base) as out:
            name = version_name(choice.name, len(pairs), [v.name for v in list_versions()])
            return FinetuneRequest(base=base, pairs=data, out=out, name=name, epochs=epochs, minutes=minutes,
                                   validation=self.pairs.validation(), settings=self.settings.advanced_settings())

    def start(self) -> None:
        """Fine-tune in a worker thread (refused while a run or a re-segmentation is going)."""
        self._unless_busy(self.busy_message, self._start)

    def _start(self) -> None:
        request = self.request()
        self.plot.clear()
        self._started = time.perf_counter()
        self._launch(finetune, request, self._bridge.event.emit, self._stop.is_set,
                     on_result=self._trained, status=f"preparing {len(request.pairs)} image(s) ...")

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        self.versions.set_busy(running)
        if not running:
            self.progress.setValue(0)

    def _on_event(self, event: Any) -> None:
        kind = event.kind
        if kind == EventKind.STEP:
            self.plot.add_loss(event.step, event.loss, event.total_steps, event.fraction)
            self.progress.setValue(int(event.fraction * PROGRESS_STEPS))
            if event.step % 5 == 0 or event.step == 1:
                self.status.setText(f"{_position(event)}, loss {event.loss:.3f}{_eta(event.eta_s)}")
        elif kind == EventKind.START:
            self.plot.total_steps = event.total_steps or 1
            self.status.setText(event.message)
        elif kind == EventKind.BASELINE and event.metrics:
            self.plot.set_base_dice(event.metrics.get("F1", float("nan")))
            self.status.setText(f"base model: validation Dice {event.metrics.get('F1', float('nan')):.3f}; training ...")
        elif kind == EventKind.EPOCH and event.metrics:
            self.plot.add_dice(event.step, event.metrics.get("F1", float("nan")))
        elif EventKind(kind).is_final:
            self._finish_message = event.message

    def _trained(self, path: str) -> None:
        if not path:
            self.status.setText("cancelled before the first training step: no version was written")
            return
        version = self._score_in_name(next((v for v in list_versions() if str(v.path) == path), None))
        self.refresh_versions(select=path)
        self._refresh_model_menus()
        seconds = time.perf_counter() - self._started
        if version is None:
            self.status.setText(f"training ended in {seconds:.0f} s but wrote no version")
            return
        scores, advice = "", " Re-segment the other images with it."
        if "F1" in version.metrics:
            before = version.metrics_before.get("F1")
            scores = f"; validation Dice {before:.3f} -> {version.metrics['F1']:.3f}" if before is not None else f"; validation Dice {version.metrics['F1']:.3f}"
            if before is not None and not version.metrics["F1"] > before:
                advice = " It is no better than its base on the validation parts: correct more images, or train longer, before re-segmenting with it."
        self._notify_info(f"Fine-tuning {self._finish_message} ({seconds:.0f} s in all); "
                          f"new version '{version.name}'{scores}.{advice}")

    @staticmethod
    def _score_in_name(version: Version | None) -> Version | None:
        """The new version, its validation Dice added to its name once known (the weights untouched)."""
        if version is None or "F1" not in version.metrics:
            return version
        name = scored_name(version.name, version.metrics["F1"])
        try:
            rename_version(version.path, name)
        except R2UNetError:
            return version  # the name stays as it was: the version is there all the same
        return dataclasses.replace(version, name=name)

    # -- re-segment --------------------------------------------------------------------------
    def resegment_targets(self) -> list[Any]:
        """Open images to re-segment: every Image layer except training images and our outputs."""
        from napari.layers import Image

        training = {p.image for p in self.checked_pairs()}
        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and not is_output_layer(layer) and layer.name not in training]

    def resegment(self) -> None:
        self._unless_busy("wait for the running job to end (or press Cancel)", self._resegment)

    def _resegment(self) -> None:
        spec, version_name = self.versions.chosen_version(), self.version_combo.currentText()
        targets = self.resegment_targets()
        if not targets:
            raise R2UNetError("no other image is open: open the images to segment (training images are skipped)")
        step = tuple(self.viewer.dims.current_step)
        jobs = [plan_job(layer, step, all_slices=False) for layer in targets]
        self._launch(segment_all, self._cache, spec, jobs, self._bridge.progress.emit, self._stop.is_set, self._bridge.message.emit,
                     on_result=lambda results: self._add_resegmented(targets, jobs, results, spec, version_name),
                     status=f"re-segmenting {len(jobs)} image(s) with {version_name} ...")

    def segment_threshold(self, card: ModelCard | None = None) -> float:
        """The Segment widget's threshold when one is docked in this viewer, else the card's (or the default)."""
        from ._segment_widget import SegmentWidget

        for widget in list(self.viewer.window.dock_widgets.values()):
            if isinstance(widget, SegmentWidget):
                return widget.threshold
        return card.threshold if card is not None else DEFAULT_THRESHOLD

    def _add_resegmented(self, layers: list[Any], jobs: list[Any], results: list[tuple[Any, str]], spec: str, name: str) -> None:
        card = model_card(spec)  # its post-processing is applied, as the Segment widget does by default
        threshold = self.segment_threshold(card)
        for layer, job, (probs, _) in zip(layers, jobs, results):
            if layer.name in self.viewer.layers:
                add_result_layers(self.viewer, layer, job, probs, threshold, name, add_probability=False, spec=spec,
                                  postprocess=card.postprocess, postprocessed=card.postprocess.active)
        self.status.setText(f"re-segmented {len(results)} image(s) with {name} (threshold {threshold:.2f}): "
                            "new layers added, your edited layers are unchanged")

    # -- where to correct next -------------------------------------------------------------
    def next_doubtful_region(self) -> tuple[int, int] | None:
        """Centre the view on the next most uncertain window of the selected result layer."""
        from src_models.labels import predictive_entropy

        layer = self.viewer.layers.selection.active
        meta = getattr(layer, "metadata", {}).get(META_KEY) if layer is not None else None
        if not meta or "probabilities" not in meta:
            raise R2UNetError("select a Labels layer made by the Segment widget: its stored probabilities tell where the model hesitates")
        if self._doubtful_layer != layer.name or not self._doubtful:
            probs = meta["probabilities"]
            uncertainty = predictive_entropy(probs if probs.ndim == 3 else probs[tuple(int(i) for i in self.viewer.dims.current_step[: probs.ndim - 3])])
            fix = corrections(layer, tuple(self.viewer.dims.current_step))
            if fix is not None:
                uncertainty = uncertainty * ~fix.changed  # already corrected: not doubtful any more
            self._doubtful = doubtful_regions(uncertainty)
            self._doubtful_layer = layer.name
        y, x, score = self._doubtful.pop(0)
        world = layer.data_to_world([*self.viewer.dims.current_step[: layer.ndim - 2], y, x])
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        camera = scene.camera if scene is not None else self.viewer.camera
        camera.center = tuple(world[-2:])
        camera.zoom = max(camera.zoom, 2.0)
        self.status.setText(f"uncertainty {score:.2f} here ({len(self._doubtful)} more regions ranked); correct it, then press again")
        return y, x

