"""A folder of images a person annotates over days: which image is where, saved at every step.

This module owns a folder annotation session (torch-free; running models over it is
:mod:`src_models.annotation_run`'s, the napari dock widget is ``napari_r2unet._annotate_widget``):

- the images: every image file directly in one folder, by sample ID (the file name without its
  suffix);
- the corrections: one label file per image (:mod:`src_models.label_files`: 0/255 with its
  provenance) in the labels folder, by default ``<images>/labels``, configurable to anywhere;
  an optional folder of existing masks is read (never written) as the starting labels;
- the model's predictions, kept in ``<labels>/.r2unet/predictions/<id>.npz`` (probabilities in
  1/255 steps and the labels shown), so Next is instant and a correction keeps its link to the
  prediction it started from;
- the state file ``<labels>/r2unet-session.json``: per image its status (new / predicted /
  corrected / done), the model behind its prediction, its uncertainty, its corrected-pixel count
  and timestamps; the session's model and position;
- a lock file ``<labels>/.r2unet-session.lock`` naming the process that holds the folder, so two
  napari windows never write the same corrections (a lock left by a process that is gone, after
  a crash or kill -9, is taken over).

Rules that keep a person's work: every write is atomic; a prediction never replaces a saved
correction; a prediction becomes a correction only when the person marks the image done; an
image that cannot be read is marked with the reason and skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import R2UNetError
from .fileio import atomic_write

STATE_FILE = "r2unet-session.json"
LOCK_FILE = ".r2unet-session.lock"
PREDICTIONS = Path(".r2unet") / "predictions"
NEW, PREDICTED, CORRECTED, DONE = "new", "predicted", "corrected", "done"
STATUSES = (NEW, PREDICTED, CORRECTED, DONE)
ORDERS = ("uncertainty", "sequential")
_HELD: set[str] = set()  # lock files held by sessions of this process


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


@dataclass
class Entry:
    """One image of the folder and where its annotation stands."""

    id: str
    image: str  # file name in the images folder
    status: str = NEW
    model: str = ""  # the model (name or version path) behind the prediction
    uncertainty: float | None = None  # mean predictive entropy of the prediction, 0..1
    expected_errors: float | None = None  # sum of min(p, 1 - p): the pixels the model expects to be wrong
    corrected_pixels: int = 0  # pixels the saved correction changed from the prediction
    predicted_at: str = ""
    saved_at: str = ""
    done_at: str = ""
    mask: str = ""  # an existing mask it started from (masks folder), if any
    error: str = ""  # why the image is skipped (unreadable, vanished, mask mismatch)

    @property
    def saved(self) -> bool:
        """A person's correction exists for it (corrected or done)."""
        return self.status in (CORRECTED, DONE)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        names = {f.name for f in dataclasses.fields(cls)}
        entry = cls(**{k: v for k, v in data.items() if k in names})
        if entry.status not in STATUSES:
            entry.status = NEW
        return entry


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


