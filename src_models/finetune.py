"""Assembling a fine-tune run, torch-free at import: pairs -> samples -> config -> Trainer.

One place turns "fine-tune this model on these corrected images" into a running engine, for
``r2unet finetune`` (pairs read from folders by :func:`file_pairs`), the napari Fine-tune
widget (pairs copied out of layers by ``napari_r2unet._finetune.pair_data``) and
``benchmarks/finetune_gain.py``:

- :class:`PairData`: one (image, labels) pair, with the map of the pixels the user corrected;
- :class:`FinetuneRequest`: everything a run needs (base model, pairs, output, budget, the
  validation choice and any :class:`~src_models.training.config.TrainConfig` override);
- :func:`build_trainer`: loads the base model (read-only), checks the labels against it,
  weights up the corrected pixels, sets validation images or strips apart and builds the
  :class:`~src_models.training.trainer.Trainer`;
- :func:`finetune`: the worker body: runs the engine, forwards its events, keeps the training
  masks beside the new version (:func:`write_training_masks`), and leaves no file behind for a
  run cancelled before its first step (that version would equal its base).

The fine-tuning defaults are :data:`~src_models.training.config.FINETUNE_DEFAULTS` (learning
rate, epochs, batch, steps, freezing) and the constants below (the widget's time budget, the
hold-out strip).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import R2UNetError
from .training.config import TrainConfig, finetune_config

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .training.samples import TrainSample
    from .training.trainer import Trainer

DEFAULT_MINUTES = 5.0  # the Fine-tune widget's time budget
WIDGET_BUDGET = MappingProxyType({"epochs": None, "minutes": DEFAULT_MINUTES})  # what the widget starts with: a time budget
HOLDOUT_FRACTION = 0.2  # validation = "holdout": this part of each image (blocks that represent it) is validated on, never trained on
VALIDATION_NONE, VALIDATION_HOLDOUT, VALIDATION_PAIR, VALIDATION_IMAGES = "none", "holdout", "pair:", "images"


@dataclass
class PairData:
    """One training pair: ``image`` (any layout ``channel_axis`` describes), ``mask`` ``(H, W)``
    integer labels, ``changed`` ``(H, W)`` bool (pixels the user corrected; None = unknown),
    optional ``fov`` ``(H, W)`` bool, and ``source`` (a file, for the provenance). ``weight``
    ``(H, W)`` multiplies the loss weight (e.g. 0 where a rehearsed prediction is unsure);
    ``train_only`` pairs are never validated on (no hold-out block is taken from them);
    ``validate_only`` pairs are only validated on, whole (with any validation but none)."""

    id: str
    image: Any
    channel_axis: int | None | str
    mask: np.ndarray
    changed: np.ndarray | None
    fov: np.ndarray | None = None
    source: str = ""
    weight: np.ndarray | None = None
    train_only: bool = False
    validate_only: bool = False

    @property
    def described(self) -> str:
        return f"mask {self.source}" if self.source else f"labels layer {self.id!r}"


@dataclass
class FinetuneRequest:
    """Everything one fine-tuning run needs (decided before it starts: layers may change meanwhile).

    ``validation``: ``none``; ``holdout`` (``holdout_fraction`` of each image: blocks of it chosen
    across its foreground density, see :func:`~src_models.training.samples.holdout_blocks`; the
    last strip for a ``resize`` model); ``pair:<id>`` (hold out that pair, all its slices); or
    ``images`` (hold out the pairs ``held_out`` names, whole). ``epochs`` and ``minutes``: the budget as
    given (``None``: not given), made into the run's by
    :func:`~src_models.training.config.resolve_budget` (only minutes: no epoch limit; only
    epochs: no time limit; both: whichever ends first; neither: :data:`FINETUNE_DEFAULTS`'s).
    ``settings``: :class:`TrainConfig` fields (lr, patch_size, batch_size, steps_per_epoch,
    correction_weight, freeze, val_fraction, ...) overriding :data:`FINETUNE_DEFAULTS`. ``description``: stored in the version (default: the
    base model, the number of images and of corrected pixels).
    """

    base: str | Checkpoint  # a pretrained name, a version, a checkpoint path, or a loaded checkpoint
    pairs: list[PairData]
    out: Path
    name: str
    epochs: int | None = None
    minutes: float | None = None
    validation: str = VALIDATION_NONE
    holdout_fraction: float = HOLDOUT_FRACTION
    held_out: tuple[str, ...] = ()  # the pairs validation ``images`` holds out
    device: str = "auto"
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    resume: bool = False
    overwrite: bool = False

    def config(self) -> TrainConfig:
        return finetune_config(epochs=self.epochs, minutes=self.minutes, **self.settings)


def training_labels(pair: PairData, classes: int, model: str = "the model") -> np.ndarray:
    """``pair.mask`` as uint8 class labels for a model with ``classes`` outputs (1 = binary).

    A binary model learns from 0 (background) and 1 (foreground) only: any other label is refused
    rather than merged into the foreground (it is most likely a slip of the brush).
    """
    labels = np.asarray(pair.mask)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if int(labels.min()) < 0:
        raise R2UNetError(f"{pair.described} holds negative labels; erase them first")
    if classes == 1:
        other = [int(v) for v in np.unique(labels) if v not in (0, 1)]
        if other:
            shown = ", ".join(map(str, other[:5])) + (" ..." if len(other) > 5 else "")
            raise R2UNetError(f"{pair.described} holds label(s) {shown} but {model} is binary (0 = background, 1 = foreground); "
                              "repaint those pixels with label 1 or erase them")
    elif int(labels.max()) >= classes:
        raise R2UNetError(f"{pair.described} holds label {int(labels.max())} but the model has {classes} classes (0..{classes - 1})")
    return labels.astype(np.uint8)


def file_pairs(images: str | Path, masks: str | Path, fov: str | Path | None = None,
               corrections: str | Path | None = None, classes: int = 1) -> list[PairData]:
    """Pairs from folders (paired by sample ID, see :func:`src_models.data.pair_files`).

    Binary models take 0/1 or 0/255 masks (:func:`src_models.data.binarize_mask`), multi-class
    ones label images ``0 .. classes - 1``. ``corrections``: masks of the pixels the user
    corrected (weighted up); an image without one keeps weight 1.
    """
    from .data import list_images, pair_files, read_image, read_mask, sample_id
    from .training.samples import read_training_mask

    maps = {sample_id(p): p for p in list_images(corrections)} if corrections else {}
    return [
        PairData(pair.id, read_image(pair.image), "auto", read_training_mask(pair.mask, classes),
                 read_mask(maps[pair.id]) if pair.id in maps else None,
                 fov=read_mask(pair.fov) if pair.fov else None, source=str(pair.image))
        for pair in pair_files(images, masks, fov)
    ]


def _held_out_ids(request: FinetuneRequest) -> tuple[str, ...]:
    """The pieces of the pairs that ``pair:<id>`` or ``images`` validation holds out (a stack gives ``id[i]`` pieces)."""
    if request.validation == VALIDATION_IMAGES:
        held = set(request.held_out)
    elif request.validation.startswith(VALIDATION_PAIR):
        held = {request.validation.removeprefix(VALIDATION_PAIR)}
    else:
        return ()
    return tuple(p.id for p in request.pairs if any(p.id == h or p.id.startswith(h + "[") for h in held))


def build_samples(request: FinetuneRequest, base: Checkpoint, config: TrainConfig) -> tuple[list[TrainSample], TrainConfig]:
    """The training (and validation) samples of a request, and ``config`` with their validation IDs."""
    from .preprocessing import to_chw
    from .scale import scale_factor
    from .training.samples import emphasize_corrections, holdout_blocks, holdout_region, make_sample, rescale_sample

    val_ids = _held_out_ids(request)
    samples, holdout_ids, checks = [], [], []
    tiled = base.model_card.geometry.kind == "tiled"
    for pair in request.pairs:
        labels = training_labels(pair, base.config.out_channels, model=repr(base.name))
        sample = make_sample(pair.id, pair.image, labels, base.preprocess, fov=pair.fov, channel_axis=pair.channel_axis,
                             source=pair.source or f"napari layer {pair.id}")
        if pair.changed is not None and pair.id not in val_ids:
            sample = emphasize_corrections(sample, pair.changed, config.correction_weight)
        if pair.weight is not None:
            sample = dataclasses.replace(sample, weight=sample.weight * np.asarray(pair.weight, np.float32))
        if tiled:  # trained at the scale inference runs it (--scale auto): the card's training scale
            sample = rescale_sample(sample, scale_factor("auto", base.model_card.scale, to_chw(np.asarray(pair.image), pair.channel_axis))[0])
        if pair.validate_only:
            if request.validation != VALIDATION_NONE:
                samples.append(sample)
                checks.append(sample.id)
        elif request.validation == VALIDATION_HOLDOUT and not pair.train_only:  # blocks that represent the image (a resize model: a strip)
            if tiled:
                train, vals = holdout_blocks(sample, request.holdout_fraction)
            else:
                train, val = holdout_region(sample, request.holdout_fraction)
                vals = [val]
            samples += [train, *vals]
            holdout_ids += [val.id for val in vals]
        else:
            samples.append(sample)
    held_out = request.validation.startswith(VALIDATION_PAIR) or request.validation == VALIDATION_IMAGES
    if held_out and (not val_ids or len(val_ids) + len(checks) == len(samples)):
        raise R2UNetError(f"holding out a pair needs at least two pairs; choose 'hold out {HOLDOUT_FRACTION:.0%} of each image' or none")
    if holdout_ids or val_ids:
        config = dataclasses.replace(config, val_ids=(tuple(holdout_ids) or val_ids) + tuple(checks))
    return samples, config


def _provenance(request: FinetuneRequest, base: Checkpoint) -> dict[str, Any]:
    changed = sum(int(np.count_nonzero(p.changed)) for p in request.pairs if p.changed is not None)
    description = request.description or (
        f"{base.name} fine-tuned in napari on {len(request.pairs)} corrected image(s) ({changed:,} corrected pixels)")
    provenance: dict[str, Any] = {"name": request.name, "description": description}
    if any(p.changed is not None for p in request.pairs):
        provenance["corrected_pixels"] = changed
    return provenance


def load_base(base: str | os.PathLike[str] | Checkpoint) -> Checkpoint:
    """The base model of a run: loaded by name or path (read-only), or as given."""
    if isinstance(base, (str, os.PathLike)):
        from .model_names import load_model

        base = load_model(str(base))
    base.require_weights("fine-tune it")
    return base


def card_geometry(base: Checkpoint, config: TrainConfig) -> TrainConfig:
    """``config`` training in ``base``'s card geometry: a ``resize`` model is fine-tuned on whole
    images letterboxed to its size (as it infers), a ``tiled`` one on patches."""
    geometry = base.model_card.geometry
    if geometry.kind == "resize":
        return dataclasses.replace(config, geometry="resize", patch_size=geometry.size)
    return dataclasses.replace(config, geometry="tiled")


INHERITED = ("fn_weight",)  # what a fine-tune keeps from its base's own training unless the request sets it


def inherit_training(base: Checkpoint, config: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """``config`` with the base's own training choices in :data:`INHERITED` where ``settings`` sets
    none: a model trained with a loss that favours recall (``fn_weight`` 0.7) is fine-tuned with that
    loss, not pulled back to the soft Dice. A value the base's file holds that the config refuses is
    ignored (the default stays)."""
    trained = (base.provenance or {}).get("train_config")
    if not isinstance(trained, dict):
        return config
    for name in INHERITED:
        if settings.get(name) is None and trained.get(name) is not None:
            with contextlib.suppress(R2UNetError, TypeError, ValueError):
                config = dataclasses.replace(config, **{name: trained[name]})
    return config


def build_trainer(request: FinetuneRequest) -> Trainer:
    """The engine's :class:`Trainer` for a request (the base model is only ever read)."""
    from .training.trainer import Trainer

    base = load_base(request.base)
    config = inherit_training(base, card_geometry(base, request.config()), request.settings)
    samples, config = build_samples(request, base, config)
    return Trainer(None, None, samples, config, request.out, base=base, provenance=_provenance(request, base),
                   device=request.device, resume=request.resume, overwrite=request.overwrite)


def remove_run_files(out: Path) -> None:
    """Delete a run's checkpoint, resume state and history (a run that never stepped), and its path's
    reservation (:func:`~src_models.user_versions.new_version_path`)."""
    from .training.resume import history_path, resume_path
    from .user_versions import release_version_path

    for path in (out, resume_path(out), history_path(out)):
        path.unlink(missing_ok=True)
    release_version_path(out)


def write_training_masks(request: FinetuneRequest, classes: int) -> Path:
    """Keep a version's training data with it: ``<version>.training/<pair>.tif``, the labels it was
    trained on, and ``<pair>.changed.tif``, the pixels the user corrected (when known); our label
    files (:mod:`~src_models.label_files`), binary for a binary model. Returns the folder."""
    from .label_files import write_label_file
    from .user_versions import slug, training_folder

    version = Path(request.out)
    folder = training_folder(version)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stems: set[str] = set()
        for pair in request.pairs:
            stem, n = slug(pair.id), 1
            while stem in stems:
                n += 1
                stem = f"{slug(pair.id)}-{n}"
            stems.add(stem)
            about = {"pair": pair.id, "source": pair.source or f"napari layer {pair.id}", "version": version.name}
            if pair.changed is not None:
                about["corrected_pixels"] = int(np.count_nonzero(pair.changed))
                write_label_file(folder / f"{stem}.changed.tif", np.asarray(pair.changed, bool).astype(np.uint8), binary=True,
                                 provenance={**about, "role": "corrected pixels"})
            write_label_file(folder / f"{stem}.tif", training_labels(pair, classes), binary=classes == 1,
                             provenance={**about, "role": "training labels"})
    except (OSError, R2UNetError) as exc:  # the version is there: say so, and what failed
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise R2UNetError(f"the version {version.name} is saved, but not its training masks ({folder}): {reason}") from exc
    return folder


def release_device_memory() -> None:
    """Give the GPU memory a finished run cached back to the driver: napari's process lives on after
    a fine-tune, and memory held until it closes is what micro-sam#952 reports. A no-op before torch
    is imported and on the CPU."""
    import gc
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        torch.mps.empty_cache()


def _train(request: FinetuneRequest, emit: Callable[[Any], None], should_stop: Callable[[], bool]) -> str:
    from .user_versions import release_version_path

    try:
        trainer = build_trainer(request)
        for event in trainer.run(should_stop=should_stop):
            emit(event)
    except BaseException:
        release_version_path(request.out)  # the path's reservation, if new_version_path made one (nothing was written into it)
        raise
    if trainer.state.step == 0:
        remove_run_files(Path(request.out))
        return ""
    write_training_masks(request, trainer.model_config.out_channels)
    return str(request.out)


def finetune(request: FinetuneRequest, emit: Callable[[Any], None], should_stop: Callable[[], bool],
             finished: threading.Event | None = None, prepare: Callable[[], object] | None = None) -> str:
    """The worker: train, forward each event to ``emit``; returns the new version's path.

    A run cancelled before its first training step leaves no version (it would equal the base)
    and returns "". ``prepare`` runs first, in the worker (e.g. to set torch's thread count);
    ``finished`` is set when the worker ends, however it ends, after the run's device memory is
    released (:func:`release_device_memory`).
    """
    try:
        if prepare is not None:
            prepare()
        return _train(request, emit, should_stop)
    finally:
        release_device_memory()
        if finished is not None:
            finished.set()


__all__ = ["DEFAULT_MINUTES", "HOLDOUT_FRACTION", "WIDGET_BUDGET", "FinetuneRequest", "PairData", "build_samples",
                          "build_trainer", "file_pairs", "finetune", "inherit_training", "load_base", "training_labels"]
