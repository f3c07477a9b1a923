"""Human-in-the-loop fine-tuning, without Qt: pairs from layers, corrections, the worker function.

- :func:`candidate_pairs` finds (image, labels) pairs in a viewer: a Labels layer made by the
  Segment widget knows its image (``metadata["r2unet"]["image"]``); any other Labels layer pairs
  with the first Image layer of the same shape.
- :func:`corrections` compares a Labels layer with the prediction the model made for it
  (kept in its metadata) and counts the pixels the user added, erased or relabelled.
- :func:`finetune` runs in the worker thread: the core's :func:`src_models.finetune.finetune`
  (which assembles the run from a :class:`FinetuneRequest` of :class:`PairData`, both defined
  there) with all CPU cores but one for torch.
- :func:`doubtful_regions` ranks windows of an image by the model's uncertainty, so the user can
  correct the most doubtful places first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from src_models.errors import R2UNetError
from src_models.finetune import FinetuneRequest, PairData  # torch-free; re-exported for the widget
from src_models.finetune import finetune as run_finetune

from ._layers import META_KEY, OUTPUT_KEY, plan_job

__all__ = ["FinetuneRequest", "PairData", "candidate_pairs", "corrections", "doubtful_regions", "finetune",
           "is_output_layer", "layer_step", "matching_images", "pair_data", "training_slices"]


@dataclass
class PairChoice:
    """A Labels layer and the Image layer it annotates."""

    labels: str
    image: str
    corrected: int | None  # pixels changed since the model's prediction; None = no prediction known

    @property
    def label(self) -> str:
        if self.corrected is None:
            return f"{self.labels}  <-  {self.image}  (hand-drawn)"
        return f"{self.labels}  <-  {self.image}  ({self.corrected:,} px corrected)"


@dataclass
class Correction:
    added: int
    erased: int
    relabelled: int
    changed: np.ndarray  # bool map of the pixels the user changed

    @property
    def total(self) -> int:
        return self.added + self.erased + self.relabelled


def layer_step(layer: Any, current_step: tuple[int, ...]) -> tuple[int, ...]:
    """The viewer's current position in ``layer``'s own leading axes (napari aligns layers to the last axes)."""
    leading = layer.data.ndim - 2
    if leading <= 0:
        return ()
    step = tuple(int(i) for i in current_step)[-layer.data.ndim:][:leading]
    step = (0,) * (leading - len(step)) + step
    return tuple(min(max(0, i), n - 1) for i, n in zip(step, layer.data.shape[:leading]))


def corrections(layer: Any, current_step: tuple[int, ...] = ()) -> Correction | None:
    """What the user changed in a Labels layer the Segment widget made (None for other layers).

    Compares the layer with the model's prediction over everything that was predicted: the one
    slice of a single-slice run (``changed`` is then 2D) or the whole stack (``changed`` has
    the layer's shape).
    """
    meta = layer.metadata.get(META_KEY) or {}
    prediction = meta.get("prediction")
    if prediction is None:
        return None
    prediction = np.asarray(prediction)
    index = tuple(meta.get("index") or ())
    labels = np.asarray(layer.data[index]) if index else np.asarray(layer.data)
    if prediction.shape != labels.shape:
        return None
    changed = labels != prediction
    added = int((changed & (prediction == 0)).sum())
    erased = int((changed & (labels == 0)).sum())
    return Correction(added, erased, int(changed.sum()) - added - erased, changed)


def training_slices(layer: Any, current_step: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The 2D slices of a Labels layer to learn from.

    2D layers: the layer. A slice the model predicted: that slice. A predicted stack: every slice
    the user corrected. A hand-drawn stack: every slice with labels. Otherwise the current slice.
    """
    data = layer.data
    leading = data.ndim - 2
    if leading <= 0:
        return [()]
    meta = layer.metadata.get(META_KEY) or {}
    if meta.get("index"):
        return [tuple(int(i) for i in meta["index"])]
    fix = corrections(layer, current_step)
    marked = fix.changed if fix is not None else np.asarray(data) != 0
    chosen = [tuple(int(i) for i in idx) for idx in np.ndindex(*data.shape[:leading]) if marked[idx].any()]
    return chosen or [layer_step(layer, current_step)]


def _spatial_shape(layer: Any) -> tuple[int, ...]:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return tuple(data.shape[:-1]) if getattr(layer, "rgb", False) else tuple(data.shape)


def is_output_layer(layer: Any) -> bool:
    return bool(getattr(layer, "metadata", {}).get(OUTPUT_KEY))


def matching_images(viewer: Any, labels: Any) -> list[Any]:
    """Image layers (not our outputs) with the spatial shape of a Labels layer."""
    from napari.layers import Image

    return [layer for layer in viewer.layers
            if isinstance(layer, Image) and not is_output_layer(layer) and _spatial_shape(layer) == tuple(labels.data.shape)]


def candidate_pairs(viewer: Any, chosen_images: dict[str, str] | None = None) -> list[PairChoice]:
    """Every Labels layer that has an image to train with.

    The image is the one the user chose for it (``chosen_images``), else the one the Segment
    widget predicted it from, else the first Image layer of the same shape.
    """
    from napari.layers import Labels

    chosen_images = chosen_images or {}
    step = tuple(viewer.dims.current_step)
    pairs = []
    for layer in viewer.layers:
        if not isinstance(layer, Labels):
            continue
        images = matching_images(viewer, layer)
        if not images:
            continue
        meta = layer.metadata.get(META_KEY) or {}
        by_name = {im.name: im for im in images}
        image = by_name.get(chosen_images.get(layer.name, "")) or by_name.get(str(meta.get("image", ""))) or images[0]
        fix = corrections(layer, step)
        pairs.append(PairChoice(layer.name, image.name, None if fix is None else fix.total))
    return pairs


def pair_data(viewer: Any, pair: PairChoice) -> list[PairData]:
    """Copy a pair's 2D training slices (image and labels) out of the layers."""
    if pair.labels not in viewer.layers or pair.image not in viewer.layers:
        raise R2UNetError(f"layer {pair.labels!r} or {pair.image!r} was removed; refresh the list of pairs")
    labels_layer, image_layer = viewer.layers[pair.labels], viewer.layers[pair.image]
    if labels_layer.data.dtype.kind not in "biu":
        raise R2UNetError(f"labels layer {pair.labels!r} has dtype {labels_layer.data.dtype}; labels must be integers")
    step = tuple(viewer.dims.current_step)
    fix = corrections(labels_layer, step)
    out = []
    for index in training_slices(labels_layer, step):
        job = plan_job(image_layer, index, all_slices=False)
        changed = None
        if fix is not None:
            changed = fix.changed if fix.changed.ndim == 2 else fix.changed[index]
        out.append(PairData(
            pair.labels if not index else f"{pair.labels}[{','.join(map(str, index))}]",
            np.array(job.data),  # copies: the user may edit or close layers while training runs
            job.channel_axis,
            np.array(labels_layer.data[index]) if index else np.array(labels_layer.data),
            None if changed is None else np.array(changed),
        ))
    return out


def finetune(request: FinetuneRequest, emit: Callable[[Any], None], should_stop: Callable[[], bool],
             finished: threading.Event | None = None) -> str:
    """The worker (:func:`src_models.finetune.finetune`), with all CPU cores but one for torch."""
    from ._worker import limit_cpu_threads

    return run_finetune(request, emit, should_stop, finished, prepare=limit_cpu_threads)


def doubtful_regions(uncertainty: np.ndarray, window: int = 64, count: int = 20) -> list[tuple[int, int, float]]:
    """Centres ``(y, x, mean uncertainty)`` of the ``count`` most uncertain ``window``-sized cells."""
    h, w = uncertainty.shape
    window = max(8, min(window, h, w))
    ny, nx = max(1, h // window), max(1, w // window)
    cells = uncertainty[: ny * window, : nx * window].reshape(ny, window, nx, window).mean(axis=(1, 3))
    order = np.argsort(cells, axis=None)[::-1][:count]
    return [(int(i // nx) * window + window // 2, int(i % nx) * window + window // 2, float(cells.flat[i])) for i in order]
