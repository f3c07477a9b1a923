"""Models over a folder session: predict the images ahead of the person, retrain on the corrections.

This module owns what runs a model for a :class:`~src_models.annotation.FolderSession` (the
napari Annotate widget's workers and ``benchmarks/hitl_simulation.py`` call the same functions):

- :func:`predict_image` / :func:`predict_pending`: predictions with the session's model, at the
  model card's threshold and post-processing, stored in the session (never over a correction);
- :func:`training_pairs`: every saved correction of the folder as a fine-tuning pair, with the
  pixels the person changed from the prediction (weighted up in training);
- :func:`retrain_request`: "Retrain now": a fine-tune of the session's model on all of them
  (:mod:`src_models.finetune`, validated on held-out blocks of each image);
- :func:`adopt_version`: the new version becomes the session's model when it beat its base on
  validation, so the images not yet corrected are predicted again with it.

Torch is imported by the callees only when a model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .annotation import FolderSession
from .errors import CancelledError, R2UNetError
from .finetune import (
    HOLDOUT_FRACTION,
    VALIDATION_HOLDOUT,
    VALIDATION_IMAGES,
    VALIDATION_NONE,
    FinetuneRequest,
    PairData,
)

VALIDATION_AUTO = "auto"
MIN_IMAGES_TO_HOLD_OUT = 3  # from this many corrected images on, "auto" validates on whole held-out images
REHEARSAL_CONFIDENCE = 0.9  # a rehearsed pixel counts where the model's probability is at least this sure (p >= 0.9 or <= 0.1)
REHEARSAL_WEIGHT = 0.5  # its loss weight (a corrected image's pixels weigh 1, its corrected pixels more)
MAX_REHEARSED = 20


def folder_segmenter(spec: str, device: str = "auto", log: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """``(Segmenter, PredictOptions)`` for a folder's model: loaded by name or path, at its card's
    threshold and post-processing (what :func:`predict_pending` is given)."""
    from .inference import Segmenter
    from .model_names import load_model
    from .predict import card_options

    checkpoint = load_model(spec)
    return Segmenter(checkpoint, device=device, log=log), card_options(checkpoint)


def predict_image(session: FolderSession, segmenter: Any, image_id: str, options: Any,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Predict one image of the session with ``segmenter`` and store it; returns its labels."""
    from .predict import final_labels, image_layout

    image = session.read_image(image_id)
    stack, channel_axis = image_layout(image, options, session.entries[image_id].image)
    if stack:
        message = f"{session.entries[image_id].image} is a stack {image.shape}; a folder session takes one 2D image per file"
        session.mark_error(image_id, message)
        raise R2UNetError(message)
    probs = np.asarray(segmenter.predict(image, channel_axis=channel_axis, should_stop=should_stop))
    labels = final_labels(probs, options, binary=probs.shape[0] == 1)
    session.save_prediction(image_id, probs, labels, model=session.model)
    return labels


def predict_pending(session: FolderSession, segmenter: Any, options: Any, should_stop: Callable[[], bool],
                    first: Callable[[], str] = lambda: "", report: Callable[[str], None] | None = None) -> Iterator[str]:
    """Predict every image that needs it (:meth:`FolderSession.to_predict`), ``first()`` first;
    yields each ID once stored. An unreadable image is marked, reported and skipped."""
    failed: set[str] = set()
    while not should_stop():
        todo = [i for i in session.to_predict(first()) if i not in failed]
        if not todo:
            return
        image_id = todo[0]
        try:
            predict_image(session, segmenter, image_id, options, should_stop)
        except CancelledError:
            return
        except R2UNetError as exc:
            failed.add(image_id)
            if report is not None:
                report(str(exc))
            continue
        yield image_id


def training_pairs(session: FolderSession) -> list[PairData]:
    """Every saved correction with its image (and the pixels changed from its prediction)."""
    pairs = []
    for image_id in session.saved_ids():
        image = session.read_image(image_id)
        shape = image.shape[:2] if image.ndim == 3 and image.shape[-1] <= 4 else image.shape[-2:]
        labels = session.saved_labels(image_id, tuple(shape))
        if labels is None:
            continue
        stored = session.prediction(image_id)
        changed = labels != stored[1] if stored is not None and stored[1].shape == labels.shape else None
        pairs.append(PairData(image_id, image, "auto", labels, changed, source=str(session.image_path(image_id))))
    return pairs


def held_out_images(ids: list[str], fraction: float = HOLDOUT_FRACTION) -> tuple[str, ...]:
    """``round(fraction * n)`` (at least 1) of ``ids``, evenly spaced through them (deterministic)."""
    return tuple(_spread(ids, max(1, round(fraction * len(ids)))))


def auto_validation(spec: str, ids: list[str]) -> tuple[str, tuple[str, ...]]:
    """What "auto" validates a folder retrain on: whole corrected images held out once there are
    :data:`MIN_IMAGES_TO_HOLD_OUT` (the next image is another image, not another part of one);
    with fewer, blocks of each image for a tiled model and nothing for a resize (whole-image) one."""
    if len(ids) >= MIN_IMAGES_TO_HOLD_OUT:
        return VALIDATION_IMAGES, held_out_images(ids)
    from .checkpoint_files import describe, pretrained_catalog

    try:
        entry = pretrained_catalog().get(spec) or describe(spec)
        tiled = entry["card"].geometry.kind == "tiled"
    except (R2UNetError, KeyError):
        tiled = True
    return (VALIDATION_HOLDOUT if tiled else VALIDATION_NONE), ()


