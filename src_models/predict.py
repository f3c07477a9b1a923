"""Files through the whole pipeline: read, decide the layout, segment, threshold, write.

This module owns what ``r2unet predict`` / ``evaluate`` and ``make bench`` do with one image
file, apart from parsing and printing (that is :mod:`src_models.cli`'s job):

- :func:`card_options`: the threshold and post-processing a model's card asks for, unless the
  user overrides them;
- :func:`predict_array` decides how an array's axes are read (one 2D image, a colour image, a
  stack of slices) and runs the :class:`~src_models.inference.Segmenter` on it;
- :func:`final_labels`: probabilities -> the mask a user gets (threshold, then the card's
  post-processing for a binary model);
- :func:`predict_file` reads a file, predicts it and writes the mask (and the probabilities);
  ``make bench`` times exactly this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import R2UNetError
from .model_card import Postprocess
from .settings import DEFAULT_THRESHOLD
from .tiling import Progress

MAX_IMAGE_CHANNELS = 4  # a last (or first) axis this short is channels; models take 1-4


@dataclass(frozen=True)
class PredictOptions:
    """How to segment: ``None`` leaves the tiling to the Segmenter (see ``Segmenter.predict``)."""

    tile: int | None = None
    overlap: float | None = None  # a fraction of the largest tile
    batch_size: int | None = None
    threshold: float = DEFAULT_THRESHOLD
    stack: bool = False  # a 3D (N, H, W) array with N <= 4 is a stack, not channels
    postprocess: Postprocess = field(default_factory=Postprocess)  # applied to a binary model's mask


def card_options(checkpoint: Any, threshold: float | None = None, postprocess: bool = True, **tiling: Any) -> PredictOptions:
    """Options for ``checkpoint``: its card's threshold unless ``threshold`` is given, its card's
    post-processing unless ``postprocess`` is False; ``tiling`` are the other fields."""
    card = checkpoint.model_card
    return PredictOptions(threshold=card.threshold if threshold is None else threshold,
                          postprocess=card.postprocess if postprocess else Postprocess(), **tiling)


def image_layout(image: Any, options: PredictOptions, name: str = "the image") -> tuple[bool, int | None]:
    """``(stack, channel_axis)`` of an array (see :func:`predict_array` for the rules)."""
    planar = image.ndim == 3 and not options.stack
    if image.ndim == 2:
        return False, None
    if planar and image.shape[-1] <= MAX_IMAGE_CHANNELS:
        return False, -1
    if planar and image.shape[0] <= MAX_IMAGE_CHANNELS:
        return False, 0
    if planar and image.shape[-1] < min(image.shape[:2]) and image.shape[-1] < 16:
        raise R2UNetError(
            f"{name} looks like a {image.shape[-1]}-channel image {image.shape}; models take 1-{MAX_IMAGE_CHANNELS} channels. "
            "If it is a stack of 2D images, pass --stack"
        )
    colour = image.ndim >= 4 and image.shape[-1] <= MAX_IMAGE_CHANNELS
    return True, -1 if colour else None


def predict_array(segmenter: Any, image: Any, options: PredictOptions, name: str = "the image",
                  progress: Progress | None = None, labels_at: float | None = None) -> Any:
    """Probabilities ``(K, H, W)`` for a 2D image, ``(..., K, H, W)`` for a stack.

    Layouts: ``(H, W)``; ``(H, W, C)`` and planar ``(C, H, W)`` with C <= 4 are one colour image
    (``options.stack`` makes a 3D array a stack of gray slices); any other 3D+ array is a stack of
    gray slices ``(..., H, W)``, or of colour slices ``(..., H, W, C)`` when the last axis <= 4.
    With ``labels_at`` (a threshold), a 2D image gives a :class:`~src_models.labels.LabelSink`
    instead: its labels are thresholded band by band and the probabilities are never held whole.
    """
    from .labels import LabelSink

    stack, channel_axis = image_layout(image, options, name)
    checkpoint = segmenter.checkpoint
    run = dict(tile=options.tile, overlap=options.overlap, batch_size=options.batch_size, progress=progress)
    if stack:
        return segmenter.predict_stack(image, channel_axis=channel_axis, **run)
    height, width = image.shape[:2] if channel_axis == -1 else image.shape[-2:]
    out = None if labels_at is None else LabelSink(checkpoint.config.out_channels, height, width, threshold=labels_at)
    return segmenter.predict(image, channel_axis=channel_axis, out=out, **run)


def channel_notice(segmenter: Any, image: Any, options: PredictOptions) -> str | None:
    """:func:`~src_models.preprocessing.input_notice`'s line for this array and model: how its
    channels were fitted (gray repeated for an RGB model, ...); None when they fit as they are."""
    from .preprocessing import input_notice

    _, channel_axis = image_layout(image, options)
    checkpoint = segmenter.checkpoint
    return input_notice(1 if channel_axis is None else image.shape[channel_axis], checkpoint.preprocess, checkpoint.model_card.task)


def final_labels(probs: Any, options: PredictOptions, binary: bool) -> Any:
    """uint8 labels ``(..., H, W)`` of probabilities ``(..., K, H, W)`` (or a LabelSink's):
    thresholded at ``options.threshold``, then, for a ``binary`` model, post-processed as
    ``options.postprocess`` says (0/1; class labels for multi-class models)."""
    from .labels import LabelSink, probabilities_to_labels
    from .postprocess import apply_postprocess

    labels = probs.labels if isinstance(probs, LabelSink) else probabilities_to_labels(probs, options.threshold)
    return apply_postprocess(labels, options.postprocess) if binary else labels


def options_for(options: PredictOptions, meta: Any) -> PredictOptions:
    """``options`` for a file with this :class:`~src_models.medical_io.ImageMeta`: a volume or a
    multi-frame file is a stack of slices, even with 4 slices or fewer."""
    return replace(options, stack=True) if meta.stack and not options.stack else options


def mask_provenance(segmenter: Any, path: Path, options: PredictOptions) -> dict[str, Any]:
    """What a mask file records of how it was made: the model, the source image, the threshold, the post-processing."""
    checkpoint = segmenter.checkpoint
    return {"model": checkpoint.name, "model_sha256": getattr(checkpoint, "sha256", None) or "", "image": str(path),
            "threshold": float(options.threshold), "postprocess": asdict(options.postprocess)}


def predict_file(segmenter: Any, path: Path, mask_path: Path, prob_path: Path | None, options: PredictOptions,
                 progress: Progress | None = None, notice: Callable[[str], None] | None = None,
                 log: Callable[[str], None] | None = None) -> float:
    """One file through the whole pipeline (read, preprocess, tile, infer, blend, threshold,
    post-process, write); returns the foreground fraction. ``make bench`` times exactly this.

    The mask is uint8: our label file (:mod:`~src_models.label_files`: a TIFF with 0/255 for a
    binary model, class labels otherwise, and :func:`mask_provenance` in its description; napari
    opens it as Labels), or, for a ``mask_path`` ending with ``.nii``/``.nii.gz``, a NIfTI label
    volume (0/1, or class labels) with the input's affine. ``prob_path`` gets the float32 probabilities (P(foreground) for a
    binary model) as a TIFF, never post-processed. ``log`` gets one line describing a DICOM or
    NIfTI input (spacing); ``notice`` gets :func:`channel_notice`'s line once all is written (a
    failed file gets its error alone).
    """
    import numpy as np

    from .data import read_image_with_meta, write_tiff
    from .label_files import write_label_file
    from .medical_io import NIFTI_SUFFIXES, write_nifti_labels

    image, meta = read_image_with_meta(path)
    if log is not None and meta.format != "image":
        log(f"{Path(path).name}: {meta.summary()}")
    options = options_for(options, meta)
    binary = segmenter.checkpoint.config.out_channels == 1
    # probabilities not written: a 2D image is thresholded band by band (never held whole)
    labels_at = None if prob_path else options.threshold
    probs = predict_array(segmenter, image, options, Path(path).name, progress, labels_at=labels_at)
    labels = final_labels(probs, options, binary)
    if Path(mask_path).name.lower().endswith(NIFTI_SUFFIXES):
        write_nifti_labels(mask_path, labels, meta.affine if meta.affine is not None else np.eye(4), meta.header)
    else:
        write_label_file(mask_path, labels, binary=binary, provenance=mask_provenance(segmenter, path, options))
    if prob_path is not None:
        write_tiff(prob_path, np.squeeze(probs, axis=-3) if binary else probs)
    line = channel_notice(segmenter, image, options)
    if line and notice is not None:
        notice(line)
    return float((labels > 0).mean())
