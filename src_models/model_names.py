"""Which NAME means which model: what a user types -> a config or a loaded checkpoint.

This module owns resolving a model name (``r2unet``, ``r2unet-drive``, a fine-tuned version's
name or id, ``~/m.safetensors``) for the CLI and the workers: :func:`load_model`,
:func:`resolve_config` (``r2unet info``) and :func:`pretrained_models` (``r2unet models``). It
lists nothing itself: the shipped files come from :mod:`src_models.checkpoint_files` (torch-free header
reading), the user's fine-tuned versions from :mod:`src_models.user_versions`, and the weights are
loaded by :mod:`src_models.checkpoint`.

Pretrained models are the ``.safetensors`` files in ``src_models/weights/``; their name is the
file stem and everything else (architecture, metrics, training data, licence) is read from the
file's own metadata, so there is no second list to keep in sync and nothing to download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint_files
from .checkpoint import LEGACY_SUFFIXES, Checkpoint, load_checkpoint
from .errors import R2UNetError
from .model_card import ModelCard
from .nets import ARCHITECTURES, ModelConfig


@dataclass(frozen=True)
class PretrainedInfo:
    """What ``r2unet models`` shows for one shipped checkpoint (read from its metadata, its card included)."""

    name: str
    path: Path
    config: ModelConfig
    provenance: dict[str, Any]
    card: ModelCard = field(default_factory=ModelCard)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.provenance.get("metrics", {}))

    @property
    def description(self) -> str:
        return str(self.provenance.get("description", ""))


def pretrained_models(weights_dir: Path | None = None) -> dict[str, PretrainedInfo]:
    """Shipped pretrained models by name (reads only the small JSON headers)."""
    return {
        name: PretrainedInfo(name, entry["path"], ModelConfig.from_dict(entry["config"]), entry["provenance"], entry["card"])
        for name, entry in checkpoint_files.pretrained_catalog(weights_dir).items()
    }


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".safetensors", *LEGACY_SUFFIXES)) or "/" in spec or "\\" in spec or Path(spec).is_file()


def _unknown(spec: str) -> R2UNetError:
    names = sorted(pretrained_models())
    known = ", ".join(names) if names else "none shipped yet"
    return R2UNetError(
        f"model {spec!r} is neither a pretrained model ({known}), an architecture ({', '.join(ARCHITECTURES)}), "
        "a fine-tuned version nor an existing checkpoint file; see 'r2unet models'"
    )


def find_version(spec: str) -> Path | None:
    """A fine-tuned version in the user's model folder, by file stem or display name."""
    from .user_versions import list_versions

    matches = [v.path for v in list_versions() if spec in (v.id, v.name)]
    return matches[-1] if matches else None  # the newest when names repeat


def load_model(spec: str) -> Checkpoint:
    """A pretrained name, a fine-tuned version's name or a checkpoint path -> validated :class:`Checkpoint`."""
    from .bioimageio import is_package, load_package

    if spec and is_package(spec):  # a bioimage.io package (.zip or rdf.yaml)
        return load_package(spec)
    shipped = checkpoint_files.WEIGHTS_DIR / f"{spec}.safetensors"
    if spec and spec == Path(spec).name and shipped.is_file():  # a pretrained name is its file's stem: no catalog to read
        return load_checkpoint(shipped)
    pretrained = pretrained_models()
    if spec in pretrained:
        return load_checkpoint(pretrained[spec].path)
    if _looks_like_path(spec):
        return load_checkpoint(Path(spec).expanduser())
    version = find_version(spec)
    if version is not None:
        return load_checkpoint(version)
    if spec in ARCHITECTURES:
        trained = [n for n, info in pretrained.items() if info.config.arch == spec]
        hint = f"use {trained[0]!r}" if trained else "train one with 'r2unet train' or give a checkpoint path"
        raise R2UNetError(f"{spec!r} is an architecture without trained weights; {hint}")
    raise _unknown(spec)


def resolve_config(spec: str) -> tuple[ModelConfig, Checkpoint | None]:
    """For ``r2unet info``: an architecture name gives its default config, otherwise load the model."""
    if spec in ARCHITECTURES and spec not in pretrained_models():
        return ModelConfig(arch=spec), None
    checkpoint = load_model(spec)
    return checkpoint.config, checkpoint
