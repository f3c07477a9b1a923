"""The one checkpoint format: ``.safetensors`` weights plus JSON metadata. Loading never runs code.

A checkpoint holds the float tensors of a model's ``state_dict`` and these string metadata keys:

- ``format`` = ``napari-r2unet.checkpoint``, ``format_version`` = ``1``;
- ``config``: :class:`~src_models.nets.ModelConfig` as JSON;
- ``preprocess``: :class:`~src_models.preprocessing.PreprocessConfig` as JSON;
- ``class_names``: JSON list, one name per output class (``["vessel"]`` for a binary model);
- ``provenance``: JSON object (training data summary, epochs, metrics, ``parent_sha256``,
  ``package_version``, ``created``, free-form extras);
- ``card``: :class:`~src_models.model_card.ModelCard` as JSON (task, modality, data, licence,
  geometry, threshold, post-processing, metrics); a file without one (older checkpoints, the
  shipped DRIVE models before cards) gets :func:`~src_models.model_card.derived_card`;
- ``weights_sha256``: SHA-256 over the tensors (names, dtypes, shapes, bytes), checked on load,
  so a bit flip anywhere in the weights is reported instead of silently giving wrong masks.

:func:`load_checkpoint` checks, before allocating anything: the file exists and is readable,
the 8-byte header length fits in the file and under 100 MB, the header parses, the metadata is
ours, every tensor name and shape matches the network its config describes (the first
checks are :func:`~src_models.checkpoint_files.read_header`'s, which also refuses a truncated file). A legacy ``.pt``/
``.pth`` file is read only through ``torch.load(weights_only=True)`` and must be a dict with
``config`` and ``state_dict``. Every failure is an :class:`~src_models.errors.R2UNetError` whose
one-line message names the file and the problem. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint_files import FORMAT, read_header
from .errors import R2UNetError
from .fileio import atomic_write
from .model_card import ModelCard, card_from_metadata, derived_card
from .nets import ModelConfig, build_model, state_shapes
from .preprocessing import PreprocessConfig

T = TypeVar("T")

FORMAT_VERSION = "1"
LEGACY_SUFFIXES = (".pt", ".pth")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Checkpoint:
    """A loaded (or about to be saved) model: config, preprocessing, weights and provenance."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    class_names: tuple[str, ...] = ("foreground",)
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None
    card: ModelCard | None = None  # None: derived from the rest (see :attr:`model_card`)
    package: Any = None  # another tool's bioimage.io package (src_models.bioimageio.Package): prediction only

    def require_weights(self, what: str) -> None:
        """Refuse ``what`` (fine-tuning, export, ...) for a package that holds no napari-r2unet weights."""
        if self.package is not None:
            raise R2UNetError(f"{self.name} is a bioimage.io package from another tool: napari-r2unet can segment with it, "
                              f"not {what}; use a napari-r2unet model for that")

    @property
    def model_card(self) -> ModelCard:
        """The card saved with the weights, or the one derived from the class names and provenance."""
        return self.card or derived_card(self.class_names, self.provenance, self.preprocess.to_dict())

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The network with these weights, in eval mode, on ``device``."""
        self.require_weights("build its network (fine-tune, train from or export it)")
        model = build_model(self.config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    @property
    def name(self) -> str:
        return str(self.provenance.get("name") or (self.path.stem if self.path else self.config.arch))


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a CPU tensor (numpy's check: torch.isfinite's first calls in a process
    cost 0.1 s, a fifth of a warm DRIVE image)."""
    if tensor.dtype in (torch.float16, torch.float32, torch.float64) and tensor.device.type == "cpu":
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Digest over names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")  # the buffer itself, no copy
    return digest.hexdigest()


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP/DataParallel) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | Mapping[str, torch.Tensor],
    config: ModelConfig,
    preprocess: PreprocessConfig,
    class_names: tuple[str, ...] | list[str] = ("foreground",),
    provenance: Mapping[str, Any] | None = None,
    card: ModelCard | None = None,
) -> str:
    """Write a checkpoint atomically; return the SHA-256 of the file written.

    ``card`` is stored under the ``card`` key; without one the card derived from ``class_names``
    and ``provenance`` is stored, so every checkpoint written from now on carries a card.
    """
    from safetensors.torch import save_file

    raw = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in strip_prefixes(raw).items()}
    class_names = tuple(str(c) for c in class_names)
    if len(class_names) != config.out_channels:
        raise ValueError(f"{len(class_names)} class names given for a model with {config.out_channels} output channels")
    prov = {"package_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    prov.update(dict(provenance or {}))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "preprocess": preprocess.to_json(),
        "class_names": json.dumps(list(class_names)),
        "provenance": json.dumps(prov, sort_keys=True, default=str),
        "weights_sha256": weights_sha256(tensors),
        "card": (card or derived_card(class_names, prov, preprocess.to_dict())).to_json(),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), suffix=".safetensors")
    return file_sha256(path)


def _fail(path: Path, problem: str) -> R2UNetError:
    return R2UNetError(f"cannot load checkpoint {path}: {problem}")


