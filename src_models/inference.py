"""The one tiler: sliding-window inference with Gaussian blending, streamed band by band.

This module owns turning an image of any size into class probabilities:

- :func:`sliding_window_inference` (the MONAI-shaped core): tiles of ``roi_size`` laid on a
  regular grid with ``overlap``, run in batches of ``sw_batch_size`` through ``predictor``,
  blended with a Gaussian weight (``mode="gaussian"``) or a flat one (``"constant"``). Tiles are
  processed one row of tiles at a time and finished rows are written to ``out`` at once, so the
  working memory is ``(K + 1) x tile_h x W`` floats whatever the image height; the input is read
  band by band (``inputs[:, y0:y1]``), so dask and memory-mapped arrays stay lazy.
- :class:`Segmenter`: a checkpoint on a device plus its preprocessing; ``predict`` handles one
  2D image ``(H, W)``/``(H, W, C)``, ``predict_stack`` any leading stack/time axes slice by
  slice. Device ``auto`` is cuda > mps > cpu; CUDA runs under autocast (AMP). On out-of-memory
  the run restarts with half the batch, then half the tile (down to 128), then on the CPU, and
  says so through ``log``. ``tta=True`` averages the predictions of the 4 flipped images.
- :func:`probabilities_to_labels`: threshold (binary) or argmax (multi-class) to a uint8 mask.

The image is padded by edge replication to the network's size multiple before tiling, exactly
as the network pads a whole image, so a single-tile run equals ``model(image)`` and a tiled run
differs from it only by the tiles' interior borders, which the Gaussian weights suppress.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint
from .errors import CancelledError, R2UNetError
from .nets import logits_to_probabilities
from .preprocessing import check_image, measure_stats, normalize_tile, to_chw
from .resources import HEADROOM, available_memory, require_memory

Progress = Callable[[float], None]
ShouldStop = Callable[[], bool]
Log = Callable[[str], None]

DEFAULT_OVERLAP = 0.25  # of sliding_window_inference (a fraction of the tile)
# Segmenter's default overlap. Measured with r2unet-drive on skimage's retina (1856^2 and 1920^2 crops,
# two 1024-pixel tiles per axis, against the whole image): 128 pixels -> max |difference| 8.9e-3 and
# 7 flipped mask pixels, 160 -> 2.6e-3, 192 -> 8.9e-4 and none (tests/test_inference.py checks it).
AUTO_OVERLAP_PIXELS = 192


def auto_overlap(tile: int) -> float:
    """192 pixels of overlap whatever the tile (0.15 of 1280), at most half of it."""
    return min(0.5, AUTO_OVERLAP_PIXELS / max(1, tile))
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both
MIN_TILE = 128
ACTIVATION_BYTES_PER_PIXEL = 900  # R2U-Net 16-256, onnxruntime: a 1024^2 tile's process peaks at 0.9 GB (the activations alone ~490 B/px)
BACKENDS = ("auto", "torch", "onnxruntime")
BACKEND_ENV = "R2UNET_BACKEND"  # overrides the backend argument (auto | torch | onnxruntime)
AUTO_WHOLE_IMAGE_PIXELS = 1536 * 1536  # images up to this size run as one tile (no overlap to recompute)
AUTO_TILE = 1280  # larger ones (or where memory is short): tiles of at most this side, evened out (balanced_tile)


def available_devices() -> list[str]:
    """Devices usable here, best first, always ending with ``cpu``."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda > mps > cpu; an explicit device that is not available is an error."""
    name = str(device)
    if name == "auto":
        return torch.device(available_devices()[0])
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise R2UNetError(f"device {name!r} is unknown; use auto, cuda, mps or cpu")
    if kind not in available_devices():
        raise R2UNetError(f"device {name!r} is not available here; available: {', '.join(available_devices())}")
    return torch.device(name)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def gaussian_weight(shape: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """``(h, w)`` float32 separable Gaussian centred on the tile, peak 1, never zero.

    The floor (1e-3) is applied per axis, not to the product: along an image border every tile
    has the same small weight in one axis, and the other axis must still decide between them.
    """
    axes = []
    for n in shape:
        coords = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        axis = np.exp(-0.5 * (coords / sigma) ** 2)
        axes.append(np.maximum(axis / axis.max(), 1e-3))
    return np.outer(axes[0], axes[1]).astype(np.float32)


def tile_starts(size: int, tile: int, overlap: float, multiple: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap``.

    Starts are multiples of ``multiple`` (``size`` and ``tile`` must be too), so every tile sees
    the same pooling grid as the whole image; the last tile ends exactly at ``size``.
    """
    if tile >= size:
        return [0]
    stride = max(multiple, int(tile * (1.0 - overlap) + 1e-6) // multiple * multiple)  # 1e-6: 40 * (1 - 1/40) is 39
    count = math.ceil((size - tile) / stride) + 1
    starts = [round(i * (size - tile) / (count - 1) / multiple) * multiple for i in range(count)]
    return sorted(set(starts))


def balanced_tile(size: int, max_tile: int, overlap_px: int, multiple: int = 1) -> int:
    """The tile length along one axis: as few tiles of at most ``max_tile`` as cover ``size`` with
    ``overlap_px`` of overlap, made equal and as short as they can be.

    A fixed tile wastes work where the last one sticks out: 1424 pixels in 1024-pixel tiles
    computes 2048 pixels, in two balanced 808-pixel tiles (192 overlap) 1616. ``size``,
    ``max_tile`` and the result are multiples of ``multiple``.
    """
    if max_tile >= size:
        return size
    overlap_px = min(overlap_px, max_tile - multiple)

    def stride(tile: int) -> int:  # tile_starts' own rule
        return max(multiple, (tile - overlap_px) // multiple * multiple)

    count = math.ceil((size - max_tile) / stride(max_tile)) + 1
    tile = -(-(-(-(size - overlap_px) // count) + overlap_px) // multiple) * multiple
    while tile < max_tile and tile + (count - 1) * stride(tile) < size:
        tile += multiple
    return min(max_tile, tile)


def tile_layout(size: int, max_tile: int, overlap_px: int, multiple: int = 1) -> tuple[int, list[int]]:
    """One axis of the tiling: the evened-out tile length and the tiles' start offsets."""
    tile = balanced_tile(size, max_tile, overlap_px, multiple)
    return tile, tile_starts(size, tile, min(0.95, overlap_px / tile), multiple)


def _axis_weights(size: int, tile: int, starts: list[int], gaussian: bool) -> list[np.ndarray]:
    """Per-tile 1D blending weights along one axis.

    Inside the image a tile's outer ``margin`` pixels (half the smallest overlap) get weight 0,
    so no pixel takes any part of its value from a tile whose border is near it: borders see
    zero padding where the whole image has real context. Sides on the image border keep their
    weight (the whole image has the same border there).
    """
    overlaps = [tile - (b - a) for a, b in zip(starts, starts[1:])]
    margin = max(0, min(overlaps) // 2) if overlaps else 0
    base = gaussian_weight((1, tile))[0] if gaussian and len(starts) > 1 else np.ones(tile, np.float32)
    weights = []
    for start in starts:
        w = base.copy()
        if margin and start > 0:
            w[:margin] = 0.0
        if margin and start + tile < size:
            w[tile - margin :] = 0.0
        weights.append(w)
    return weights


def _read_band(inputs: Any, y0: int, y1: int, padded_w: int) -> np.ndarray:
    """Rows ``y0:y1`` of ``inputs`` ``(C, H, W)``, edge-replicated past the bottom/right border."""
    height, width = inputs.shape[-2:]
    band = np.asarray(inputs[:, y0 : min(y1, height), :])
    pad_h, pad_w = y1 - y0 - band.shape[1], padded_w - width
    if pad_h > 0 or pad_w > 0:
        band = np.pad(band, ((0, 0), (0, max(pad_h, 0)), (0, max(pad_w, 0))), mode="edge")
    return band


def sliding_window_inference(
    inputs: Any,
    roi_size: int | tuple[int, int],
    sw_batch_size: int,
    predictor: Callable[[np.ndarray], np.ndarray],
    overlap: float = DEFAULT_OVERLAP,
    mode: str = "gaussian",
    *,
    size_multiple: int = 1,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    out: Any = None,
) -> Any:
    """Blend ``predictor`` over tiles of ``inputs``; returns ``out`` ``(K, H, W)`` float32.

    Args:
        inputs: ``(C, H, W)`` array-like (numpy, dask, memmap); read one band of rows at a time.
        roi_size: the largest tile height/width (clipped to the padded image, rounded down to
            ``size_multiple``); tiles are then evened out so that none sticks out (:func:`balanced_tile`).
        sw_batch_size: tiles per ``predictor`` call.
        predictor: ``(N, C', h, w)`` float32 -> ``(N, K, h, w)`` float32 probabilities.
        overlap: fraction of ``roi_size`` shared with a neighbour (at least that many pixels), in ``[0, 0.95]``.
        mode: ``gaussian`` or ``constant`` blending.
        size_multiple: the image is edge-padded to a multiple of this (the network's).
        transform: applied to each raw band before tiling (pointwise preprocessing).
        progress: called with the fraction of tiles done, in ``(0, 1]``.
        should_stop: polled between batches; when it returns True, :class:`CancelledError`.
        out: optional preallocated ``(K, H, W)`` float32 target (e.g. a memmap).
    """
    if not 0.0 <= overlap <= 0.95:
        raise R2UNetError(f"overlap={overlap} must be in [0, 0.95]")
    if mode not in ("gaussian", "constant"):
        raise R2UNetError(f"blend mode {mode!r} is unknown; use gaussian or constant")
    if sw_batch_size < 1:
        raise R2UNetError(f"batch size {sw_batch_size} must be >= 1")
    _, height, width = inputs.shape
    padded = (-(-height // size_multiple) * size_multiple, -(-width // size_multiple) * size_multiple)
    roi = (roi_size, roi_size) if isinstance(roi_size, int) else tuple(roi_size)
    th, tw = (max(size_multiple, min(r, p) // size_multiple * size_multiple) for r, p in zip(roi, padded))
    # the overlap asked for, in pixels of the largest tile; the tiles themselves are evened out
    (th, ys), (tw, xs) = (tile_layout(p, t, round(overlap * t), size_multiple) for p, t in zip(padded, (th, tw)))
    wys = _axis_weights(padded[0], th, ys, mode == "gaussian")
    wxs = _axis_weights(padded[1], tw, xs, mode == "gaussian")

    acc: np.ndarray | None = None
    wsum = np.zeros((th, padded[1]), dtype=np.float32)
    total, done = len(ys) * len(xs), 0
    for row, y0 in enumerate(ys):
        band = _read_band(inputs, y0, y0 + th, padded[1])
        if transform is not None:
            band = transform(band)
        for b in range(0, len(xs), sw_batch_size):
            if should_stop is not None and should_stop():
                raise CancelledError()
            starts = xs[b : b + sw_batch_size]
            batch = np.stack([band[:, :, x0 : x0 + tw] for x0 in starts]).astype(np.float32, copy=False)
            probs = predictor(batch)
            if acc is None:
                acc = np.zeros((probs.shape[1], th, padded[1]), dtype=np.float32)
                if out is None:
                    out = np.empty((probs.shape[1], height, width), dtype=np.float32)
            for j, (prob, x0) in enumerate(zip(probs, starts)):
                weight = np.outer(wys[row], wxs[b + j])
                acc[:, :, x0 : x0 + tw] += prob * weight
                wsum[:, x0 : x0 + tw] += weight
            done += len(starts)
            if progress is not None:
                progress(done / total)
        # rows above the next tile row are final: write them out and slide the buffers up
        shift = (ys[row + 1] - y0) if row + 1 < len(ys) else th
        stop = min(y0 + shift, height)
        if stop > y0:
            out[:, y0:stop] = acc[:, : stop - y0, :width] / wsum[None, : stop - y0, :width]
        acc[:, : th - shift], wsum[: th - shift] = acc[:, shift:].copy(), wsum[shift:].copy()
        acc[:, th - shift :], wsum[th - shift :] = 0.0, 0.0
    return out


class Segmenter:
    """A checkpoint loaded on a device, ready to segment images of any size.

    ``predict(image)`` -> probabilities ``(K, H, W)`` float32 (K = 1 for a binary model).
    """

    def __init__(
        self, checkpoint: Checkpoint, device: str = "auto", amp: bool = True, log: Log | None = None, tta: bool = False,
        backend: str = "auto",
    ) -> None:
        self.checkpoint = checkpoint
        self.device = select_device(device)
        self.amp = amp
        self.tta = tta  # test-time augmentation: mean over the 4 flips (4x the compute)
        self.log = log or (lambda message: None)
        self.model = checkpoint.build(self.device)
        self.onnx: Any = None
        self._should_stop: ShouldStop | None = None  # the running predict's, for a Cancel inside a tile
        self.backend = self._choose_backend(os.environ.get(BACKEND_ENV) or backend)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # tiles share one shape: let cuDNN pick its fastest kernels once
        self.in_channels = checkpoint.config.in_channels
        self.size_multiple = checkpoint.config.size_multiple

    def _choose_backend(self, backend: str) -> str:
        """torch, or onnxruntime on the CPU (about 2x faster, same results to ~1e-6); auto = the fastest that works."""
        if backend not in BACKENDS:
            raise R2UNetError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")
        if backend == "torch" or (backend == "auto" and self.device.type != "cpu"):
            return "torch"
        if self.device.type != "cpu":
            raise R2UNetError("the onnxruntime backend runs on the CPU only; use --device cpu or --backend torch")
        from .export import OnnxPredictor

        try:
            self.onnx = OnnxPredictor(self.checkpoint)
            self.onnx.session()  # build it now: a failure here still falls back to PyTorch
        except Exception as exc:
            self.onnx = None
            if backend == "onnxruntime":
                raise R2UNetError(f"the onnxruntime backend is not available ({exc}); install onnxruntime or use --backend torch") from exc
            self.log(f"onnxruntime not used ({exc}); running PyTorch")
            return "torch"
        return "onnxruntime"

    # -- the network on one batch -------------------------------------------------------
    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        if self.onnx is not None and self.device.type == "cpu":
            return self._predict_batch_onnx(batch)
        if self._should_stop is None:
            return self._predict_batch_torch(batch)
        should_stop = self._should_stop

        def check(module: Any, inputs: Any) -> None:  # before every conv: Cancel stops inside a tile
            if should_stop():
                raise CancelledError()

        handles = [m.register_forward_pre_hook(check) for m in self.model.modules() if isinstance(m, torch.nn.Conv2d)]
        try:
            return self._predict_batch_torch(batch)
        finally:
            for handle in handles:
                handle.remove()

    def _predict_batch_torch(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device)
        use_amp = self.amp and self.device.type == "cuda"
        dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        flips = FLIPS if self.tta else ((),)

        def probabilities(flip: tuple[int, ...]) -> torch.Tensor:
            if not flip:
                return logits_to_probabilities(self.model(x).float())
            return logits_to_probabilities(self.model(x.flip(flip)).float()).flip(flip)

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=use_amp):
            probs = sum(probabilities(f) for f in flips) / len(flips)
        return probs.cpu().numpy()

    def _predict_batch_onnx(self, batch: np.ndarray) -> np.ndarray:
        flips = FLIPS if self.tta else ((),)
        total = None
        for flip in flips:  # torch's flip dims (2, 3) are numpy's axes
            x = np.flip(batch, axis=flip) if flip else batch
            try:
                logits = self.onnx(x, self._should_stop)
            except CancelledError:
                raise
            except Exception as exc:  # onnxruntime's errors are not RuntimeErrors: name memory failures as such
                if "alloc" in str(exc).lower():
                    raise MemoryError(str(exc)) from exc
                raise
            probs = logits_to_probabilities(torch.from_numpy(np.flip(logits, axis=flip).copy() if flip else logits)).numpy()
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(flips)

    def _move_to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self.model = self.model.to(self.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def auto_tile(self, height: int, width: int) -> int:
        padded = -(-height // self.size_multiple) * self.size_multiple, -(-width // self.size_multiple) * self.size_multiple
        if padded[0] * padded[1] <= AUTO_WHOLE_IMAGE_PIXELS:
            # on the CPU, where host memory is what the activations use, tile it when that is short
            free = available_memory() if self.device.type == "cpu" else None
            if free is None or ACTIVATION_BYTES_PER_PIXEL * padded[0] * padded[1] <= HEADROOM * free:
                return max(padded)
        return AUTO_TILE

    # -- one 2D image -------------------------------------------------------------------
    def predict(
        self,
        image: Any,
        *,
        channel_axis: int | None | str = "auto",
        tile: int | None = None,
        overlap: float | None = None,
        batch_size: int | None = None,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
        out: Any = None,
    ) -> Any:
        """2D image ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` -> probabilities ``(K, H, W)``.

        ``tile=None`` runs images up to 1536^2 pixels whole and larger ones in tiles of at most
        1280 pixels, evened out, overlapping by 192 pixels; ``out`` may be a :class:`LabelSink`;
        ``batch_size=None`` is 1 on the CPU (batching gains nothing there and costs memory), 4 on
        accelerators.
        """
        batch_size = batch_size or (1 if self.device.type == "cpu" else 4)
        chw = to_chw(image, channel_axis)
        check_image(chw)
        config = self.checkpoint.preprocess
        channels = config.out_channels(chw.shape[0])
        if channels != self.in_channels:
            raise R2UNetError(
                f"the model takes {self.in_channels} channel(s) but this {chw.shape[0]}-channel image gives {channels} "
                f"with channels={config.channels!r}; use a model trained for this kind of image"
            )
        if tile is not None and tile < 16:
            raise R2UNetError(f"tile={tile} is too small; use 128 or more (or leave it to auto)")
        tile = tile or self.auto_tile(*chw.shape[1:])
        requested_overlap = overlap  # None: 192 pixels of whatever tile the loop below ends up using
        k, (h, w) = self.checkpoint.config.out_channels, chw.shape[1:]
        # one band of tiles in flight, the network's activations (~900 bytes per tile pixel), and the result
        need = 4 * (chw.shape[0] + k + 2) * min(tile, h) * w + ACTIVATION_BYTES_PER_PIXEL * min(tile, h) * min(tile, w) * batch_size
        if out is None:
            need += 4 * k * h * w
        require_memory(need, f"segmenting a {h} x {w} image",
                           "close other programs, crop or downsample the image, or run it on a machine with more memory")
        stats = measure_stats(chw, config)
        self._should_stop = should_stop  # polled inside a tile too (_predict_batch)
        try:
            while True:
                overlap = auto_overlap(tile) if requested_overlap is None else requested_overlap
                try:
                    return sliding_window_inference(
                        chw, tile, batch_size, self._predict_batch, overlap,
                        size_multiple=self.size_multiple,
                        transform=lambda band: normalize_tile(band, stats, config),
                        progress=progress, should_stop=should_stop, out=out,
                    )
                except (RuntimeError, MemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if batch_size > 1:
                        batch_size //= 2
                        self.log(f"out of memory: retrying with batch size {batch_size}")
                    elif tile > MIN_TILE:
                        tile = max(MIN_TILE, tile // 2)
                        self.log(f"out of memory: retrying with {tile}-pixel tiles")
                    elif self.device.type != "cpu":
                        self._move_to_cpu()
                        self.log("out of memory on the accelerator: retrying on the CPU")
                    else:
                        raise R2UNetError(
                            f"out of memory even with batch 1 and {tile}-pixel tiles on the CPU; close other programs or use a smaller image"
                        ) from exc
        finally:
            self._should_stop = None

    # -- stacks and time series -----------------------------------------------------------
    def predict_stack(
        self,
        array: Any,
        *,
        channel_axis: int | None = None,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """``(..., H, W)`` (``channel_axis=None``) or ``(..., H, W, C)`` (``channel_axis=-1``) ->
        ``(..., K, H, W)`` float32, each 2D slice predicted on its own."""
        spatial = 2 if channel_axis is None else 3
        if array.ndim < spatial:
            raise R2UNetError(f"array of shape {tuple(array.shape)} has fewer than {spatial} image axes")
        if channel_axis not in (None, -1, array.ndim - 1):
            raise R2UNetError("for stacks the channel axis must be the last one (napari's RGB layout) or None")
        leading = tuple(array.shape[: array.ndim - spatial])
        h, w = array.shape[-spatial:][:2]
        require_memory(4 * self.checkpoint.config.out_channels * int(np.prod(leading or (1,))) * h * w,
                       f"segmenting a stack of {int(np.prod(leading or (1,)))} slices of {h} x {w}",
                       "segment fewer slices at a time, or run it on a machine with more memory")
        slices = list(np.ndindex(*leading)) or [()]
        if kwargs.get("tile") is None:  # decided once: every slice tiled alike, whatever memory does meanwhile
            kwargs["tile"] = self.auto_tile(h, w)
        result: np.ndarray | None = None
        for i, index in enumerate(slices):
            def sub_progress(fraction: float, i: int = i) -> None:
                if progress is not None:
                    progress((i + fraction) / len(slices))

            probs = self.predict(
                array[index], channel_axis=None if channel_axis is None else -1,
                progress=sub_progress, should_stop=should_stop, **kwargs,
            )
            if result is None:
                result = np.empty(leading + probs.shape, dtype=np.float32)
            result[index] = probs
        assert result is not None
        return result


def probabilities_to_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``(..., K, H, W)`` -> uint8 ``(..., H, W)``: ``p >= threshold`` for K == 1, argmax otherwise."""
    if not 0.0 <= threshold <= 1.0:
        raise R2UNetError(f"threshold={threshold} must be in [0, 1]")
    if probs.shape[-3] == 1:
        return (probs[..., 0, :, :] >= threshold).astype(np.uint8)
    return np.argmax(probs, axis=-3).astype(np.uint8)


class LabelSink:
    """An ``out`` for :func:`sliding_window_inference` / ``Segmenter.predict`` that keeps labels only.

    Each band of finished rows is thresholded (:func:`probabilities_to_labels`) as it arrives, so
    a huge image never holds its float32 probabilities (4 bytes per class and pixel: 268 MB at
    8192^2); ``labels`` is the uint8 ``(H, W)`` result, the same as thresholding the full array.
    """

    def __init__(self, classes: int, height: int, width: int, threshold: float = 0.5) -> None:
        probabilities_to_labels(np.zeros((classes, 1, 1), np.float32), threshold)  # check the threshold now
        self.shape = (classes, height, width)
        self.threshold = threshold
        self.labels = np.zeros((height, width), dtype=np.uint8)

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        if not isinstance(key, tuple) or len(key) < 2 or key[0] != slice(None):
            raise TypeError("LabelSink takes whole-class row bands: sink[:, y0:y1] = probabilities")
        self.labels[key[1:]] = probabilities_to_labels(value, self.threshold)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """``(..., K, H, W)`` -> ``(..., H, W)`` float32 in [0, 1]: where the model is unsure.

    The entropy of the predicted class distribution divided by its maximum (log 2 for a binary
    model, log K otherwise): 0 where the model is certain, 1 at p = 0.5. With test-time
    augmentation the probabilities are the mean over the flips, so flips that disagree raise it
    too (the predictive entropy of the ensemble).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[-3] == 1:
        p = np.clip(probs[..., 0, :, :], 1e-7, 1 - 1e-7)
        return (-(p * np.log(p) + (1 - p) * np.log1p(-p)) / np.log(2.0)).astype(np.float32)
    p = np.clip(probs, 1e-7, 1.0)
    return (-(p * np.log(p)).sum(axis=-3) / np.log(probs.shape[-3])).astype(np.float32)

