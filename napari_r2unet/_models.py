"""The model choices the widgets offer: shipped pretrained models, and checkpoints and bioimage.io packages the user opened.

Torch-free: entries are described from the checkpoints' metadata (:mod:`src_models.checkpoint_files`),
model card included. Each viewer's widget keeps its own list (no module-level mutable state).

Labels come from the card, not from a table of names: a shipped model reads
"<architecture>: <task> (<short data name>)", e.g. "R2U-Net: retinal vessels (DRIVE)"
(:func:`task_label`; the short name is :attr:`ModelCard.short_data`). A fine-tuned version reads
"<name> (fine-tuned, <task>)" and a file "<file name>: <task>"; a checkpoint whose card names no
task of its own (a card derived from the class names, as older files get) keeps its name alone.
Each entry's tooltip is its card (``card.lines()``), after a version's history.

A bioimage.io model package (a ``.zip``, or the ``rdf.yaml`` / ``bioimageio.yaml`` of an unpacked
one) is a file choice too, "<file name>: <its name> (bioimage.io)": its description is read here
(:func:`src_models.bioimageio.read_rdf`, torch-free), its weights when the model loads
(:func:`is_model_file`, :func:`package_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src_models.architectures import display_name
from src_models.checkpoint_files import describe, pretrained_catalog
from src_models.errors import R2UNetError
from src_models.model_card import ModelCard
from src_models.preprocessing import PreprocessConfig
from src_models.user_versions import Version, list_versions


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model menu: what to show, what to load (a name or a path) and its card.

    ``name`` is the model's own short name (a pretrained name, a version's name, a file's name):
    a version fine-tuned from it is named after it.
    """

    label: str
    spec: str
    arch: str
    name: str = ""
    card: ModelCard = field(default_factory=ModelCard)
    preprocess: PreprocessConfig | None = None  # None: unknown until the weights load
    history: str = ""  # a fine-tuned version's summary

    @property
    def tooltip(self) -> str:
        return "\n".join(([self.history] if self.history else []) + self.card.lines()) or self.arch


def card_task(entry: dict[str, Any]) -> str:
    """The task a checkpoint's card names ("" when the card only repeats the class names, as a derived one does)."""
    card = entry["card"]
    derived = ", ".join(entry.get("class_names", ()))
    return card.task if card.task and card.task != derived else ""


def task_label(arch: str, card: ModelCard) -> str:
    """"R2U-Net: skin lesion (ISIC 2017)": the architecture's name, the card's task and its short data name."""
    short = card.short_data
    return f"{display_name(arch)}: {card.task}" + (f" ({short})" if short else "")


def _preprocess(entry: dict[str, Any]) -> PreprocessConfig | None:
    try:
        return PreprocessConfig.from_dict(entry.get("preprocess") or {})
    except (ValueError, TypeError):
        return None  # loading the weights says what is wrong


def _choice(label: str, spec: str, entry: dict[str, Any], name: str, history: str = "") -> ModelChoice:
    return ModelChoice(label, spec, str(entry["config"].get("arch", "?")), name, entry["card"], _preprocess(entry), history)


def builtin_choices() -> list[ModelChoice]:
    """Shipped pretrained models, R2U-Net first (the paper's model)."""
    entries = pretrained_catalog()
    order = sorted(entries, key=lambda n: (not n.startswith("r2unet"), n))
    return [_choice(_pretrained_label(name, entries[name]), name, entries[name], name) for name in order]


def _pretrained_label(name: str, entry: dict[str, Any]) -> str:
    return task_label(str(entry["config"].get("arch", "?")), entry["card"]) if card_task(entry) else name


def is_package(spec: str | Path) -> bool:
    """Whether ``spec`` names a bioimage.io package (a ``.zip``, an ``rdf.yaml`` or a ``bioimageio.yaml``)."""
    from src_models.bioimageio import is_package as engine_is_package  # torch-free (numpy), imported when asked

    return engine_is_package(spec)


def is_model_file(spec: str) -> bool:
    """Whether a model spec is a file path (a checkpoint or a bioimage.io package), not a menu name."""
    return spec.endswith(".safetensors") or is_package(spec)


def file_model_name(spec: str) -> str:
    """A model file's short name, which its fine-tuned versions are named after: the file's stem,
    or the folder of an unpacked package (its description file is always called the same)."""
    path = Path(spec)
    return path.parent.name if path.suffix.lower() == ".yaml" and is_package(path) and path.parent.name else path.stem


def package_choice(path: str | Path) -> ModelChoice:
    """A bioimage.io package as a model choice: its rdf.yaml is read (torch-free) and must describe a
    model; whether we can run it, and its weights, are checked when the model loads."""
    from src_models.bioimageio import describe_package, read_rdf

    rdf, _ = read_rdf(path)  # one-line R2UNetError: missing, not a zip, no rdf.yaml, not a model, an unknown format
    path = Path(path).expanduser()
    shown = path.name if path.suffix.lower() == ".zip" else f"{file_model_name(str(path))}/{path.name}"
    title = " ".join(str(rdf.get("name") or "").split())
    entry = describe_package(path)  # one of ours: its checkpoint's card (threshold, post-processing, TTA)
    if entry is not None:
        task = card_task(entry)
        return _choice(f"{shown}: {task} (bioimage.io)" if task else f"{shown} (bioimage.io)", str(path.resolve()), entry,
                       file_model_name(str(path)))
    return ModelChoice(f"{shown}: {title} (bioimage.io)" if title else f"{shown} (bioimage.io)", str(path.resolve()),
                       "bioimage.io package", file_model_name(str(path)))


def file_choice(path: str | Path) -> ModelChoice:
    """A checkpoint file (validated by its metadata; weights load later) or a bioimage.io package as a model choice."""
    if is_package(path):
        return package_choice(path)
    entry, name = describe(path), Path(path).name
    task = card_task(entry)
    return _choice(f"{name}: {task}" if task else name, str(Path(path).resolve()), entry, name)


def version_choice(version: Version) -> ModelChoice:
    try:
        entry = describe(version.path)
    except R2UNetError:  # gone or damaged since it was listed: loading it will say so
        entry = {"config": {"arch": version.arch}, "card": ModelCard()}
    task = card_task(entry)
    label = f"{version.name} (fine-tuned, {task})" if task else f"{version.name} (fine-tuned)"
    return _choice(label, str(version.path.resolve()), entry, version.name, version.summary)


def version_choices(folder: Path | None = None) -> list[ModelChoice]:
    """The user's fine-tuned versions, newest first."""
    return [version_choice(v) for v in reversed(list_versions(folder))]


def all_choices(extra: list[ModelChoice]) -> list[ModelChoice]:
    """Pretrained models, then the user's versions, then checkpoints opened this session."""
    listed = builtin_choices() + version_choices()
    specs = {c.spec for c in listed}
    return listed + [c for c in extra if c.spec not in specs]


def model_entry(spec: str) -> dict[str, Any]:
    """What a model's header says (:func:`~src_models.checkpoint_files.describe`), by name or path."""
    return pretrained_catalog().get(spec) or describe(spec)


def model_card(spec: str) -> ModelCard:
    """A model's card from its header (the default card if it cannot be read now; loading will say why)."""
    try:
        return model_entry(spec)["card"]
    except Exception:  # a missing or broken file is reported when the worker loads it
        return ModelCard()


def model_classes(spec: str) -> int:
    """Output channels of a model from its header (1 if it cannot be read now; loading will say why)."""
    try:
        return max(1, int(model_entry(spec)["config"].get("out_channels", 1)))
    except Exception:  # a missing or broken file is reported when the worker loads it
        return 1
