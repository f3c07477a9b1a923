"""The Annotate widget's work without Qt: its layers, and the worker that predicts ahead.

- :func:`predict_folder` (a worker-thread generator): the session's images that need a
  prediction, the one on screen first, each stored as soon as it is done
  (:func:`src_models.annotation_run.predict_pending`) and its ID yielded to the GUI thread;
- :func:`session_layers`: the Image and Labels layers of one image of the session, the Labels
  layer carrying the prediction in ``metadata["r2unet"]`` the way the Segment widget's results
  do (so the threshold slider, "Next doubtful region" and the Fine-tune widget work on it);
- :func:`replace_prediction`: a new prediction into the open Labels layer through its undo
  history, only where the person has not painted.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from src_models.annotation import FolderSession

from ._layers import META_KEY, label_colors

SESSION_KEY = "r2unet_session"  # marks the layers the Annotate widget manages: {"id": ..., "folder": ...}


def predict_folder(session: FolderSession, spec: str, first: Callable[[], str], stop: threading.Event,
                   report: Callable[[str], None]) -> Iterator[str]:
    """Load ``spec`` (torch is imported here) and predict what the folder needs; yields IDs."""
    from src_models.annotation_run import folder_segmenter, predict_pending

    from ._worker import limit_cpu_threads

    limit_cpu_threads()  # before the model loads: onnxruntime sizes its thread pool from it
    segmenter, options = folder_segmenter(spec, log=report)
    yield from predict_pending(session, segmenter, options, stop.is_set, first, report)


def prediction_meta(session: FolderSession, image_id: str) -> dict[str, Any]:
    """``metadata["r2unet"]`` for an image's Labels layer: its stored prediction (empty if none yet)."""
    from src_models.model_card import Postprocess

    from ._models import model_card

    entry = session.entries[image_id]
    stored = session.prediction(image_id)
    card = model_card(entry.model) if entry.model else None
    post = card.postprocess if card is not None else Postprocess()
    meta: dict[str, Any] = {"model": entry.model, "spec": entry.model, "image": image_id, "index": (),
                            "threshold": card.threshold if card is not None else 0.5,
                            "postprocess": dataclasses.asdict(post), "postprocessed": post.active}
    if stored is not None:
        meta["probabilities"], meta["prediction"] = stored[0].astype(np.float16), stored[1].copy()
    return meta


def session_layers(viewer: Any, session: FolderSession, image_id: str, image: np.ndarray) -> tuple[Any, Any]:
    """Add an image of the session and its labels (the saved correction, else the prediction, else empty)."""
    rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
    shape = image.shape[:2] if rgb else image.shape
    labels = session.saved_labels(image_id, tuple(shape))
    meta = prediction_meta(session, image_id)
    if labels is None:
        labels = meta["prediction"] if "prediction" in meta else np.zeros(shape, np.uint8)
    tag = {SESSION_KEY: {"id": image_id, "folder": str(session.images_dir)}}
    image_layer = viewer.add_image(image, name=image_id, rgb=rgb, metadata=dict(tag))
    labels_layer = viewer.add_labels(np.array(labels, dtype=np.uint8), name=f"{image_id} labels", colormap=label_colors(),
                                     metadata={**tag, META_KEY: meta})
    viewer.layers.selection.active = labels_layer
    return image_layer, labels_layer


def replace_prediction(layer: Any, session: FolderSession, image_id: str) -> int:
    """Put the session's new prediction into ``layer`` where the person has not painted, through
    the layer's undo history; returns the number of pixels changed."""
    meta = layer.metadata.get(META_KEY) or {}
    new = prediction_meta(session, image_id)
    if "prediction" not in new:
        return 0
    current = np.asarray(layer.data)
    old = meta.get("prediction")
    untouched = current == old if old is not None and old.shape == current.shape else current == 0
    target = np.where(untouched, new["prediction"], current)
    where = np.nonzero(target != current)
    if where[0].size:
        layer.data_setitem(where, target[where])
    meta.update(new)
    layer.metadata[META_KEY] = meta
    return int(where[0].size)
