"""From napari layers to the engine and back: what to predict, and results as layers.

This module owns the layer rules of the plugin:

- :func:`plan_job` decides what part of an Image layer to predict: a 2D (gray or RGB) image
  whole, or for stacks and time series the current 2D slice or every slice;
- :func:`add_result_layers` adds a new Labels layer named after the image and the model
  (:func:`result_name`: the model's short tag, :func:`model_tag`; the full name in the metadata), with the
  image's scale, translate, affine and metadata (and optionally a probability Image layer); the
  probabilities and the model's own prediction are kept in ``layer.metadata["r2unet"]``, so the
  threshold can be changed later without running the network again and corrections can be found;
- :func:`fill_unlabelled` writes a result into an existing Labels layer through its undo history,
  only where it is 0: pixels a user painted are never overwritten;
- :func:`rethreshold` re-derives labels from the stored probabilities, keeping user edits, and
  applies or removes the model card's post-processing (``metadata["r2unet"]["postprocess"]``,
  applied when ``"postprocessed"`` is true) on the thresholded mask, plane by plane.

The stored ``prediction`` is always what the plugin last showed (thresholded, post-processed
when that is on): a pixel that differs from it is the user's edit and keeps its value.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from src_models.labels import foreground_probability
from src_models.model_card import Postprocess

META_KEY = "r2unet"
OUTPUT_KEY = "r2unet_output"  # marks the Image layers we add (probability, uncertainty)


@dataclass
class Job:
    """What one segmentation run predicts. ``index`` selects the slice (``()`` = everything).

    ``tile``, ``overlap``, ``tta`` and ``scale`` are the Segmenter's options; ``None`` lets it choose
    (:mod:`src_models.settings`: AUTO_TILE, AUTO_OVERLAP_PIXELS).
    """

    data: Any  # (H, W), (H, W, C) for one image; (..., H, W[, C]) for all slices
    channel_axis: int | None
    stack: bool
    index: tuple[int, ...]
    spatial_shape: tuple[int, ...]  # the Labels layer's full shape (leading axes + H, W)
    tile: int | None = None  # largest tile side in pixels; None = automatic
    overlap: float | None = None  # overlap of neighbouring tiles, a fraction of the tile; None = automatic
    tta: bool = False  # average the predictions of the 4 flipped images
    scale: str = "auto"  # auto (the model card's training scale), 1 (native) or a factor, as text
    precision: str = "auto"  # auto (fp32 on the CPU: the widget does not compile; mixed on CUDA), fp32 or bf16

    @property
    def channels(self) -> int:
        """Channels of each predicted image (1 for gray; RGB(A) layers have theirs last)."""
        return int(self.data.shape[self.channel_axis]) if self.channel_axis is not None else 1


def plan_job(layer: Any, current_step: tuple[int, ...], all_slices: bool, *,
             tile: int | None = None, overlap: float | None = None, tta: bool = False, scale: str = "auto",
             precision: str = "auto") -> Job:
    """Job for an Image layer: 2D images whole; stacks by current slice or all slices."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]  # the full-resolution level
    rgb = bool(getattr(layer, "rgb", False))
    spatial = tuple(data.shape[:-1]) if rgb else tuple(data.shape)
    channel_axis = -1 if rgb else None
    leading = len(spatial) - 2
    options = {"tile": tile, "overlap": overlap, "tta": tta, "scale": scale, "precision": precision}
    if leading <= 0:
        return Job(data, channel_axis, False, (), spatial, **options)
    if all_slices:
        return Job(data, channel_axis, True, (), spatial, **options)
    index = tuple(int(i) for i in current_step[:leading])
    return Job(data[index], channel_axis, False, index, spatial, **options)


def result_bytes(job: Job, classes: int, add_probability: bool, add_uncertainty: bool) -> int:
    """Memory a result will take: the worker's float32 probabilities, their float16 copy and the
    labels in the layer metadata, the Labels layer, and the optional probability/uncertainty layers."""
    predicted = int(np.prod(job.spatial_shape)) if job.stack else int(np.prod(job.spatial_shape[-2:]))
    full = int(np.prod(job.spatial_shape))
    return predicted * (6 * classes + 1) + full * (1 + 4 * add_probability + 4 * add_uncertainty)


def _spatial_kwargs(image: Any) -> dict[str, Any]:
    # the affine too: a NIfTI volume's rotation and origin (the DICOM/NIfTI reader) must carry over
    return {"scale": tuple(image.scale), "translate": tuple(image.translate), "affine": image.affine.affine_matrix}


