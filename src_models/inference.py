"""The Segmenter: a checkpoint on a device, its backends and its out-of-memory policy.

This module owns running a model over images of any size (the tiling itself is
:mod:`src_models.tiling`'s, devices are :mod:`src_models.devices`', labels and uncertainty
:mod:`src_models.labels`'):

- :class:`Segmenter`: a checkpoint on a device plus its preprocessing; ``predict`` handles one
  2D image ``(H, W)``/``(H, W, C)``, ``predict_stack`` any leading stack/time axes slice by
  slice. Device ``auto`` is cuda > mps > cpu; CUDA runs under autocast (AMP); on the CPU the
  onnxruntime backend is used when it works (about 2x faster). On out-of-memory the run restarts
  with half the batch, then half the tile (down to :data:`~src_models.settings.MIN_TILE`), then
  on the CPU, and says so through ``log``. ``tta=True`` averages the predictions of the 4 flipped
  images (``None``, the default: as the model card's ``tta`` says).
- The default tiling: images up to :data:`~src_models.settings.AUTO_WHOLE_IMAGE_PIXELS` run
  whole (if memory allows), larger ones in tiles of at most :data:`~src_models.settings.AUTO_TILE`
  pixels overlapping by :data:`~src_models.settings.AUTO_OVERLAP_PIXELS` pixels.
- The checkpoint's model card decides the geometry: ``tiled`` runs the tiler above at native
  resolution; ``resize`` normalises the whole image, letterboxes it to the card's size
  (:mod:`src_models.geometry`, exactly as training's samples were), runs ONE forward pass and
  resizes the probabilities back, so ``tile`` and ``overlap`` have no effect there.
- ``scale`` (tiled geometry): ``"auto"`` resizes an image whose field of view differs by more
  than 10 % from the card's training :class:`~src_models.scale.Scale` to that scale before the
  tiler and resizes the probabilities back (:mod:`src_models.scale`); a factor resizes by it;
  ``1`` runs at native resolution. Cards without a scale always run native.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint
from .devices import is_out_of_memory, select_device
from .errors import CancelledError, R2UNetError
from .geometry import letterbox, resize_planes, unletterbox
from .nets import logits_to_probabilities
from .precision import autocast, cpu_has_native_bf16, keep_float32_ends, resolve_precision, split_bf16_first_block
from .preprocessing import check_image, measure_stats, normalize_tile, to_chw
from .resources import HEADROOM, available_memory, require_memory
from .scale import parse_scale_option, resized_shape, scale_factor
from .settings import AUTO_OVERLAP_PIXELS, AUTO_TILE, AUTO_WHOLE_IMAGE_PIXELS, MIN_TILE, MIN_USER_TILE, padded_size
from .tiling import Progress, ShouldStop, TileGrid, run_grid, tile_grid

Log = Callable[[str], None]

FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both
ACTIVATION_BYTES_PER_PIXEL = 900  # R2U-Net 16-256, onnxruntime: a 1024^2 tile's process peaks at 0.9 GB (the activations alone ~490 B/px)
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISION_ENV = "R2UNET_PRECISION"  # replaces --precision auto (auto | fp32 | bf16)
BACKEND_ENV = "R2UNET_BACKEND"  # overrides the backend argument (auto | torch | onnxruntime | openvino)


def _openvino_available() -> bool:
    from .openvino_backend import openvino_available

    return openvino_available()


def openvino_runs_bf16(device_type: str, backend: str) -> bool:
    """Whether OpenVINO runs a bf16 run on ``device_type`` with ``backend`` (auto or openvino):
    on CPUs with native bf16 where it is installed (elsewhere bf16 asked for by name stays PyTorch's
    emulation). It needs no compiling, so auto's bf16 and ``--compile auto`` follow it."""
    return device_type == "cpu" and backend in ("auto", "openvino") and cpu_has_native_bf16() and _openvino_available()


