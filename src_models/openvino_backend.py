"""bf16 inference on the CPU by OpenVINO: AMX / AVX-512 BF16 convolutions without compiling.

The same ONNX graph as the onnxruntime backend (:func:`src_models.export.cached_onnx`), run by
OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT = bf16``, except for the layers that see
the raw image's fine detail or write the logits: the first block's 1x1 conv and first recurrent
layer, and the head, stay float32 (OpenVINO's ``precise`` mark, set in the graph's IR). Measured
on the AMX Xeon with r2unet-drive, over the 20 DRIVE test images against float32: masks agree on
99.983 % of the FOV (all layers in bf16: 99.87 %, fails the 99.9 % rule), F1 0.8237 both. A
DRIVE image takes about 0.09 s per forward against 0.31-0.37 s for onnxruntime's float32, and a
new image shape compiles in about 0.13 s (PyTorch's ``torch.compile``: 10-30 s).

:class:`OpenVinoPredictor` is called like :class:`src_models.export.OnnxPredictor`; each input
shape compiles once (the last :data:`MAX_SHAPES` are kept); Cancel stops a run inside the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, in_background
from .errors import CancelledError, R2UNetError

MAX_SHAPES = 4  # compiled shapes kept (tiles share one; an image's last band may add another)
PRECISE = "precise"  # OpenVINO's rt_info attribute that keeps a layer out of the inference precision
MARKS_VERSION = 1  # bump when the marking changes: the cached IR's name carries it (and the prefixes)
SCRATCH_PREFIX = ".r2unet-ov-"  # the folder an IR is written in before it moves into the cache


def openvino_available() -> bool:
    """Whether OpenVINO is installed (it is not imported)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def precise_prefixes(arch: str, depth: int) -> tuple[str, ...]:
    """Names (prefixes, as the ONNX export names them) of the layers kept float32 under bf16.

    Recurrent networks: the first block's 1x1 conv and first recurrent layer, and the head (the
    second recurrent layer of the first block in bf16 cost nothing measurable in the masks: 99.983 %
    of the DRIVE test FOV against 99.984 % with the whole block float32, and 0.02 s less per
    image). Others: the whole first block and the head. One-level networks: everything."""
    if depth <= 1:
        return ("/",)
    if arch in ("runet", "r2unet", "resunet"):
        return ("/encoder.0/conv1x1/", "/encoder.0/r1/", "/head/")
    return ("/encoder.0/", "/head/")


def mark_precise(xml_text: str, prefixes: tuple[str, ...]) -> tuple[str, int]:
    """OpenVINO IR ``xml_text`` with the ``precise`` attribute on every layer whose name starts
    with one of ``prefixes`` (parameters, results and constants aside); returns the IR and how many
    layers were marked. OpenVINO's Python API cannot set that attribute: the IR can."""
    root = ET.fromstring(xml_text)
    marked = 0
    for layer in root.iter("layer"):
        if layer.get("type") in ("Parameter", "Result", "Const") or not (layer.get("name") or "").startswith(prefixes):
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.SubElement(layer, "rt_info")
        if not any(a.get("name") == PRECISE for a in rt_info.iter("attribute")):
            ET.SubElement(rt_info, "attribute", {"name": PRECISE, "version": "0"})
        marked += 1
    return ET.tostring(root, encoding="unicode"), marked


