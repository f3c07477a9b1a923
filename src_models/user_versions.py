"""Which fine-tuned VERSIONS the user has: a per-user folder of checkpoints, each one a new file.

This module owns where fine-tuned models live and how they are listed, named, exported and
told apart (shipped models are :mod:`src_models.checkpoint_files`'s; turning a name into a loaded model
is :mod:`src_models.model_names`'s). It is torch-free (checkpoint headers only), so the napari
widgets can list versions at start-up.

- The folder is ``$R2UNET_MODELS_DIR`` if set, else the platform's per-user data folder
  (``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux, ``~/Library/Application Support`` on macOS,
  ``%LOCALAPPDATA%`` on Windows) + ``napari-r2unet/models``.
- Every fine-tuning run writes a NEW file (:func:`new_version_path`), never an existing one; the
  base model is only read. What a version is (parent and its SHA-256, date, training data,
  budget, metrics before and after) lives in the checkpoint's own provenance, so a copied file
  keeps its history. Stored beside it are only the display name a user gives it
  (``names.json``), so renaming never rewrites weights, and the masks it was trained on
  (``<version stem>.training/``, :func:`training_folder`; not listed as versions, not exported
  unless asked).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint_files import describe
from .errors import R2UNetError
from .fileio import atomic_copy, atomic_write, user_folder
from .model_card import ModelCard

MODELS_ENV = "R2UNET_MODELS_DIR"
NAMES_FILE = "names.json"
TRAINING_SUFFIX = ".training"  # <version stem>.training/: the masks a version was trained on


def user_models_dir() -> Path:
    """The per-user folder of fine-tuned versions (not created here)."""
    folder = user_folder("data", MODELS_ENV)
    return folder if os.environ.get(MODELS_ENV) else folder / "models"


def ensure_models_dir(folder: Path | None = None) -> Path:
    folder = folder or user_models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise R2UNetError(f"cannot create the model folder {folder}: {exc.strerror or exc}; set {MODELS_ENV} to a writable folder") from exc
    return folder


@dataclass(frozen=True)
class Version:
    """One fine-tuned model, described from its checkpoint header (and its display name)."""

    path: Path
    name: str
    arch: str
    parent: str = ""
    parent_sha256: str = ""
    created: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_before: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    card: ModelCard = field(default_factory=ModelCard)  # from the checkpoint (task, geometry, threshold, ...)

    @property
    def id(self) -> str:
        return self.path.stem

    @property
    def summary(self) -> str:
        """One line for a tooltip: parent, date, data, budget, metrics before -> after."""
        parts = [f"{self.arch} fine-tuned from {self.parent or '?'}"]
        if self.created:
            parts.append(self.created.replace("T", " ")[:16])
        data = self.provenance.get("training_data", {})
        if data.get("train_ids"):
            parts.append(f"on {', '.join(data['train_ids'])}")
        budget = self.provenance.get("budget")
        if budget:
            parts.append(str(budget))
        f1, before = self.metrics.get("F1"), self.metrics_before.get("F1")
        if isinstance(f1, (int, float)):
            parts.append(f"val F1 {before:.3f} -> {f1:.3f}" if isinstance(before, (int, float)) else f"val F1 {f1:.3f}")
        return "; ".join(parts)


def _names(folder: Path) -> dict[str, str]:
    try:
        names = json.loads((folder / NAMES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


def list_versions(folder: Path | None = None) -> list[Version]:
    """Versions in ``folder``, oldest first. Unreadable files are skipped, never fatal."""
    folder = folder or user_models_dir()
    if not folder.is_dir():
        return []
    names = _names(folder)
    versions = []
    for path in sorted(folder.glob("*.safetensors")):
        if path.name.startswith("."):
            continue  # a temporary file of a write in progress
        try:
            entry = describe(path)
        except R2UNetError:
            continue
        if "arch" not in entry["config"]:
            continue  # a safetensors file of another tool
        prov = entry["provenance"]
        versions.append(Version(
            path=path,
            name=names.get(path.stem) or str(prov.get("name") or path.stem),
            arch=str(entry["config"].get("arch", "?")),
            parent=str(prov.get("parent", "")),
            parent_sha256=str(prov.get("parent_sha256", "")),
            created=str(prov.get("created", "")),
            metrics=_numbers(prov.get("metrics")),
            metrics_before=_numbers(prov.get("metrics_before")),
            provenance=prov,
            card=entry["card"],
        ))
    return sorted(versions, key=lambda v: (v.created, v.id))


def _numbers(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float))}


def slug(text: str) -> str:
    """A safe file-name stem from any model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "model"