def _parse_metadata(path: Path, metadata: Mapping[str, str] | None) -> tuple[ModelConfig, PreprocessConfig, tuple[str, ...], dict[str, Any], ModelCard]:
    if not metadata or metadata.get("format") != FORMAT:
        raise _fail(path, "no napari-r2unet metadata (format key missing); was it saved by r2unet?")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"format version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION}); update napari-r2unet")
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        preprocess = PreprocessConfig.from_dict(json.loads(metadata.get("preprocess", "{}")))
        class_names = tuple(str(c) for c in json.loads(metadata.get("class_names", '["foreground"]')))
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _fail(path, f"metadata is invalid ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(provenance, dict):
        raise _fail(path, "metadata 'provenance' is not a JSON object")
    if len(class_names) != config.out_channels:
        raise _fail(path, f"{len(class_names)} class names for {config.out_channels} output channels")
    try:
        card = card_from_metadata(metadata, class_names, provenance, preprocess.to_dict())
    except (ValueError, TypeError, RecursionError) as exc:
        raise _fail(path, f"its model card is invalid ({str(exc)[:200]}); re-save it with a valid card") from exc
    return config, preprocess, class_names, provenance, card


def _check_shapes(path: Path, config: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    expected = state_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {tuple(shapes[k])} vs {expected[k]})")
    if problems:
        raise _fail(path, f"weights do not match its {config.arch} config: " + "; ".join(problems))


def _check_values(path: Path, state_dict: Mapping[str, torch.Tensor], expected_sha: str | None) -> None:
    for key, tensor in state_dict.items():
        allowed = (torch.int64,) if key.endswith("num_batches_tracked") else _FLOAT_DTYPES
        if tensor.dtype not in allowed:
            raise _fail(path, f"tensor {key} has dtype {tensor.dtype}; expected {', '.join(map(str, allowed))}")
    if expected_sha is not None and weights_sha256(state_dict) != expected_sha:
        raise _fail(path, "weights do not match their recorded checksum; the file is corrupt, get a fresh copy")
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not _finite(tensor):
            raise _fail(path, f"tensor {key} holds NaN or Inf values; the model is broken")


def _load_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    read_header(path)  # whole and a checkpoint: the torch-free check the model menus run too
    file_digest = in_background(file_sha256, path, name="r2unet-hash")  # hashlib releases the GIL: it overlaps the checks below
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            config, preprocess, class_names, provenance, card = _parse_metadata(path, handle.metadata())
            _check_shapes(path, config, {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
            state_dict = {k: handle.get_tensor(k) for k in handle.keys()}
            expected_sha = (handle.metadata() or {}).get("weights_sha256")
    except SafetensorError as exc:
        raise _fail(path, f"not a valid .safetensors file ({str(exc).splitlines()[0]})") from exc
    _check_values(path, state_dict, expected_sha)
    return Checkpoint(config, state_dict, preprocess, class_names, provenance, path, file_digest(), card)


def in_background(fn: Callable[..., T], *args: Any, name: str = "r2unet-background") -> Callable[[], T]:
    """Start ``fn(*args)`` in a thread; the returned callable waits and gives its result or raises
    its error. Not a daemon thread: a process that exits meanwhile waits for it (a daemon stopped
    inside native code, onnxruntime's C++, aborted the process: "terminate called")."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append((fn(*args), None))
        except BaseException as exc:  # re-raised in the caller's thread
            result.append((None, exc))

    thread = threading.Thread(target=run, name=name, daemon=False)
    thread.start()

    def wait() -> T:
        thread.join()
        value, error = result[0]
        if error is not None:
            raise error
        return value

    return wait


def _check_zip(path: Path) -> None:
    """torch.save files are zip archives of stored (uncompressed) entries: refuse zip bombs."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the pre-1.6 format is a plain, uncompressed pickle stream
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise _fail(path, f"broken zip archive ({exc})") from exc
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or sum(e.file_size for e in entries) > path.stat().st_size:
        raise _fail(path, "it holds compressed entries, which torch.save never writes; refused (possible zip bomb)")


def _load_legacy(path: Path) -> Checkpoint:
    import pickle

    _check_zip(path)
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _fail(path, "it holds Python objects other than tensors (a pickle that could run code); refused") from exc
    except Exception as exc:  # zip/pickle corruption surfaces as many types
        raise _fail(path, f"not a readable weights-only PyTorch file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise _fail(path, "a legacy .pt file must be a dict with 'config' and 'state_dict'; re-save it with r2unet as .safetensors")
    try:
        config = ModelConfig.from_dict(dict(payload["config"]))
        preprocess = PreprocessConfig.from_dict(dict(payload.get("preprocess", {})))
    except (ValueError, TypeError) as exc:
        raise _fail(path, f"its config is invalid ({exc})") from exc
    state_dict = payload["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise _fail(path, "'state_dict' is not a mapping of names to tensors")
    state_dict = strip_prefixes(state_dict)
    _check_shapes(path, config, {k: tuple(v.shape) for k, v in state_dict.items()})
    _check_values(path, state_dict, None)
    class_names = payload.get("class_names", ["foreground"] * config.out_channels if config.out_channels == 1 else None)
    if not isinstance(class_names, (list, tuple)) or len(class_names) != config.out_channels:
        raise _fail(path, f"'class_names' must be a list of {config.out_channels} names")
    class_names = tuple(str(c) for c in class_names)
    return Checkpoint(config, state_dict, preprocess, class_names, {"legacy_source": path.name}, path, file_sha256(path))


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and validate a checkpoint file; raises :class:`R2UNetError` with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise R2UNetError(f"checkpoint {path} does not exist; give a model name (r2unet models) or a .safetensors path")
    if not path.is_file():
        raise R2UNetError(f"checkpoint {path} is not a file")
    if not os.access(path, os.R_OK):
        raise R2UNetError(f"checkpoint {path} is not readable; check its permissions")
    try:
        if path.suffix.lower() in LEGACY_SUFFIXES:
            return _load_legacy(path)
        return _load_safetensors(path)
    except R2UNetError:
        raise
    except OSError as exc:
        raise _fail(path, exc.strerror or str(exc)) from exc
    except (ValueError, TypeError, OverflowError, RecursionError, RuntimeError, NotImplementedError, MemoryError) as exc:
        # anything a crafted file can still provoke is a refusal, never a crash
        raise _fail(path, f"invalid contents ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