class FolderLock:
    """``<labels>/.r2unet-session.lock``: who holds the folder (user, host, pid, since)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.token = uuid.uuid4().hex

    def holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # another machine: we cannot tell; the person decides
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return str(self.path.resolve()) not in _HELD  # ours, but no open session here holds it
        return not _pid_alive(pid)

    def _refuse(self, holder: dict[str, Any]) -> R2UNetError:
        return R2UNetError(
            f"{self.path.parent} is open in another napari ({holder.get('user', '?')}, pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')}); close it there first, or delete {self.path} "
            "if that napari is gone")

    def acquire(self) -> None:
        record = json.dumps({"user": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(), "since": _now(),
                             "token": self.token})
        holder = self.holder()
        if holder is None:  # nobody: create it exclusively, so two windows opening at once cannot both win
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise self._refuse(self.holder() or {}) from None
            except OSError as exc:
                raise R2UNetError(f"cannot write in {self.path.parent}: {exc.strerror or exc}; choose a labels folder you can write to") from exc
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
        elif holder.get("token") != self.token:
            if not self._stale(holder):
                raise self._refuse(holder)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(record), suffix=".lock")  # a gone process's lock
        _HELD.add(str(self.path.resolve()))

    def release(self) -> None:
        _HELD.discard(str(self.path.resolve()))
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _masks_by_id(folder: Path | None) -> dict[str, Path]:
    if folder is None:
        return {}
    from .data import list_images, sample_id

    return {sample_id(p): p for p in list_images(folder)}


class FolderSession:
    """The annotation state of one folder; see the module docstring. Thread-safe: a background
    worker may save predictions while the GUI saves corrections."""

    def __init__(self, images: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None,
                 masks: str | os.PathLike[str] | None = None) -> None:
        self.images_dir = Path(images).expanduser()
        if not self.images_dir.is_dir():
            raise R2UNetError(f"folder {self.images_dir} does not exist or is not a folder; choose the folder of your images")
        self.labels_dir = Path(labels).expanduser() if labels else self.images_dir / "labels"
        self.masks_dir = Path(masks).expanduser() if masks else None
        self._mutex = threading.RLock()
        self._make_folders()
        self.lock = FolderLock(self.labels_dir)
        self.lock.acquire()
        try:
            self.state = self._load_state()
            self.entries: dict[str, Entry] = {e["id"]: Entry.from_json(e) for e in self.state.get("images", [])}
            self.scan()
        except BaseException:
            self.lock.release()
            raise

    # -- files -------------------------------------------------------------------------------
    def _make_folders(self) -> None:
        try:
            (self.labels_dir / PREDICTIONS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise R2UNetError(f"cannot create the labels folder {self.labels_dir}: {exc.strerror or exc}; "
                              "choose a labels folder you can write to") from exc
        if not os.access(self.labels_dir, os.W_OK):
            raise R2UNetError(f"the labels folder {self.labels_dir} is read-only; choose a labels folder you can write to")

    @property
    def state_path(self) -> Path:
        return self.labels_dir / STATE_FILE

    def _load_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"version": 1, "images_dir": str(self.images_dir), "model": "", "current": "", "order": ORDERS[0]}
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise R2UNetError(f"the session file {self.state_path} is damaged ({exc}); move it away to start the folder afresh "
                              "(the saved corrections stay)") from exc
        if not isinstance(state, dict):
            raise R2UNetError(f"the session file {self.state_path} is damaged; move it away to start the folder afresh")
        return state

    def save_state(self) -> None:
        with self._mutex:
            self.state["images"] = [dataclasses.asdict(e) for e in self.entries.values()]
            self.state["saved_at"] = _now()
            text = json.dumps(self.state, indent=1)
            atomic_write(self.state_path, lambda tmp: Path(tmp).write_text(text), suffix=".json")

    def image_path(self, image_id: str) -> Path:
        return self.images_dir / self.entries[image_id].image

    def correction_path(self, image_id: str) -> Path:
        return self.labels_dir / f"{image_id}.tif"

    def prediction_path(self, image_id: str) -> Path:
        return self.labels_dir / PREDICTIONS / f"{image_id}.npz"

    def scan(self) -> list[str]:
        """Add the folder's new images, mark vanished ones; returns the IDs added."""
        from .data import image_stem, list_images

        files = list_images(self.images_dir)
        masks = _masks_by_id(self.masks_dir)
        added = []
        with self._mutex:
            seen = set()
            for path in files:
                image_id = image_stem(path)
                if image_id in seen:
                    raise R2UNetError(f"two images in {self.images_dir} are named {image_id!r} (different suffixes); rename one")
                seen.add(image_id)
                entry = self.entries.get(image_id)
                if entry is None:
                    entry = self.entries[image_id] = Entry(image_id, path.name)
                    added.append(image_id)
                entry.image = path.name
                if entry.error.startswith("vanished"):
                    entry.error = ""
                self._adopt(entry, masks)
            for image_id, entry in self.entries.items():
                if image_id not in seen:
                    entry.error = f"vanished: {entry.image} is no longer in {self.images_dir}"
            self.entries = dict(sorted(self.entries.items()))
            self.save_state()
        return added

    def _adopt(self, entry: Entry, masks: dict[str, Path]) -> None:
        """A correction file found in the labels folder, or an existing mask, makes the image corrected."""
        if self.correction_path(entry.id).exists() and not entry.saved:
            entry.status, entry.saved_at = CORRECTED, entry.saved_at or _now()
        from .data import sample_id

        mask = masks.get(sample_id(Path(entry.image)))
        if mask is not None and not entry.saved:
            entry.mask, entry.status = str(mask), CORRECTED

    # -- reading ---------------------------------------------------------------------------------
    def read_image(self, image_id: str) -> np.ndarray:
        """The image's pixels; an unreadable or vanished image is marked and raises one line."""
        from .data import read_image

        try:
            image = read_image(self.image_path(image_id))
        except R2UNetError as exc:
            self.mark_error(image_id, str(exc))
            raise R2UNetError(f"{exc}; it is skipped: fix or remove the file, then reopen the folder") from exc
        return image

    def mark_error(self, image_id: str, message: str) -> None:
        with self._mutex:
            self.entries[image_id].error = message
            self.save_state()

    def saved_labels(self, image_id: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """The saved correction (or the existing mask it started from) as 0/1 or class labels; None if none.

        ``shape``: the image's (H, W); a correction of another size is refused with one line."""
        from .label_files import read_label_file

        path = self.correction_path(image_id)
        if path.exists():
            found = read_label_file(path)
            labels = found[0] if found is not None else self._plain_mask(path)
        elif self.entries[image_id].mask:
            labels = self._plain_mask(Path(self.entries[image_id].mask))
        else:
            return None
        if shape is not None and labels.shape != tuple(shape):
            raise R2UNetError(f"the mask for {image_id} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                              f"{shape[1]}x{shape[0]}; replace or remove {path if path.exists() else self.entries[image_id].mask}")
        return labels

    @staticmethod
    def _plain_mask(path: Path) -> np.ndarray:
        from .data import read_mask

        return read_mask(path).astype(np.uint8)

    def prediction(self, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(probabilities (K, H, W) float32, labels (H, W) uint8)`` of the stored prediction, or None."""
        path = self.prediction_path(image_id)
        try:
            with np.load(path) as data:
                return data["probs"].astype(np.float32) / 255.0, data["labels"]
        except (OSError, KeyError, ValueError):
            return None

    # -- writing -----------------------------------------------------------------------------
    def save_prediction(self, image_id: str, probs: np.ndarray, labels: np.ndarray, model: str) -> bool:
        """Store a prediction (``probs`` ``(K, H, W)``); a saved correction is never replaced (False then)."""
        from .labels import predictive_entropy

        probs = np.asarray(probs, dtype=np.float32)
        quantized = np.round(np.clip(probs, 0.0, 1.0) * 255).astype(np.uint8)
        p = probs[0] if probs.shape[0] == 1 else 1.0 - probs.max(axis=0)
        expected = float(np.minimum(p, 1.0 - p).sum()) if probs.shape[0] == 1 else float(p.sum())
        uncertainty = float(predictive_entropy(probs).mean())

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, probs=quantized, labels=np.asarray(labels, np.uint8))

        with self._mutex:  # a correction saved meanwhile keeps the prediction it started from
            entry = self.entries[image_id]
            if entry.saved:
                return False
            atomic_write(self.prediction_path(image_id), write, suffix=".npz")
            entry.model, entry.uncertainty, entry.expected_errors = model, uncertainty, expected
            entry.predicted_at, entry.error = _now(), ""
            if entry.status == NEW:
                entry.status = PREDICTED
            self.save_state()
            return True

    def save_correction(self, image_id: str, labels: np.ndarray, *, done: bool = False, binary: bool = True) -> bool:
        """Save the person's labels for an image; returns True when a file was written.

        Labels equal to the prediction of an image not yet corrected are not a correction: nothing
        is written unless ``done`` (the person accepts the prediction as it is).
        """
        from .label_files import write_label_file

        labels = np.asarray(labels)
        with self._mutex:
            entry = self.entries[image_id]
            stored = self.prediction(image_id)
            predicted = stored[1] if stored is not None and stored[1].shape == labels.shape else None
            changed = int(np.count_nonzero(labels != predicted)) if predicted is not None else int(np.count_nonzero(labels))
            if not entry.saved and not done and predicted is not None and changed == 0:
                return False
            provenance = {"image": entry.image, "status": DONE if done else (entry.status if entry.saved else CORRECTED),
                          "prediction_model": entry.model, "corrected_pixels": changed}
            write_label_file(self.correction_path(image_id), labels, binary=binary, provenance=provenance)
            entry.corrected_pixels, entry.saved_at, entry.error = changed, _now(), ""
            if done:
                entry.status, entry.done_at = DONE, entry.done_at or _now()
            elif entry.status != DONE:
                entry.status = CORRECTED
            self.save_state()
            return True

    def reopen(self, image_id: str) -> None:
        """A done image back to corrected (the person wants to change it again)."""
        with self._mutex:
            if self.entries[image_id].status == DONE:
                self.entries[image_id].status = CORRECTED
                self.save_state()

    # -- the queue ---------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return str(self.state.get("model", ""))

    def set_model(self, spec: str) -> None:
        """The model predictions are made with from now on (older predictions become stale)."""
        with self._mutex:
            self.state["model"] = spec
            self.save_state()

    @property
    def current(self) -> str:
        current = str(self.state.get("current", ""))
        return current if current in self.entries else ""

    def set_current(self, image_id: str) -> None:
        with self._mutex:
            self.state["current"] = image_id
            self.save_state()

    def to_predict(self, first: str = "") -> list[str]:
        """Images that need a prediction with the session's model (never a saved one), ``first`` first."""
        with self._mutex:
            ids = [e.id for e in self.entries.values()
                   if not e.saved and not e.error and (e.status == NEW or e.model != self.model)]
        return sorted(ids, key=lambda i: i != first)

    def next_id(self, order: str = "uncertainty", after: str = "") -> str | None:
        """The next image to correct: not saved, not skipped, not ``after``; None when all are done.

        ``uncertainty``: predicted images, most uncertain first, then those not predicted yet in
        file order (MONAI Label's active-learning order). ``sequential``: file order after ``after``.
        """
        if order not in ORDERS:
            raise R2UNetError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
        with self._mutex:
            todo = [e for e in self.entries.values() if not e.saved and not e.error and e.id != after]
            if not todo:
                return None
            if order == "sequential":
                ids = list(self.entries)
                start = ids.index(after) + 1 if after in ids else 0
                rank = {image_id: (i - start) % len(ids) for i, image_id in enumerate(ids)}
                return min(todo, key=lambda e: rank[e.id]).id
            scored = [e for e in todo if e.status == PREDICTED and e.uncertainty is not None and e.model == self.model]
            if scored:
                return max(scored, key=lambda e: e.uncertainty or 0.0).id
            return todo[0].id

    def saved_ids(self) -> list[str]:
        """Images with a person's correction (what Retrain now trains on)."""
        with self._mutex:
            return [e.id for e in self.entries.values() if e.saved and not e.error]

    def counts(self) -> dict[str, int]:
        with self._mutex:
            return {status: sum(e.status == status for e in self.entries.values()) for status in STATUSES}

    def close(self) -> None:
        """Write the state and give the folder back (the lock file goes)."""
        try:
            self.save_state()
        finally:
            self.lock.release()

    def __enter__(self) -> FolderSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
