"""The engine: :class:`Trainer` trains a new model or fine-tunes a checkpoint, as a stream of events.

AdamW with linear warm-up then cosine decay over the budget (its steps or its minutes, whichever
is further along: a run with no epoch limit follows the clock), validation with the paper's
metrics every epoch on held-out images, best-checkpoint selection (validation F1, else training
loss), early stopping, atomic writes, exact resume (:mod:`.resume`), and cooperative
cancellation at any step that keeps the best checkpoint. :meth:`Trainer.run` is a generator of
:class:`~.events.TrainEvent`; its final event says when the run ended and why.

Fine-tuning (``Trainer(base=...)`` with :func:`~.config.finetune_config`) starts from any
checkpoint, optionally emphasises the pixels a user corrected, freezes BatchNorm statistics or
the encoder; the result is a new checkpoint whose provenance names its parent's SHA-256. The
base file is only ever read. Under torchrun the same code runs with DDP (:mod:`.distributed`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..checkpoint import Checkpoint, save_checkpoint
from ..errors import CancelledError, R2UNetError
from ..metrics import MetricAccumulator
from ..model_card import Geometry, ModelCard, derived_card
from ..nets import ModelConfig, build_model, logits_to_probabilities
from ..precision import autocast, resolve_precision
from ..preprocessing import PreprocessConfig
from ..settings import DEFAULT_OVERLAP
from ..tiling import sliding_window_inference
from .config import TrainConfig
from .dataset import PatchDataset
from .distributed import any_rank, barrier, broadcast_int, global_loss_value, init_distributed, loss_reduction
from .events import EventKind, TrainEvent
from .loss import segmentation_loss
from .resume import TrainState, load_resume, resume_path, save_resume, write_history
from .samples import TrainSample, check_samples, letterbox_sample, split_validation

ShouldStop = Callable[[], bool]

_END_KINDS = {"epochs": EventKind.DONE, "time": EventKind.DONE, "cancelled": EventKind.CANCELLED, "early_stop": EventKind.EARLY_STOP}


def _default_class_names(config: ModelConfig) -> tuple[str, ...]:
    return ("foreground",) if config.out_channels == 1 else tuple(f"class{i}" for i in range(config.out_channels))


class Trainer:
    """Train a new model or fine-tune ``base``; iterate :meth:`run` for events.

    Args:
        model_config: network to build (ignored when ``base`` is given: its config is used).
        preprocess: preprocessing (ignored when ``base`` is given).
        samples: training samples (validation ones are split off per ``config``).
        out: path of the best checkpoint (``.safetensors``); the resume state and history go beside it.
        base: a checkpoint to fine-tune from; only read, never written.
        class_names, provenance: stored in the checkpoint.
        card: the model card to store (default: ``base``'s without its metrics, else derived); its
            geometry is set from ``config`` (``resize`` at ``patch_size``, else ``tiled``).
        device: ``cpu``, ``cuda`` ...; under torchrun each rank uses ``cuda:LOCAL_RANK`` if CUDA.
    """

    def __init__(
        self,
        model_config: ModelConfig | None,
        preprocess: PreprocessConfig | None,
        samples: Sequence[TrainSample],
        config: TrainConfig,
        out: str | Path,
        *,
        base: Checkpoint | None = None,
        class_names: Sequence[str] | None = None,
        provenance: dict[str, Any] | None = None,
        card: ModelCard | None = None,
        device: str = "cpu",
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.out = Path(out)
        self._check_output(base, resume, overwrite)
        self.base = base
        self.model_config = base.config if base is not None else model_config
        self.preprocess = base.preprocess if base is not None else (preprocess or PreprocessConfig())
        assert self.model_config is not None
        self.class_names = tuple(class_names or (base.class_names if base else _default_class_names(self.model_config)))
        self._split(samples)
        self.provenance = dict(provenance or {})
        self.card = card if card is not None else base.model_card.with_(metrics={}, metrics_on="", bf16=False) if base is not None else None
        self._place(device)
        self._build_network()
        pixels = sum(s.mask.size for s in self.train_samples)
        self.steps_per_epoch = config.steps_per_epoch or int(np.clip(round(pixels / (config.batch_size * config.patch_size**2)), 10, 500))
        self.total_steps: int | None = self.steps_per_epoch * config.epochs if config.epochs else None  # None: time budget only
        self.dataset = PatchDataset(self.train_samples, config, self.steps_per_epoch * config.batch_size)
        self.state = TrainState(steps_per_epoch=self.steps_per_epoch)
        self.resumed = resume
        self._should_stop: ShouldStop | None = None
        self._validation_cancelled = False
        if resume:
            load_resume(self)
        if not self.state.created:
            self.state.created = _dt.datetime.now().isoformat(timespec="seconds")

    # -- setup -----------------------------------------------------------------------------------
    def _check_output(self, base: Checkpoint | None, resume: bool, overwrite: bool) -> None:
        if self.out.suffix != ".safetensors":
            raise R2UNetError(f"output {self.out} must end in .safetensors")
        if base is not None and base.path is not None and self.out.resolve() == base.path.resolve():
            raise R2UNetError(f"output {self.out} is the base model itself; the base model is never overwritten, choose another path")
        if not resume and not overwrite and (self.out.exists() or resume_path(self.out).exists()):
            raise R2UNetError(f"{self.out} (or its .resume.pt) already exists; pass --resume to continue that run or --overwrite to replace it")

    def _split(self, samples: Sequence[TrainSample]) -> None:
        check_samples(samples, self.model_config)
        if self.config.geometry == "resize":  # train and validate as the card's resize geometry infers
            samples = [letterbox_sample(s, self.config.patch_size) for s in samples]
        self.train_samples, self.val_samples = split_validation(samples, self.config)
        if not self.train_samples or all(int(s.mask.max()) == 0 for s in self.train_samples):
            raise R2UNetError("no training image with foreground is left after the validation split; hold out fewer images")
        if self.val_samples and all(int(s.mask.max()) == 0 for s in self.val_samples):
            raise R2UNetError("every validation mask is empty, so F1 cannot pick the best checkpoint; choose other --val-ids")

    def _place(self, device: str) -> None:
        """The device of this process and its place in a torchrun group."""
        from ..devices import select_device

        device_obj = select_device(device)
        self.dist = init_distributed(device_obj)
        if self.dist.enabled and device_obj.type == "cuda":
            device_obj = torch.device("cuda", self.dist.local_rank)
        self.device = device_obj
        if self.config.batch_size % self.dist.world_size:
            raise R2UNetError(f"batch size {self.config.batch_size} must be divisible by the {self.dist.world_size} processes")

    def _build_network(self) -> None:
        """The model (from ``base`` if given), its freezing, the optimizer and the DDP wrapper."""
        torch.manual_seed(self.config.seed)
        self.model = build_model(self.model_config)
        if self.base is not None:
            self.model.load_state_dict(self.base.state_dict)
        # channels_last: oneDNN (CPU) and cuDNN run convolutions and their backward faster in NHWC;
        # measured on 2 CPU cores, a training step of R2U-Net is about 10 % faster (benchmarks/bench.py (d))
        self.memory_format = torch.channels_last if self.device.type in ("cpu", "cuda") else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        self.dtype = next(self.model.parameters()).dtype  # batches follow the model (float32 unless built otherwise)
        self.precision, note = resolve_precision(self.config.precision, self.device.type, card_allows_bf16=True)
        if self.precision == "amp":  # training's mixed precision is bf16 (fp16 would need a gradient scaler)
            self.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        self.precision_note = note
        if self.dist.enabled and self.device.type == "cuda" and self.model_config.norm == "batch":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.config.freeze == "encoder":
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.config.l2sp and self.base is None:
            raise R2UNetError("l2sp pulls the weights toward a starting model; give one (r2unet train --init MODEL, or r2unet finetune)")
        self._anchor = [(p, p.detach().clone()) for p in params] if self.config.l2sp else []
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _train_mode(self) -> None:
        self.net.train()
        if self.config.freeze in ("bn", "encoder"):  # few images: keep the base model's BN statistics
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    # -- schedule --------------------------------------------------------------------------------
    def _progress(self, budget: tuple[int | None, float | None] | None = None, since: tuple[int, float] = (0, 0.0)) -> float:
        """Fraction of ``budget`` (``(total steps, minutes)``, default this run's) used since
        ``since`` (``(step, elapsed seconds)``): steps or wall time, whichever is further along."""
        total, minutes = budget or (self.total_steps, self.config.minutes)
        parts = [0.0]
        if total:
            parts.append((self.state.step - since[0]) / max(1, total - since[0]))
        if minutes:
            parts.append((self.state.elapsed_s - since[1]) / max(1e-9, 60 * minutes - since[1]))
        return min(1.0, max(parts))

    def _lr_factor(self, budget: tuple[int | None, float | None] | None = None) -> float:
        """Linear warm-up (``warmup_steps``, at most a tenth of the budget), then cosine decay to 0
        over ``budget`` (default this run's); after a resume that changed the budget, the decay
        continues from the factor and place of the anchor."""
        budget = budget or (self.total_steps, self.config.minutes)
        total, state = budget[0], self.state
        if state.lr_anchor_factor >= 0:
            progress = self._progress(budget, since=(state.lr_anchor_step, state.lr_anchor_s))
            return state.lr_anchor_factor * 0.5 * (1 + math.cos(math.pi * progress))
        warmup = max(1, min(self.config.warmup_steps, total // 10) if total else self.config.warmup_steps)
        progress = self._progress(budget)
        warm = min(1.0, max((state.step + 1) / warmup, 10 * progress))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))

    # -- validation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def validate(self) -> dict[str, float] | None:
        if not self.val_samples:
            return None
        self.model.eval()
        acc = MetricAccumulator()

        def predictor(batch: np.ndarray) -> np.ndarray:
            return logits_to_probabilities(self.model(torch.from_numpy(batch).to(self.device, self.dtype)).float()).cpu().numpy()

        for s in self.val_samples:
            probs = sliding_window_inference(s.image, self.config.val_tile, 1, predictor, DEFAULT_OVERLAP,
                                             size_multiple=self.model_config.size_multiple, should_stop=self._should_stop)
            fg = probs[0] if probs.shape[0] == 1 else 1 - probs[0]  # multi-class: any foreground
            target = s.mask > 0
            acc.add(fg, target, s.valid)
        return acc.pooled()

    def _validation_pixels(self) -> str:
        """How much the validation score rests on: its pixels and foreground pixels, in words."""
        valid = [s.valid for s in self.val_samples]
        pixels = sum(int(v.sum()) for v in valid)
        foreground = sum(int(((s.mask > 0) & v).sum()) for s, v in zip(self.val_samples, valid))
        return f"{pixels:,} pixels, {foreground:,} foreground"

    def _validate_unless_cancelled(self) -> dict[str, float] | None:
        """Validation that a cancel request interrupts (the run then ends as cancelled)."""
        try:
            return self.validate()
        except CancelledError:
            self._validation_cancelled = True
            return None

    def budget(self) -> str:
        """The budget in words, for the provenance and the GUI."""
        steps = f"{self.steps_per_epoch} steps of {self.config.batch_size} x {self.config.patch_size}px"
        if self.config.epochs is None:
            return f"{self.config.minutes:g} min of epochs of {steps} (no epoch limit)"
        return f"{self.config.epochs} epochs x {steps}" + (f", at most {self.config.minutes:g} min" if self.config.minutes else "")

    # -- checkpoints -----------------------------------------------------------------------------
    def _provenance(self, metrics: dict[str, float] | None) -> dict[str, Any]:
        prov = {
            "training_data": {
                "train_ids": [s.id for s in self.train_samples],
                "val_ids": [s.id for s in self.val_samples],
                "sources": sorted({str(Path(s.source).parent) for s in self.train_samples if s.source}),
                "pixels": int(sum(s.mask.size for s in self.train_samples)),
            },
            "epochs": self.state.epoch,
            "steps": self.state.step,
            "best_epoch": self.state.best_epoch,
            "train_config": self.config.to_dict(),
            "wall_time_s": round(self.state.elapsed_s, 1),
            "created": self.state.created,
            "budget": self.budget(),
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {self.device}, {self.dist.world_size} process(es)",
            "command": shlex.join(sys.argv),
            "package_version": __version__,
        }
        if metrics:
            prov["metrics"] = {k: round(v, 5) for k, v in metrics.items()}
            prov["metrics_on"] = "validation images " + ", ".join(s.id for s in self.val_samples)
        if self.base is not None:
            prov["parent_sha256"] = self.base.sha256
            prov["parent"] = self.base.name
            if self.base.provenance.get("metrics"):
                prov["parent_metrics"] = self.base.provenance["metrics"]
        if self.state.base_metrics:
            prov["metrics_before"] = {k: round(v, 5) for k, v in self.state.base_metrics.items()}
        prov.update(self.provenance)
        return prov

    def _save_best(self, metrics: dict[str, float] | None) -> None:
        self.state.saved_by_this_run = True
        # the checkpoint format holds float32 weights (a model trained in float64 is stored rounded)
        weights = {k: v.float() if v.dtype == torch.float64 else v for k, v in self.model.state_dict().items()}
        save_checkpoint(self.out, weights, self.model_config, self.preprocess, self.class_names, self._provenance(metrics),
                        card=self._card())

    def _card(self) -> ModelCard | None:
        """The card to save, its geometry the one this run trained in (None: derived on saving)."""
        resize = self.config.geometry == "resize"
        if self.card is None and not resize:
            return None
        geometry = Geometry("resize", self.config.patch_size) if resize else Geometry()
        card = self.card or derived_card(self.class_names, {}, self.preprocess.to_dict())
        return card.with_(geometry=geometry)

    # -- the loop --------------------------------------------------------------------------------
    def _event(self, kind: EventKind, **kwargs: Any) -> TrainEvent:
        done, minutes = self.state.step, self.config.minutes
        eta = None
        if done and self._run_steps:  # the nearer end: the remaining steps at this run's pace, or the time left
            per_step = (time.perf_counter() - self._run_start) / self._run_steps
            left = [(self.total_steps - done) * per_step] if self.total_steps else []
            eta = min(left + ([max(0.0, 60 * minutes - self.state.elapsed_s)] if minutes else []))
        return TrainEvent(kind, done, self.total_steps, self.state.epoch, self.config.epochs,
                          elapsed_s=self.state.elapsed_s, eta_s=eta, fraction=self._progress(), **kwargs)

    def _tick(self) -> None:
        self.state.elapsed_s = self._elapsed_before + time.perf_counter() - self._run_start

    def run(self, should_stop: ShouldStop | None = None) -> Iterator[TrainEvent]:
        """Train until the budget ends (its epochs, or its minutes, whichever of those set ends first),
        early stopping triggers or ``should_stop()``; the final event says which (``reason``).

        Yields events on rank 0 only. The best checkpoint at ``out`` is valid whenever it exists.
        """
        main = self.dist.is_main
        self._should_stop = should_stop if main else None
        self._run_start, self._run_steps = time.perf_counter(), 0
        self._elapsed_before = self.state.elapsed_s
        if main:
            yield from self._start_events()
        stop_reason = "cancelled" if any_rank(self._validation_cancelled, self.dist) else ""
        while not stop_reason:
            if self.config.epochs is not None and self.state.epoch >= self.config.epochs:
                stop_reason = "epochs"
                break
            stop_reason = yield from self._train_epoch(should_stop if main else None)
            if stop_reason == "time" and self.state.epoch_loss_count:
                yield from self._end_epoch(main, partial=True)  # the last partial epoch counts too
            if stop_reason:
                break
            self.state.epoch += 1
            yield from self._end_epoch(main)
            self._tick()
            if any_rank(self._validation_cancelled, self.dist):
                stop_reason = "cancelled"
                break
            if self.config.patience and self.state.bad_epochs >= self.config.patience:
                stop_reason = "early_stop"
                break
        if main:
            yield self._final_event(stop_reason)
        barrier(self.dist)

    def _start_events(self) -> Iterator[TrainEvent]:
        yield self._event(EventKind.START, message=f"{len(self.train_samples)} training / {len(self.val_samples)} validation images, {self.steps_per_epoch} steps per epoch on {self.device}"
                                                  + ("" if self.precision == "fp32" else f", {self.precision} autocast")
                                                  + (f" ({self.precision_note})" if self.precision_note else ""))
        if self.base is not None and self.val_samples and not self.state.base_metrics and self.state.step == 0:
            metrics = self._validate_unless_cancelled()
            if metrics:
                self.state.base_metrics = metrics
                yield self._event(EventKind.BASELINE, metrics=metrics, message=f"the base model on the validation images ({self._validation_pixels()})")
                if self.config.keep_base and math.isfinite(metrics["F1"]):  # the base is epoch 0, the one to beat
                    self.state.best_score, self.state.best_epoch, self.state.best_metrics = metrics["F1"], 0, metrics
                    self._save_best(metrics)

    def _train_epoch(self, should_stop: ShouldStop | None) -> Generator[TrainEvent, None, str]:
        """The steps of the current epoch (from the resumed step on); returns why it ended:
        ``""`` (all its steps done), ``cancelled`` (``should_stop()``, asked on rank 0) or ``time``
        (the minutes are spent)."""
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        self.dataset.epoch = self.state.epoch
        sampler = DistributedSampler(self.dataset, self.dist.world_size, self.dist.rank, shuffle=False) if self.dist.enabled else None
        loader = DataLoader(self.dataset, batch_size=self.config.batch_size // self.dist.world_size, sampler=sampler, shuffle=False, num_workers=0)
        skip = self.state.step - self.state.epoch * self.steps_per_epoch  # resumed mid-epoch
        self._train_mode()
        for i, (x, y, w) in enumerate(loader):
            if i < skip:
                continue
            cancelled = should_stop is not None and should_stop()
            over_time = self.config.minutes is not None and self.state.elapsed_s >= 60 * self.config.minutes
            if any_rank(cancelled or over_time, self.dist):
                return "cancelled" if cancelled else "time"
            value = self._step(x, y, w)
            if self.dist.is_main:
                yield self._event(EventKind.STEP, loss=value, lr=self.optimizer.param_groups[0]["lr"])
        return ""

    def _step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
        """One optimizer step on a batch ``x (N, C, P, P)``, ``y (N, P, P)``, ``w (N, P, P)``; the global loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * self._lr_factor()
        x = x.to(self.device, self.dtype, memory_format=self.memory_format)
        y, w = y.to(self.device), w.to(self.device, self.dtype)
        with autocast(self.device, self.precision):  # the loss itself runs in float32 (autocast's rule for reductions)
            logits = self.net(x)
        loss = segmentation_loss(logits.float(), y, w, *loss_reduction(self.dist), fn_weight=self.config.fn_weight)
        if self._anchor:  # L2-SP: the starting point, not zero, is what the weights are pulled to
            loss = loss + self.config.l2sp * sum(((p - a) ** 2).sum() for p, a in self._anchor)
        if not torch.isfinite(loss):
            raise R2UNetError(f"the training loss became {loss.item()} at step {self.state.step}; lower the learning rate (--lr)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.step += 1
        self._run_steps += 1
        self._tick()
        value = global_loss_value(loss, self.dist)
        self.state.epoch_loss_sum += value
        self.state.epoch_loss_count += 1
        return value

    def _final_event(self, stop_reason: str) -> TrainEvent:
        if not self.state.saved_by_this_run and not (self.resumed and self.out.exists()):
            self._save_best(None)  # stopped before any epoch ended: keep what this run has
        save_resume(self)
        return self._event(_END_KINDS[stop_reason], metrics=self.state.best_metrics or None, path=str(self.out),
                           message=self._stop_message(stop_reason), reason=stop_reason)

    def _stop_message(self, reason: str) -> str:
        """When the run ended (epoch and step; a fraction of an epoch as in the history) and why."""
        state = self.state
        at = f"at epoch {round(state.step / self.steps_per_epoch, 3):g} (step {state.step})"
        kept = ("; no epoch beat the base model on the validation images, so the output holds the base weights"
                if self.config.keep_base and state.best_epoch == 0 and state.step else "")
        return self._why(reason, at) + kept

    def _why(self, reason: str, at: str) -> str:
        state = self.state
        if reason == "epochs":
            return f"finished {at}: the {self.config.epochs} epochs are done"
        if reason == "time":
            return f"stopped {at}: the time budget of {self.config.minutes:g} min is spent"
        if reason == "early_stop":
            best = f" (best: epoch {state.best_epoch})" if state.best_epoch >= 0 else ""
            return f"stopped early {at}: no improvement for {self.config.patience} epochs{best}"
        return f"cancelled {at}; the best checkpoint is kept"

    def _end_epoch(self, main: bool, partial: bool = False) -> Iterator[TrainEvent]:
        count = self.state.epoch_loss_count
        train_loss = self.state.epoch_loss_sum / count if count else float("nan")
        self.state.epoch_loss_sum, self.state.epoch_loss_count = 0.0, 0
        metrics = self._validate_unless_cancelled() if main else None
        score = metrics["F1"] if metrics and math.isfinite(metrics["F1"]) else -train_loss
        interrupted = any_rank(self._validation_cancelled, self.dist)  # not judged: neither best nor a bad epoch
        improved = score > self.state.best_score and not interrupted
        if main:
            epoch = round(self.state.epoch + count / self.steps_per_epoch, 3) if partial else self.state.epoch
            record = {"epoch": epoch, "step": self.state.step, "train_loss": train_loss,
                      "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": round(self.state.elapsed_s, 2)}
            if metrics:
                record.update({f"val_{k}": v for k, v in metrics.items()})
            self.state.history.append(record)
        if improved:
            self.state.best_score, self.state.best_epoch, self.state.bad_epochs = score, self.state.epoch, 0
            self.state.best_metrics = metrics or {}
            if main:
                self._save_best(metrics)
        elif not interrupted:
            self.state.bad_epochs += 1
        self.state.bad_epochs = broadcast_int(self.state.bad_epochs, self.dist)  # every rank agrees on early stopping
        if main:
            write_history(self.out, self.state.history)
            save_resume(self)
            note = f"partial epoch {epoch:g}, ended by the time budget" if partial else ""
            yield self._event(EventKind.EPOCH, loss=train_loss, metrics=metrics, lr=self.optimizer.param_groups[0]["lr"], message=note)
            if improved:
                yield self._event(EventKind.CHECKPOINT, metrics=metrics, path=str(self.out), message=f"best so far (epoch {self.state.epoch})")