class OpenVinoPredictor:
    """Logits of a checkpoint's network computed by OpenVINO on the CPU in bf16 (float32 ends).

    ``prepare()`` reads and marks the graph in a background thread; ``session()`` waits for it
    (and raises what failed); calling it with a batch ``(N, C, H, W)`` float32 returns the logits.
    Every compiled shape is checked: a convolution meant to stay float32 that OpenVINO runs in
    bf16 (a version that dropped the mark) is an error, not a silent loss of accuracy."""

    def __init__(self, checkpoint: Checkpoint, precision: str = "bf16", threads: Callable[[], int] | None = None) -> None:
        if not openvino_available():  # (imported in the background thread: 0.09 s off the caller's path)
            raise R2UNetError("openvino is not installed; pip install openvino, or use --backend auto")
        if precision not in ("bf16", "fp32"):
            raise R2UNetError(f"OpenVINO runs bf16 or fp32, not {precision}")
        from .precision import cpu_has_native_bf16

        if precision == "bf16" and not cpu_has_native_bf16():  # OpenVINO would run float32 and call it bf16
            raise R2UNetError("OpenVINO's bf16 needs a CPU with AMX or AVX-512 BF16; use --backend torch (emulated) or --precision fp32")

        from .export import cached_onnx

        self.checkpoint = checkpoint
        self.path = cached_onnx(checkpoint)
        self.precision = precision
        self.prefixes = precise_prefixes(checkpoint.config.arch, checkpoint.config.depth) if precision == "bf16" else ()
        self._threads = threads or _torch_threads
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()
        self._model: Any = None
        self._error: BaseException | None = None
        self._pending: Callable[[], Any] | None = None  # the graph being read
        self._compiled: OrderedDict[tuple[tuple[int, ...], int], Any] = OrderedDict()

    def prepare(self) -> None:
        """Import OpenVINO and read the marked graph in a background thread (0.09 s and 0.04 s from
        the cache; the first time it is marked and written there, about 1 s)."""
        with self._lock:
            if self._model is not None or self._pending is not None or self._error is not None:
                return
            self._pending = in_background(self._read, name="r2unet-openvino-graph")

    def session(self) -> Any:
        """The marked graph (an ``openvino.Model`` of dynamic shape), read on first use."""
        self.prepare()
        with self._lock:
            if self._pending is not None:
                wait, self._pending = self._pending, None
                try:
                    self._model = wait()
                except BaseException as exc:  # kept: every later call raises it too
                    self._error = exc
            if self._error is not None:
                raise self._error
            return self._model

    @property
    def marked_path(self) -> Path:
        """The marked graph as OpenVINO IR (``.xml`` and ``.bin``), cached beside the ONNX graph
        (pruned with it) and named by OpenVINO's version."""
        import openvino as ov

        version = re.sub(r"[^A-Za-z0-9.]+", "_", ov.__version__.split("-")[0])
        marks = hashlib.sha256(f"{MARKS_VERSION}:{','.join(self.prefixes)}".encode()).hexdigest()[:8]  # what was marked
        return self.path.with_name(f"{self.path.stem}-ov{version}-bf16-{marks}.xml")

    def _read(self) -> Any:
        import openvino as ov

        core = ov.Core()
        if not self.prefixes:  # float32: nothing to mark
            return core.read_model(str(self.path))
        xml = self.marked_path
        weights = xml.with_suffix(".bin")
        if xml.is_file() and weights.is_file():
            with contextlib.suppress(Exception):  # unreadable (another version wrote it, a torn copy): made again
                model = core.read_model(str(xml), str(weights))
                for path in (xml, weights):
                    with contextlib.suppress(OSError):  # least recently used goes first when the folder is pruned
                        os.utime(path)
                return model
        _remove_abandoned(xml.parent)
        try:  # written beside the cache (an atomic rename), else in the temp folder (marked again next time)
            scratch = tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=xml.parent, ignore_cleanup_errors=True)
        except OSError:
            scratch = tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, ignore_cleanup_errors=True)
        with scratch as folder:
            tmp_xml, tmp_weights = Path(folder) / "model.xml", Path(folder) / "model.bin"
            ov.save_model(core.read_model(str(self.path)), str(tmp_xml), compress_to_fp16=False)
            text, marked = mark_precise(tmp_xml.read_text(encoding="utf-8"), self.prefixes)
            if not marked:
                raise R2UNetError(f"OpenVINO: no layer of {self.checkpoint.name} matches {self.prefixes}; run --precision fp32")
            tmp_xml.write_text(text, encoding="utf-8")
            try:  # moved into the cache before OpenVINO maps the weights (Windows cannot rename a mapped file)
                os.replace(tmp_weights, weights)  # weights first: an .xml names a complete pair
                os.replace(tmp_xml, xml)
            except OSError:  # a read-only cache: read from the scratch copy, marked again next time
                return core.read_model(str(tmp_xml), str(tmp_weights))
        return core.read_model(str(xml), str(weights))

    def _compiled_for(self, shape: tuple[int, ...]) -> Any:
        return self._compile(shape, self.session())

    def _compile(self, shape: tuple[int, ...], model: Any) -> Any:
        import openvino as ov

        threads = max(1, int(self._threads()))
        key = (shape, threads)
        with self._compile_lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
            shaped = model.clone()
            shaped.reshape({shaped.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
            compiled = ov.Core().compile_model(shaped, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"})
            if self.prefixes:
                self._check_precise(compiled)
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_SHAPES:
                self._compiled.popitem(last=False)
            return compiled

    def _check_precise(self, compiled: Any) -> None:
        """Raise unless every convolution of the float32 layers runs in float32."""
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" not in info or info["layerType"].astype(str) != "Convolution":
                continue
            names = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else [op.get_friendly_name()]
            if any(name.startswith(self.prefixes) for name in names) and info["runtimePrecision"].astype(str) != "f32":
                raise R2UNetError(f"OpenVINO ran {names[0]} in {info['runtimePrecision'].astype(str)}, not float32 "
                                  "(this OpenVINO ignores the mark that keeps it): run --precision fp32 or --backend torch")

    def __call__(self, batch: np.ndarray, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Logits of ``batch``; ``should_stop`` is polled every 50 ms and cancels the run."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if _stopping(should_stop):
            raise CancelledError()
        request = self._compiled_for(tuple(batch.shape)).create_infer_request()
        request.start_async({0: batch})
        while not request.wait_for(50):
            if _stopping(should_stop):
                request.cancel()
                with contextlib.suppress(Exception):  # a cancelled request ends its wait with an error
                    request.wait()
                raise CancelledError()
        return np.array(request.get_output_tensor(0).data, copy=True)


def _remove_abandoned(folder: Path, age_s: float = 3600.0) -> None:
    """Delete scratch folders that a killed process left in the cache (each a copy of the weights)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for path in folder.glob(f"{SCRATCH_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.is_dir() and now - path.stat().st_mtime > age_s:
                    shutil.rmtree(path, ignore_errors=True)


def _stopping(should_stop: Callable[[], bool] | None) -> bool:
    if should_stop is None:
        return False
    try:
        return bool(should_stop())
    except Exception:  # a broken callback must not leave a run that cannot be cancelled
        return True


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


__all__ = ["MAX_SHAPES", "OpenVinoPredictor", "mark_precise", "openvino_available", "precise_prefixes"]