def auto_overlap(tile: int) -> int:
    """The default overlap in pixels: AUTO_OVERLAP_PIXELS whatever the tile, at most half of it."""
    return min(AUTO_OVERLAP_PIXELS, tile // 2)


class Segmenter:
    """A checkpoint loaded on a device, ready to segment images of any size.

    ``predict(image)`` -> probabilities ``(K, H, W)`` float32 (K = 1 for a binary model).
    """

    def __init__(
        self, checkpoint: Checkpoint, device: str = "auto", amp: bool = True, log: Log | None = None, tta: bool | None = None,
        backend: str = "auto", scale: str | float = "auto", precision: str = "auto", compile: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.scale = parse_scale_option(scale)  # auto: to the card's training scale; a factor (1 = native)
        self._scale_note = ""  # the last scale notice logged
        self.device = select_device(device)
        self.log = log or (lambda message: None)
        # fp32, bf16 (autocast, PyTorch) or amp (CUDA mixed precision); amp=False forces fp32;
        # $R2UNET_PRECISION replaces auto (the tests set fp32)
        from_env = os.environ.get(PRECISION_ENV) if precision == "auto" else None
        asked = from_env or precision
        backend = os.environ.get(BACKEND_ENV) or backend
        self._requested_backend = backend
        self._asked_precision = asked if amp else "fp32"
        if asked == "auto" and backend == "onnxruntime":
            asked = "fp32"  # onnxruntime asked for by name: auto keeps its float32 kernels
        # compile: torch.compile the PyTorch network on the CPU (src_models.compiled; 10-30 s per
        # input shape, for long runs); auto's bf16 on a CPU is chosen only then
        self.compile = (bool(compile) and self.device.type == "cpu" and backend not in ("onnxruntime", "openvino")
                        and checkpoint.package is None)
        # OpenVINO runs bf16 without compiling (src_models.openvino_backend): auto's bf16 needs one of the two
        self._openvino_bf16 = not self.compile and checkpoint.package is None and openvino_runs_bf16(self.device.type, backend)
        self.precision, precision_note = resolve_precision(asked if amp else "fp32", self.device.type, checkpoint.model_card.bf16,
                                                           name=PRECISION_ENV if from_env else "precision",
                                                           fast=self.compile or self._openvino_bf16)
        if precision_note:
            self.log(precision_note)
        # test-time augmentation: mean over the 4 flips (4x the compute); None: as the model card says
        self.tta = checkpoint.model_card.tta if tta is None else bool(tta)
        self._model: Any = None  # the PyTorch network, built when first needed (not for onnxruntime)
        self._compiled: Any = None  # its compiled form (src_models.compiled.CompiledNetwork), when compile
        self.onnx: Any = None
        self._should_stop: ShouldStop | None = None  # the running predict's, for a Cancel inside a tile
        self._asked_backend = backend
        if self.precision == "bf16" and self._openvino_bf16:
            self._asked_backend = "openvino"
        elif (self.precision == "bf16" or self.compile) and self._asked_backend not in ("torch", "openvino"):
            if self._asked_backend == "onnxruntime":
                raise R2UNetError("bf16 runs on the OpenVINO or PyTorch backend; use --backend auto or --precision fp32")
            self._asked_backend = "torch"  # onnxruntime's CPU kernels are float32; compiling is PyTorch's
        self.package = checkpoint.package  # another tool's bioimage.io package: its own network and steps
        if self.package is not None:
            self.package.log = self.log
            self.precision, self.tta = "fp32", False
            self.backend = f"bioimageio ({self.package.weights_format})"
        else:
            self.backend = self._choose_backend(self._asked_backend)
            if self.compile:
                self.backend = "torch (compiled)"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # tiles share one shape: let cuDNN pick its fastest kernels once
        self.in_channels = checkpoint.config.in_channels
        self.size_multiple = self.package.step if self.package is not None else checkpoint.config.size_multiple
        self.geometry = checkpoint.model_card.geometry  # tiled (native resolution) or resize (letterboxed)

    def _choose_backend(self, backend: str) -> str:
        """torch, or onnxruntime on the CPU (about 2x faster, same results to ~1e-6), or OpenVINO
        for bf16 on the CPU; auto = the fastest that works."""
        if backend not in BACKENDS:
            raise R2UNetError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")
        if backend == "torch" or (backend == "auto" and self.device.type != "cpu"):
            return "torch"
        if self.device.type != "cpu":
            raise R2UNetError(f"the {backend} backend runs on the CPU only; use --device cpu or --backend torch")
        if backend == "openvino":
            return self._choose_openvino()
        from .export import OnnxPredictor

        try:
            self.onnx = OnnxPredictor(self.checkpoint)
            self.onnx.prepare()  # the session builds in the background while the caller reads its image
        except Exception as exc:
            self.onnx = None
            if backend == "onnxruntime":
                raise R2UNetError(f"the onnxruntime backend is not available ({exc}); install onnxruntime or use --backend torch") from exc
            self.log(f"onnxruntime not used ({exc}); running PyTorch")
            return "torch"
        return "onnxruntime"

    @property
    def amp(self) -> bool:
        """Whether CUDA mixed precision runs (the former ``amp`` attribute, read-only)."""
        return self.precision == "amp"

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self.checkpoint.build(self.device)
            if self.precision == "bf16":
                self._model = keep_float32_ends(self._model)
            if self._channels_last:
                self._model = self._model.to(memory_format=torch.channels_last)
        return self._model

    @model.setter
    def model(self, value: Any) -> None:
        # swapping the network (fine-tuning does) drops the compiled copy of the old one; weights
        # changed in place are not seen by a compiled copy (frozen, folded): assign the model again
        self._model, self._compiled = value, None

    @property
    def _channels_last(self) -> bool:
        """Whether the network and its input are NHWC: oneDNN's bf16 kernels and inductor's graphs want it."""
        return (self.precision == "bf16" or self.compile) and self.device.type == "cpu"

    def _network(self) -> Any:
        """What runs a batch: the compiled network when compiling (it falls back to ``model`` and
        logs why if inductor fails), else ``model``."""
        if not self.compile:  # (set on the CPU only)
            return self.model
        if self._compiled is None:
            from .compiled import CompiledNetwork
            from .nets import fold_batch_norms

            network = fold_batch_norms(self.model)  # the recurrent steps' batch norms folded into their convs
            # the float32 first block's recurrent layers in split bf16, on CPUs with native bf16 (what
            # auto compiles): inductor's AVX2 code dropped the low halves in a simulated AVX2 run
            if self.precision == "bf16" and cpu_has_native_bf16():
                network = split_bf16_first_block(network)
            if self._channels_last:
                network = network.to(memory_format=torch.channels_last)
            self._compiled = CompiledNetwork(network, lambda message: self.log(message), eager=lambda x: self.model(x))
        if self._compiled.failed:  # it fell back to eager: from now on eager, with Cancel inside a tile
            self.backend, self.compile = "torch", False
            return self.model
        return self._compiled

    def _choose_openvino(self) -> str:
        """OpenVINO for bf16 (fp32 asked for by name: OpenVINO in float32); when auto chose it and
        it cannot start, float32 on the fastest backend that can, said through ``log``."""
        from .openvino_backend import OpenVinoPredictor

        try:
            self.onnx = OpenVinoPredictor(self.checkpoint, precision=self.precision)
            self.onnx.prepare()  # the marked graph is read in the background while the caller reads its image
        except Exception as exc:
            self.onnx = None
            return self._openvino_failed(exc)
        return "openvino"

    def _openvino_failed(self, exc: BaseException) -> str:
        """The backend that runs instead of OpenVINO, which failed with ``exc`` (raised as one line
        when OpenVINO was asked for by name): PyTorch's bf16 when bf16 was asked for by name, else
        float32 on the fastest backend that works. The caller drops the predictor after this returns."""
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if self._requested_backend == "openvino":
            raise R2UNetError(f"the OpenVINO backend failed ({reason}); use --backend auto or --precision fp32") from exc
        if self._asked_precision == "bf16":
            self.log(f"OpenVINO not used ({reason}); running bf16 on PyTorch")
            self._asked_backend = "torch"
            return self._choose_backend("torch")
        self.log(f"OpenVINO not used ({reason}); running float32")
        self.precision, self._asked_backend = "fp32", "auto"
        return self._choose_backend("auto")

    def _replace_openvino(self, exc: BaseException) -> str:
        """:meth:`_openvino_failed` for a predictor in use: it stays (and the error stands) when
        OpenVINO was asked for by name, else it is dropped for the fall-back's."""
        predictor = self.onnx
        self.onnx = None
        try:
            return self._openvino_failed(exc)
        except R2UNetError:
            self.onnx = predictor
            raise

    # -- the network on one batch -------------------------------------------------------
    def _onnx_ready(self) -> bool:
        """Whether onnxruntime (or OpenVINO) runs this batch: its session (built in the background)
        is waited for; if it could not be built, auto falls back and says why."""
        if self.onnx is None or self.device.type != "cpu":
            return False
        try:
            self.onnx.session()
        except Exception as exc:
            if self.backend == "openvino":
                self.backend = self._replace_openvino(exc)
                return self._onnx_ready()
            if self._asked_backend == "onnxruntime":
                raise R2UNetError(f"the onnxruntime backend is not available ({exc}); use --backend torch") from exc
            self.log(f"onnxruntime not used ({exc}); running PyTorch")
            self.onnx, self.backend = None, "torch"
            return False
        return True

    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        if self.package is not None:
            if self._should_stop is not None and self._should_stop():
                raise CancelledError()
            return self.package.predict(batch)
        if self._onnx_ready():
            try:
                return self._predict_batch_onnx(batch)
            except (CancelledError, MemoryError):
                raise
            except Exception as exc:  # OpenVINO compiles each new shape here: auto falls back to float32
                if self.backend != "openvino":
                    raise
                self.backend = self._replace_openvino(exc)
                return self._predict_batch(batch)
        if self._should_stop is None or self.compile:  # compiled: Cancel between tiles (a hook would break the graph)
            if self._should_stop is not None and self._should_stop():
                raise CancelledError()
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
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        flips = FLIPS if self.tta else ((),)
        network = self._network()

        def probabilities(flip: tuple[int, ...]) -> torch.Tensor:
            if not flip:
                return logits_to_probabilities(network(x).float())
            return logits_to_probabilities(network(x.flip(flip)).float()).flip(flip)

        with torch.inference_mode(), autocast(self.device, self.precision):
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
        if self.precision == "amp":  # CUDA's mixed precision: the CPU runs float32, as before the fallback
            self.precision = "fp32"
        if self._model is not None:
            self._model = self._model.to(self.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _normalizer(self, chw: Any) -> Callable[[Any], np.ndarray]:
        """The raw image's statistics, measured once: a function from its raw tiles to network input."""
        config = self.checkpoint.preprocess
        if self.package is not None:
            return self.package.normalizer(chw, config.channels)
        stats = measure_stats(chw, config)
        return lambda band: normalize_tile(band, stats, config)

    def auto_tile(self, height: int, width: int) -> int:
        """The default largest tile: the whole (padded) image when it is small and memory allows, else AUTO_TILE."""
        if self.package is not None and self.package.fixed:
            return self.package.fixed  # the package's network takes only this size
        padded = padded_size(height, self.size_multiple), padded_size(width, self.size_multiple)
        if padded[0] * padded[1] <= AUTO_WHOLE_IMAGE_PIXELS:
            # on the CPU, where host memory is what the activations use, tile it when that is short
            free = available_memory() if self.device.type == "cpu" else None
            if free is None or ACTIVATION_BYTES_PER_PIXEL * padded[0] * padded[1] <= HEADROOM * free:
                return max(padded)
        return AUTO_TILE

    def tile_grid(self, height: int, width: int, tile: int | None = None, overlap: float | None = None) -> TileGrid:
        """The tiling ``predict`` uses for a ``height x width`` image: ``overlap`` is a fraction of
        the largest tile, or None for :func:`auto_overlap` pixels whatever the tile."""
        tile = tile or self.auto_tile(height, width)
        if overlap is None:  # 192 pixels of the largest tile the grid can use (clipped to the image, on the size multiple)
            m = self.size_multiple
            largest = max(m, min(tile, padded_size(max(height, width), m)) // m * m)
            return tile_grid(height, width, tile, m, overlap_px=auto_overlap(largest))
        return tile_grid(height, width, tile, self.size_multiple, overlap=overlap)

    def _check_input(self, chw: Any, tile: int | None) -> None:
        check_image(chw)
        config = self.checkpoint.preprocess
        channels = config.out_channels(chw.shape[0])
        if channels != self.in_channels:
            raise R2UNetError(
                f"the model takes {self.in_channels} channel(s) but this {chw.shape[0]}-channel image gives {channels} "
                f"with channels={config.channels!r}; use a model trained for this kind of image"
            )
        if tile is not None and tile < MIN_USER_TILE:
            raise R2UNetError(f"tile={tile} is too small; use {MIN_TILE} or more (or leave it to auto)")

    def _require_memory(self, chw: Any, tile: int, batch_size: int, whole_result: bool) -> None:
        k, (c, h, w) = self.checkpoint.config.out_channels, chw.shape
        # one band of tiles in flight, the network's activations (~900 bytes per tile pixel), and the result
        need = 4 * (c + k + 2) * min(tile, h) * w + ACTIVATION_BYTES_PER_PIXEL * min(tile, h) * min(tile, w) * batch_size
        if whole_result:
            need += 4 * k * h * w
        require_memory(need, f"segmenting a {h} x {w} image",
                       "close other programs, crop or downsample the image, or run it on a machine with more memory")

    def _after_out_of_memory(self, exc: BaseException, batch_size: int, tile: int) -> tuple[int, int]:
        """The next (batch size, tile) to try after the out-of-memory ``exc``; moves to the CPU as a last resort."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if batch_size > 1:
            batch_size //= 2
            self.log(f"out of memory: retrying with batch size {batch_size}")
        elif tile > MIN_TILE:
            tile = max(MIN_TILE, tile // 2)
            self.log(f"out of memory: retrying with {tile}-pixel tiles")
        else:
            self._retry_on_cpu(exc, f"batch 1 and {tile}-pixel tiles")
        return batch_size, tile

    def _retry_on_cpu(self, exc: BaseException, what: str) -> None:
        """The last out-of-memory resort: move to the CPU, or say what already ran out there."""
        if self.device.type == "cpu":
            raise R2UNetError(f"out of memory even with {what} on the CPU; close other programs or use a smaller image") from exc
        self._move_to_cpu()
        self.log("out of memory on the accelerator: retrying on the CPU")

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

        ``tile=None`` runs images up to AUTO_WHOLE_IMAGE_PIXELS whole and larger ones in tiles of
        at most AUTO_TILE pixels, evened out; ``overlap=None`` is AUTO_OVERLAP_PIXELS of whatever
        tile the run ends up using; ``out`` may be a :class:`~src_models.labels.LabelSink`;
        ``batch_size=None`` is 1 on the CPU (batching gains nothing there and costs memory), 4 on
        accelerators. A model whose card's geometry is ``resize`` ignores ``tile``, ``overlap``
        and ``batch_size`` (:meth:`_predict_resized`: one letterboxed input per image).
        """
        chw = to_chw(image, channel_axis)
        if self.geometry.kind == "resize":
            self._check_input(chw, None)
            return self._predict_resized(chw, progress, should_stop, out)
        factor, why = scale_factor(self.scale, self.checkpoint.model_card.scale, chw)
        if why and why != self._scale_note:  # said once while it stays the same (the slices of a stack)
            self.log(why)
            self._scale_note = why
        if factor != 1.0:
            return self._predict_rescaled(chw, factor, tile, overlap, batch_size, progress, should_stop, out)
        return self._predict_tiled(chw, tile, overlap, batch_size, progress, should_stop, out)

    def _predict_tiled(self, chw: Any, tile: int | None, overlap: float | None, batch_size: int | None,
                       progress: Progress | None, should_stop: ShouldStop | None, out: Any) -> Any:
        """The ``tiled`` geometry at the resolution of ``chw (C, H, W)`` -> ``(K, H, W)``."""
        batch_size = batch_size or (1 if self.device.type == "cpu" else 4)
        self._check_input(chw, tile)
        tile = tile or self.auto_tile(*chw.shape[1:])
        self._require_memory(chw, tile, batch_size, whole_result=out is None)
        transform = self._normalizer(chw)
        self._should_stop = should_stop  # polled inside a tile too (_predict_batch)
        try:
            while True:
                try:
                    return run_grid(
                        chw, self.tile_grid(*chw.shape[1:], tile, overlap), batch_size, self._predict_batch,
                        transform=transform,
                        progress=progress, should_stop=should_stop, out=out,
                    )
                except (RuntimeError, MemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    batch_size, tile = self._after_out_of_memory(exc, batch_size, tile)
        finally:
            self._should_stop = None

    def _predict_rescaled(self, chw: Any, factor: float, tile: int | None, overlap: float | None, batch_size: int | None,
                          progress: Progress | None, should_stop: ShouldStop | None, out: Any) -> Any:
        """``chw (C, H, W)`` resized by ``factor`` to the model's training scale, tiled there, and its
        probabilities ``(K, H, W)`` resized back to the original size (bilinear)."""
        (c, h, w), k = chw.shape, self.checkpoint.config.out_channels
        shape = resized_shape((h, w), factor)
        self._check_input(np.empty((c, *shape), dtype=np.uint8), tile)
        require_memory(4 * (2 * c + k) * h * w + 4 * (2 * c + 2 * k) * shape[0] * shape[1],
                       f"segmenting a {h} x {w} image resized x{factor:.2f}", "close other programs, or use --scale 1 (native resolution)")
        small = resize_planes(np.asarray(chw, dtype=np.float32), shape, order=1, anti_aliasing=factor < 1)
        probs = self._predict_tiled(small, tile, overlap, batch_size, progress, should_stop, None)
        del small
        result = np.clip(resize_planes(probs, (h, w), order=1, anti_aliasing=False), 0.0, 1.0)
        if out is None:
            return result
        out[:, 0:h] = result  # a LabelSink thresholds it as one band of rows
        return out

    def _predict_resized(self, chw: Any, progress: Progress | None, should_stop: ShouldStop | None, out: Any) -> Any:
        """The ``resize`` geometry: ``(C, H, W)`` -> ``(K, H, W)`` through ONE ``size x size`` input.

        The statistics are measured on the whole native image and applied to it (as training's
        ``make_sample``), the result is letterboxed to the card's size (as ``letterbox_sample``),
        edge-padded to the network's size multiple (what the network does itself, done here so
        that onnxruntime gets a shape it takes), run through :meth:`_predict_batch` (TTA, backend,
        Cancel inside the network) and resized back (:func:`~src_models.geometry.unletterbox`).
        """
        size, m = self.geometry.size, self.size_multiple
        assert size is not None
        k, (c, h, w) = self.checkpoint.config.out_channels, chw.shape
        side = padded_size(size, m)
        # the raw and normalised image (and skimage's float64 planes), the result, the network on one input
        require_memory(4 * (2 * c + k + 4) * h * w + (ACTIVATION_BYTES_PER_PIXEL + 4 * (c + k)) * side * side,
                       f"segmenting a {h} x {w} image", "close other programs, downsample the image, or use a machine with more memory")
        if progress is not None:
            progress(0.0)
        boxed, box = letterbox(self._normalizer(chw)(chw), size)
        batch = np.pad(boxed, ((0, 0), (0, side - size), (0, side - size)), mode="edge")[None]
        self._should_stop = should_stop  # polled inside the network too (_predict_batch)
        try:
            while True:
                if should_stop is not None and should_stop():
                    raise CancelledError()
                try:
                    probs = self._predict_batch(batch)[0, :, :size, :size]
                    break
                except (RuntimeError, MemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    self._retry_on_cpu(exc, f"one {size} x {size} input")
        finally:
            self._should_stop = None
        result = unletterbox(np.ascontiguousarray(probs), box)
        if out is None:
            out = result
        else:
            out[:, 0:h] = result  # a LabelSink thresholds it as one band of rows
        if progress is not None:
            progress(1.0)
        return out

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
        if kwargs.get("tile") is None and self.geometry.kind == "tiled":
            # decided once: every slice tiled alike, whatever memory does meanwhile
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