def training_folder(path: str | os.PathLike[str]) -> Path:
    """Where a version's training masks are kept: ``<version stem>.training/`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + TRAINING_SUFFIX)


def new_version_path(base_name: str, folder: Path | None = None, now: _dt.datetime | None = None) -> Path:
    """A path that does not exist yet, reserved for one run: ``<base>-ft-<date>-<time>[-n].safetensors``.

    The reservation is its (empty) training folder, made here with one atomic ``mkdir``: two runs
    started in the same second (the Fine-tune and Annotate widgets both start them) got the same
    path before, wrote into each other's files, and a cancel deleted the other run's. The run
    fills the folder with its masks, or removes it (:func:`release_version_path`)."""
    folder = ensure_models_dir(folder)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    stem = f"{slug(base_name.split('-ft-')[0])}-ft-{stamp}"
    path, n = folder / f"{stem}.safetensors", 1
    while True:
        if not path.exists() and not path.with_name(f"{path.stem}.resume.pt").exists():
            try:
                training_folder(path).mkdir()
                return path
            except FileExistsError:
                pass
            except OSError as exc:
                raise R2UNetError(f"cannot create {training_folder(path)}: {exc.strerror or exc}; "
                                  f"set {MODELS_ENV} to a writable folder") from exc
        n += 1
        path = folder / f"{stem}-{n}.safetensors"


@contextlib.contextmanager
def reserved_version_path(base_name: str) -> Iterator[Path]:
    """:func:`new_version_path` for a block that prepares the run: given back if the block raises."""
    path = new_version_path(base_name)
    try:
        yield path
    except BaseException:
        release_version_path(path)
        raise


def release_version_path(path: str | os.PathLike[str]) -> None:
    """Give up a :func:`new_version_path` reservation that holds nothing: its training folder goes
    if it is empty (a folder with masks in it stays)."""
    with contextlib.suppress(OSError):
        training_folder(path).rmdir()


_SCORE = re.compile(r", val Dice \d+(\.\d+)?$")


def version_base(name: str) -> str:
    """The model a name descends from: ``"r2unet-drive ft 12-02 21:05, 3 images"`` -> ``"r2unet-drive"``
    (a version of a version is named after the first base; a file's ``.safetensors`` is dropped)."""
    return name.split(" ft ")[0].strip().removesuffix(".safetensors").strip() or "model"


def version_name(base_name: str, images: int, existing_names: Iterable[str], now: _dt.datetime | None = None) -> str:
    """A new version's display name, unique among ``existing_names``: ``"r2unet-drive ft 12-02 21:05,
    3 images"`` (then `` (2)``, `` (3)``, ... in the same minute); :func:`scored_name` adds its score."""
    stamp = (now or _dt.datetime.now()).strftime("%m-%d %H:%M")
    name = f"{version_base(base_name)} ft {stamp}, {images} image{'' if images == 1 else 's'}"
    taken = {_SCORE.sub("", existing) for existing in existing_names}
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} ({n})"
    return candidate


def scored_name(name: str, dice: float) -> str:
    """``name`` with its validation score: ``"..., 3 images, val Dice 0.812"`` (an older score replaced)."""
    return f"{_SCORE.sub('', name)}, val Dice {dice:.3f}"


def rename_version(path: str | os.PathLike[str], name: str) -> None:
    """Give the version at ``path`` a display name (stored beside it; the weights are untouched)."""
    path = Path(path)
    name = " ".join(name.split())
    if not name:
        raise R2UNetError("a version name cannot be empty")
    if not path.is_file():
        raise R2UNetError(f"version {path} does not exist any more")
    names = _names(path.parent)
    names[path.stem] = name
    text = json.dumps(names, indent=1, sort_keys=True)
    atomic_write(path.parent / NAMES_FILE, lambda tmp: Path(tmp).write_text(text), suffix=".json")


def export_destination(path: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """The file an export to ``destination`` (a file or a folder) writes."""
    destination = Path(destination).expanduser()
    if destination.is_dir():
        destination = destination / Path(path).name
    if destination.suffix != ".safetensors":
        destination = destination.with_name(destination.name + ".safetensors")
    return destination


def export_version(path: str | os.PathLike[str], destination: str | os.PathLike[str], overwrite: bool = False,
                   with_training: bool = False) -> Path:
    """Copy a version's checkpoint to ``destination`` (a file or a folder); returns the new path.

    Its training masks (:func:`training_folder`, made from the user's images) stay behind unless
    ``with_training``: a model is shared, not the data it was corrected on."""
    source, destination = Path(path), export_destination(path, destination)
    if destination.resolve() == source.resolve():
        raise R2UNetError(f"{destination} is the version itself; export to another place")
    if destination.exists() and not overwrite:
        raise R2UNetError(f"{destination} already exists; choose another name")
    if not source.is_file():
        raise R2UNetError(f"version {source} does not exist any more")
    atomic_copy(source, destination)
    masks, copies = training_folder(source), training_folder(destination)
    if with_training and masks.is_dir():
        try:
            copies.mkdir(exist_ok=True)
        except OSError as exc:
            raise R2UNetError(f"cannot create {copies}: {exc.strerror or exc}; export to a writable folder") from exc
        for mask in sorted(masks.glob("*.tif")):
            atomic_copy(mask, copies / mask.name)
    return destination
