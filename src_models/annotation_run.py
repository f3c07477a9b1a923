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
from .finetune import VALIDATION_HOLDOUT, FinetuneRequest, PairData


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


def retrain_request(session: FolderSession, out: Path, name: str, minutes: float | None = 5.0, epochs: int | None = None,
                    validation: str = VALIDATION_HOLDOUT, settings: dict[str, Any] | None = None) -> FinetuneRequest:
    """A fine-tune of the session's model on every saved correction of the folder."""
    if not session.model:
        raise R2UNetError("the folder has no model yet: choose a model and press Next first")
    pairs = training_pairs(session)
    if not pairs:
        raise R2UNetError("no saved correction in this folder yet: correct an image (it is saved when you move on), then retrain")
    changed = sum(int(np.count_nonzero(p.changed)) for p in pairs if p.changed is not None)
    description = (f"{Path(session.model).stem} fine-tuned on {len(pairs)} corrected image(s) of {session.images_dir} "
                   f"({changed:,} pixels changed from the predictions)")
    return FinetuneRequest(base=session.model, pairs=pairs, out=out, name=name, epochs=epochs, minutes=minutes,
                           validation=validation, settings=dict(settings or {}), description=description)


def adopt_version(session: FolderSession, path: str) -> tuple[bool, str]:
    """Make the version at ``path`` the session's model when it beat its base; ``(adopted, why)``."""
    from .user_versions import list_versions

    version = next((v for v in list_versions(Path(path).parent) if str(v.path) == str(path)), None)
    if version is None:
        return False, "no version was written"
    after, before = version.metrics.get("F1"), version.metrics_before.get("F1")
    if after is not None and before is not None and not after > before:
        return False, (f"the new version is no better than {Path(session.model).stem} on its validation blocks "
                       f"(Dice {before:.3f} -> {after:.3f}): the folder keeps its model; correct more images first")
    session.set_model(str(path))
    score = f" (validation Dice {before:.3f} -> {after:.3f})" if after is not None and before is not None else ""
    return True, f"the folder now predicts with {version.name}{score}"