def label_colors() -> Any:
    """Colours that stand out on fundus and skin photographs: class 1 cyan, then yellow, magenta."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "white", 0: "transparent", 1: "cyan", 2: "yellow", 3: "magenta", 4: "lime"})


MAX_TAG = 28  # characters of a model's name in a layer name: the layer list cuts longer ones
_VERSION_NAME = re.compile(r"^(?P<base>.+?) (?P<when>ft \d\d-\d\d \d\d:\d\d)(?:, [^(]*?(?P<n> \(\d+\)))?(?:,.*)?$")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)].rstrip() + "\u2026"


def model_tag(model_name: str) -> str:
    """A model's short name for layer names, at most :data:`MAX_TAG` characters: a version named
    ``"BASE ft MM-DD HH:MM, 3 images (2), val Dice 0.812"`` becomes ``"BASE ft MM-DD HH:MM (2)"``
    (BASE cut to fit), any other name longer than that is cut with an ellipsis."""
    found = _VERSION_NAME.match(model_name)
    if found is None:
        return _cut(model_name, MAX_TAG)
    tail = f" {found['when']}{found['n'] or ''}"
    return _cut(found["base"], MAX_TAG - len(tail)) + tail


def result_name(image_name: str, model_name: str, kind: str = "") -> str:
    """``"image [model tag]"``, or ``"image KIND [model tag]"`` for a probability or uncertainty layer."""
    return f"{image_name} {kind + ' ' if kind else ''}[{model_tag(model_name)}]"


def labels_from(probs: np.ndarray, threshold: float, post: Postprocess | None = None) -> np.ndarray:
    """Labels ``(..., H, W)`` of ``probs`` ``(..., K, H, W)`` at ``threshold``, post-processed by ``post`` (per plane)."""
    from src_models.labels import probabilities_to_labels

    labels = probabilities_to_labels(probs, threshold)
    if post is None or not post.active:
        return labels
    from src_models.postprocess import apply_postprocess

    return apply_postprocess(labels, post)


def layer_postprocess(meta: dict[str, Any]) -> Postprocess:
    """The card post-processing a result layer was made with (none for layers made before cards)."""
    return Postprocess(**meta["postprocess"]) if meta.get("postprocess") else Postprocess()


def _full_volume(job: Job, values: np.ndarray, dtype: Any) -> np.ndarray:
    """Place a result into an array of the layer's full spatial shape (zeros elsewhere)."""
    if values.shape == job.spatial_shape:
        return values.astype(dtype, copy=False)
    full = np.zeros(job.spatial_shape, dtype=dtype)
    full[job.index] = values
    return full


def add_result_layers(viewer: Any, image: Any, job: Job, probs: np.ndarray, threshold: float,
                      model_name: str, add_probability: bool, add_uncertainty: bool = False, spec: str = "",
                      postprocess: Postprocess | None = None, postprocessed: bool = False) -> Any:
    """New Labels layer (and optional probability and uncertainty layers) for ``probs`` ``(..., K, H, W)``.

    ``postprocess``: the model card's post-processing, applied when ``postprocessed``; both are
    kept so that the threshold slider and the post-process checkbox can re-derive the labels.
    """
    post = postprocess or Postprocess()
    labels = labels_from(probs, threshold, post if postprocessed else None)
    meta = {
        "model": model_name,
        "spec": spec,
        "image": image.name,
        "threshold": threshold,
        "index": job.index,
        "probabilities": probs.astype(np.float16),
        "prediction": labels.copy(),
        "postprocess": dataclasses.asdict(post),
        "postprocessed": bool(postprocessed and post.active),
    }
    layer = viewer.add_labels(
        _full_volume(job, labels, np.uint8),
        name=result_name(image.name, model_name),
        metadata={**dict(image.metadata), META_KEY: meta},
        colormap=label_colors(),
        **_spatial_kwargs(image),
    )
    if add_probability:
        viewer.add_image(
            _full_volume(job, foreground_probability(probs), np.float32),
            name=result_name(image.name, model_name, "probability"),
            colormap="magma", blending="additive", opacity=0.6, contrast_limits=(0.0, 1.0), visible=False,
            metadata={OUTPUT_KEY: "probability"}, **_spatial_kwargs(image),
        )
    if add_uncertainty:
        from src_models.labels import predictive_entropy

        viewer.add_image(
            _full_volume(job, predictive_entropy(probs), np.float32),
            name=result_name(image.name, model_name, "uncertainty"),
            colormap="inferno", blending="additive", opacity=0.7, contrast_limits=(0.0, 1.0),
            metadata={OUTPUT_KEY: "uncertainty"}, **_spatial_kwargs(image),
        )
    viewer.layers.selection.active = layer
    return layer


def fill_unlabelled(target: Any, job: Job, labels: np.ndarray) -> int:
    """Write ``labels`` into ``target`` where it is 0, through its undo history; returns the count."""
    region = np.asarray(target.data[job.index]) if job.index else np.asarray(target.data)
    if region.shape != labels.shape:
        raise ValueError(f"the labels layer {target.name!r} has shape {region.shape}, the result {labels.shape}")
    fill = (region == 0) & (labels > 0)
    where = np.nonzero(fill)
    if where[0].size:
        indices = tuple(np.full(where[0].size, i) for i in job.index) + where
        target.data_setitem(indices, labels[fill])
    return int(where[0].size)


def rethreshold(layer: Any, threshold: float, postprocessed: bool | None = None) -> int:
    """New labels from the stored probabilities; pixels the user changed keep their value.

    ``postprocessed``: apply (True) or remove (False) the layer's card post-processing; None
    keeps its current state. Returns how many pixels changed.
    """
    meta = layer.metadata.get(META_KEY)
    if not meta or "probabilities" not in meta:
        return 0
    post = layer_postprocess(meta)
    applied = bool(meta.get("postprocessed")) if postprocessed is None else postprocessed and post.active
    new = labels_from(meta["probabilities"].astype(np.float32), threshold, post if applied else None)
    index = tuple(meta.get("index", ()))
    current = np.asarray(layer.data[index]) if index else np.asarray(layer.data)
    edited = current != meta["prediction"]
    updated = np.where(edited, current, new).astype(current.dtype)
    changed = int((updated != current).sum())
    if index:
        layer.data[index] = updated
    else:
        layer.data[...] = updated
    meta["prediction"] = new
    meta["threshold"] = threshold
    meta["postprocessed"] = applied
    layer.refresh()
    return changed
