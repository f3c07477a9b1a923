"""What runs in the worker thread: load the model (torch is imported here, never at start-up),
predict, report progress, stop when asked.

- :func:`segment`: one :class:`~napari_r2unet._layers.Job` (the Segment widget);
- :func:`segment_all`: several jobs with one model, progress over all of them (the Fine-tune
  widget's "Re-segment other images");
- :func:`export_package`: a version as a bioimage.io package (the Fine-tune widget's "Export for
  BioImage.IO...").

Thread use: on the CPU, torch gets all cores but one (at least one), so napari's event loop keeps
a core and the GUI stays responsive while a model runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import Job


class SegmenterCache:
    """Loaded models of one widget, by (model, device, options); loading a checkpoint once per
    choice. :meth:`use` holds a lock for a whole run: a Segment pressed while the warm-up loads
    and runs the model waits for it and then takes that model, and two runs never share a
    Segmenter at once (its Cancel callback and notices are per run)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, bool, str, str], Any] = {}
        self._lock = threading.RLock()

    def get(self, spec: str, device: str, log: Callable[[str], None], tta: bool = False, scale: str = "auto",
            precision: str = "auto") -> Any:
        key = (spec, device, tta, scale, precision)
        with self._lock:
            if key not in self._cache:
                from src_models.inference import Segmenter
                from src_models.model_names import load_model

                self._cache.clear()  # keep one model in memory
                self._cache[key] = Segmenter(load_model(spec), device=device, log=log, tta=tta, scale=scale, precision=precision)
            segmenter = self._cache[key]
            segmenter.log = log  # this run's notices go to this run's caller (not to the warm-up's)
            return segmenter

    @contextlib.contextmanager
    def use(self, spec: str, device: str, log: Callable[[str], None], **options: Any) -> Iterator[Any]:
        """The Segmenter of ``spec``, held for this caller until the block ends."""
        with self._lock:
            yield self.get(spec, device, log, **options)


WARMUP_ENV = "R2UNET_WARMUP"  # 0: no warm-up when a model is chosen (the tests set it)
WARMUP_SIDE = 64  # the warm-up forward pass: small, it only wakes the kernels and the thread pool


def warm_up(cache: SegmenterCache, spec: str, device: str, tta: bool, scale: str, precision: str,
            log: Callable[[str], None]) -> str:
    """Load ``spec`` into ``cache`` and run one small forward pass (the backend's session, graph
    cache and kernels), so the first Segment costs what the next ones do. Returns the model name."""
    if device in ("auto", "cpu"):
        limit_cpu_threads()
    with cache.use(spec, device, log, tta=tta, scale=scale, precision=precision) as segmenter:
        side = max(WARMUP_SIDE, segmenter.size_multiple)
        noise = np.random.default_rng(0).random((segmenter.in_channels, side, side), dtype=np.float32)
        segmenter.predict(noise, channel_axis=0)
        return segmenter.checkpoint.name


def limit_cpu_threads() -> int:
    import torch

    threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    return threads


def available_devices() -> list[str]:
    from src_models.devices import available_devices as devices

    return devices()


def segment(cache: SegmenterCache, spec: str, device: str, job: Job,
            progress: Callable[[float], None], should_stop: Callable[[], bool],
            log: Callable[[str], None]) -> tuple[np.ndarray, str]:
    """Probabilities ``(K, H, W)`` (or ``(..., K, H, W)`` for all slices) and the model's name."""
    if device in ("auto", "cpu"):
        limit_cpu_threads()  # before the model loads: onnxruntime sizes its thread pool from it
    with cache.use(spec, device, log, tta=job.tta, scale=job.scale, precision=job.precision) as segmenter:
        if should_stop():  # Cancel pressed while the warm-up held the model
            from src_models.errors import CancelledError

            raise CancelledError()
        if segmenter.device.type == "cpu":
            limit_cpu_threads()
        predict = segmenter.predict_stack if job.stack else segmenter.predict
        probs = predict(job.data, channel_axis=job.channel_axis, tile=job.tile, overlap=job.overlap,
                        progress=progress, should_stop=should_stop)
        return np.asarray(probs), segmenter.checkpoint.name


def segment_all(cache: SegmenterCache, spec: str, jobs: list[Job],
                progress: Callable[[float], None], should_stop: Callable[[], bool],
                log: Callable[[str], None]) -> list[tuple[np.ndarray, str]]:
    """:func:`segment` each job in turn with one model (device auto); ``progress`` covers them all."""
    results = []
    for i, job in enumerate(jobs):
        def part(fraction: float, i: int = i) -> None:
            progress((i + fraction) / len(jobs))

        results.append(segment(cache, spec, "auto", job, part, should_stop, log))
    return results


def export_package(checkpoint: Path, target: Path, overwrite: bool, log: Callable[[str], None]) -> Path:
    """Write ``checkpoint`` as a bioimage.io package at ``target`` (TorchScript and ONNX weights,
    checked on a test image: seconds); returns the written path. Failures are R2UNetErrors."""
    from src_models.bioimageio import export_package as export

    limit_cpu_threads()  # the exports and their check run on the CPU: the GUI keeps a core

    return Path(export(checkpoint, target, overwrite=overwrite, log=log))