def _spread(ids: list[str], count: int) -> list[str]:
    """``count`` of ``ids`` evenly spaced through them (all of them when fewer)."""
    return [ids[int((i + 0.5) * len(ids) / count)] for i in range(count)] if count < len(ids) else list(ids)


def pseudo_labelled(session: FolderSession, image_id: str, **flags: bool) -> PairData | None:
    """An image not yet corrected with the folder model's own prediction as its target, counted
    only where the model is sure (``max(p, 1 - p) >= REHEARSAL_CONFIDENCE``, weight
    :data:`REHEARSAL_WEIGHT`); ``flags``: ``train_only`` or ``validate_only``. None if unreadable."""
    stored = session.prediction(image_id)
    if stored is None:
        return None
    try:
        image = session.read_image(image_id)
    except R2UNetError:
        return None
    probs, labels = stored
    sure = probs.max(axis=0) if probs.shape[0] > 1 else np.maximum(probs[0], 1.0 - probs[0])
    weight = np.where(sure >= REHEARSAL_CONFIDENCE, REHEARSAL_WEIGHT, 0.0).astype(np.float32)
    kind = "check" if flags.get("validate_only") else "rehearsal"
    return PairData(f"{kind}:{image_id}", image, "auto", labels, None, source=str(session.image_path(image_id)), weight=weight, **flags)


def rest_pairs(session: FolderSession, rehearse: int, check: int) -> list[PairData]:
    """Pseudo-labelled images of the rest of the folder (:func:`pseudo_labelled`), spread over it:
    ``rehearse`` to train on and ``check`` to validate on.

    Fine-tuning on a few corrected images, most uncertain first, pulls the model towards those
    hard cases and away from what it already did well on the rest of the folder (catastrophic
    forgetting). Rehearsing its confident predictions there keeps that (a pseudo-label rehearsal,
    as in learning without forgetting); validating on others as well as on the held-out
    corrections makes a version that fixes the hard cases by breaking the easy ones lose to its
    base, which scores perfectly on its own confident pixels.
    """
    ids = [e.id for e in session.entries.values() if not e.saved and not e.error and e.model == session.model]
    chosen = _spread(ids, rehearse + check)
    checks = set(chosen[::max(1, len(chosen) // check)][:check]) if check else set()
    pairs = [pseudo_labelled(session, i, validate_only=True) if i in checks else pseudo_labelled(session, i, train_only=True)
             for i in chosen]
    return [p for p in pairs if p is not None]


def retrain_request(session: FolderSession, out: Path, name: str, minutes: float | None = 5.0, epochs: int | None = None,
                    validation: str = VALIDATION_AUTO, settings: dict[str, Any] | None = None,
                    rehearse: bool = True, check: bool = True) -> FinetuneRequest:
    """A fine-tune of the session's model on every saved correction of the folder (``validation``:
    ``auto`` (:func:`auto_validation`), ``holdout``, ``images`` or ``none``); with ``rehearse``,
    as many images not yet corrected to rehearse (at most :data:`MAX_REHEARSED`) and, with a
    validation and ``check``, as many as are held out (at least 1) to check against (:func:`rest_pairs`)."""
    if not session.model:
        raise R2UNetError("the folder has no model yet: choose a model and press Next first")
    pairs = training_pairs(session)
    if not pairs:
        raise R2UNetError("no saved correction in this folder yet: correct an image (it is saved when you move on), then retrain")
    changed = sum(int(np.count_nonzero(p.changed)) for p in pairs if p.changed is not None)
    description = (f"{Path(session.model).stem} fine-tuned on {len(pairs)} corrected image(s) of {session.images_dir} "
                   f"({changed:,} pixels changed from the predictions)")
    held: tuple[str, ...] = ()
    if validation == VALIDATION_AUTO:
        validation, held = auto_validation(session.model, [p.id for p in pairs])
    elif validation == VALIDATION_IMAGES:
        held = held_out_images([p.id for p in pairs]) if len(pairs) > 1 else ()
    checks = max(1, len(held)) if check and validation != VALIDATION_NONE else 0
    pairs += rest_pairs(session, min(MAX_REHEARSED, len(pairs)) if rehearse else 0, checks)
    return FinetuneRequest(base=session.model, pairs=pairs, out=out, name=name, epochs=epochs, minutes=minutes,
                           validation=validation, held_out=held, settings=dict(settings or {}), description=description)


def adopt_version(session: FolderSession, path: str) -> tuple[bool, str]:
    """Make the version at ``path`` the session's model when it beat its base; ``(adopted, why)``."""
    from .user_versions import list_versions

    versions = {str(v.path): v for v in list_versions(Path(path).parent)}
    version = versions.get(str(path))
    if version is None:
        return False, "no version was written"
    after, before = version.metrics.get("F1"), version.metrics_before.get("F1")
    if after is not None and before is not None and not after > before:
        current = versions[session.model].name if session.model in versions else Path(session.model).stem
        return False, (f"the new version is no better than {current} on the validation parts "
                       f"(Dice {before:.3f} -> {after:.3f}): the folder keeps its model; correct more images first")
    session.set_model(str(path))
    score = (f" (validation Dice {before:.3f} -> {after:.3f})" if after is not None and before is not None else
             f" (not validated: from {MIN_IMAGES_TO_HOLD_OUT} corrected images on, one in five is held out to check it)")
    return True, f"the folder now predicts with {version.name}{score}"
