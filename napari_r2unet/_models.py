"""The model choices the widgets offer: shipped pretrained models and checkpoints the user opened.

Torch-free: entries are described from the checkpoints' metadata (:mod:`src_models.checkpoint_files`).
Each viewer's widget keeps its own list (no module-level mutable state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from src_models.checkpoint_files import describe, pretrained_catalog
from src_models.user_versions import Version, list_versions


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model menu: what to show and what to load (a name or a path)."""

    label: str
    spec: str
    arch: str
    metrics: tuple[tuple[str, float], ...] = ()
    summary: str = ""

    @property
    def tooltip(self) -> str:
        if self.summary:
            return self.summary
        scores = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics)
        return f"{self.arch}: {scores}" if scores else self.arch


def _choice(label: str, spec: str, entry: dict) -> ModelChoice:
    metrics = entry["provenance"].get("metrics", {})
    kept = tuple((k, float(metrics[k])) for k in ("F1", "AUC") if isinstance(metrics.get(k), (int, float)))
    return ModelChoice(label, spec, str(entry["config"].get("arch", "?")), kept)


def builtin_choices() -> list[ModelChoice]:
    """Shipped pretrained models, R2U-Net first (the paper's model)."""
    entries = pretrained_catalog()
    order = sorted(entries, key=lambda n: (not n.startswith("r2unet"), n))
    return [_choice(name, name, entries[name]) for name in order]


def file_choice(path: str | Path) -> ModelChoice:
    """A checkpoint file as a model choice (validated by its metadata; weights load later)."""
    entry = describe(path)
    return _choice(f"{Path(path).name}", str(Path(path).resolve()), entry)


def version_choice(version: Version) -> ModelChoice:
    return ModelChoice(f"{version.name} (fine-tuned)", str(version.path.resolve()), version.arch,
                       tuple((k, version.metrics[k]) for k in ("F1",) if k in version.metrics), version.summary)


def version_choices(folder: Path | None = None) -> list[ModelChoice]:
    """The user's fine-tuned versions, newest first."""
    return [version_choice(v) for v in reversed(list_versions(folder))]


def all_choices(extra: list[ModelChoice]) -> list[ModelChoice]:
    """Pretrained models, then the user's versions, then checkpoints opened this session."""
    listed = builtin_choices() + version_choices()
    specs = {c.spec for c in listed}
    return listed + [c for c in extra if c.spec not in specs]


def model_classes(spec: str) -> int:
    """Output channels of a model from its header (1 if it cannot be read now; loading will say why)."""
    try:
        entry = pretrained_catalog().get(spec) or describe(spec)
        return max(1, int(entry["config"].get("out_channels", 1)))
    except Exception:  # a missing or broken file is reported when the worker loads it
        return 1

