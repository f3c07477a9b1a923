"""Exported models: ONNX and TorchScript files, and the onnxruntime backend for CPU inference.

Why onnxruntime: on a CPU its fused convolution kernels run R2U-Net about 2x faster than eager
PyTorch at the same float32 results (max probability difference ~1e-6; measured by
``make bench``, see docs/BENCHMARKS.md). It is optional at run time: when it cannot be imported
or a model cannot be exported, inference falls back to PyTorch and says so once.

- :func:`export_onnx` / :func:`export_torchscript` write a checkpoint's network (logits, input
  ``(N, C, H, W)`` float32, any N/H/W that are multiples of ``config.size_multiple``; the tiler
  always feeds such tiles) atomically; :func:`export_checked` (``r2unet export``) also runs the
  written file and keeps it only if its logits match PyTorch's.
- :class:`OnnxPredictor` runs a checkpoint through onnxruntime; the exported graph is cached per
  checkpoint SHA-256 in the user cache folder (``$R2UNET_CACHE_DIR`` or the platform's), so the
  export (1-3 s) happens once per model. The folder keeps the most recently used graphs up to
  ``$R2UNET_CACHE_LIMIT_MB`` (default 2048 MB, about 40 models): fine-tuned versions each add one,
  and a clinician makes hundreds of versions over weeks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, in_background
from .errors import CancelledError, R2UNetError
from .fileio import atomic_write, user_folder

CACHE_ENV = "R2UNET_CACHE_DIR"
CACHE_LIMIT_ENV = "R2UNET_CACHE_LIMIT_MB"
CACHE_LIMIT_MB = 2048
OPSET = 17
# torch.onnx.export keeps global state: two exports at once in one process fail ("GLOBALS.in_onnx_export
# must be False"), e.g. the widget's warm-up of one model and the loading of another. One at a time.
_EXPORT_LOCK = threading.Lock()


def cache_dir() -> Path:
    return user_folder("cache", CACHE_ENV)


def _example(checkpoint: Checkpoint) -> torch.Tensor:
    size = 4 * checkpoint.config.size_multiple  # a multiple of the pooling grid: no padding is traced
    return torch.zeros(1, checkpoint.config.in_channels, size, size)


def export_onnx(checkpoint: Checkpoint, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None,
                example: torch.Tensor | None = None, output_name: str = "logits") -> Path:
    """Write the network (or ``module``, a wrapper of it) as ONNX (opset 17, dynamic
    batch/height/width), traced on ``example`` (default: zeros of a pooling-grid multiple);
    returns the path."""
    path = Path(path)
    model = checkpoint.build("cpu") if module is None else module
    x = _example(checkpoint) if example is None else example

    def write(tmp: str) -> None:
        with _EXPORT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about the (untraced) padding branch
            torch.onnx.export(model, (x,), tmp, input_names=["image"], output_names=[output_name],
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            output_name: {0: "batch", 2: "height", 3: "width"}},
                              opset_version=OPSET, dynamo=False)

    try:
        atomic_write(path, write, suffix=".onnx")
    except R2UNetError:
        raise
    except Exception as exc:
        raise R2UNetError(f"cannot export {checkpoint.name} to ONNX: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    return path


def export_torchscript(checkpoint: Checkpoint, path: str | os.PathLike[str], *, module: torch.nn.Module | None = None,
                       example: torch.Tensor | None = None) -> Path:
    """Write the network (or ``module``) as a traced TorchScript module (``torch.jit.load`` runs
    it without our code), traced on ``example`` as :func:`export_onnx`."""
    path = Path(path)
    model = checkpoint.build("cpu") if module is None else module
    x = _example(checkpoint) if example is None else example
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    atomic_write(path, lambda tmp: torch.jit.save(traced, tmp), suffix=".pt")
    return path


@functools.lru_cache(maxsize=1)
def cpu_key() -> str:
    """8 hex digits naming this CPU's instruction set (its feature flags) and kind."""
    import hashlib
    import platform

    from .precision import cpu_flags

    text = f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()} {' '.join(sorted(cpu_flags()))}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _network_code_digest() -> str:
    """8 hex digits of nets.py and this exporter: edited code (even at the same version) gets a fresh graph."""
    import hashlib

    from . import nets

    digest = hashlib.sha256()
    try:
        for source in (nets.__file__, __file__):
            digest.update(Path(source).read_bytes())
    except OSError:  # e.g. a zipped install: the version alone names the code
        return "code"
    return digest.hexdigest()[:8]


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only loses the ordering
        os.utime(path)


def cache_limit_bytes() -> int:
    text = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    try:
        megabytes = float(text) if text else CACHE_LIMIT_MB
    except ValueError:
        raise R2UNetError(f"{CACHE_LIMIT_ENV}={text!r} is not a number of megabytes; unset it or give e.g. 2048") from None
    return max(0, int(megabytes * 2**20))


def _export_key(path: Path) -> str:
    """The export a cached graph belongs to: its name up to the opset (an optimised copy adds the
    onnxruntime version and the CPU after it)."""
    match = re.match(r"(.*?-opset\d+)", path.name)
    return match.group(1) if match else path.stem


def prune_cache(folder: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete the least recently used exports (``*.onnx``; a graph, its optimised copies and its
    OpenVINO IR, ``.xml`` and ``.bin``, go as one, used when the latest of them was: modification time, which every use renews) until the
    folder holds at most :func:`cache_limit_bytes`; ``keep``'s exports are never deleted. Returns
    what was deleted; a file another process removed or holds is skipped."""
    groups: dict[str, list[tuple[float, int, Path]]] = {}
    for path in (p for pattern in ("*.onnx", "*.xml", "*.bin") for p in folder.glob(pattern)):
        if path.name.startswith("."):  # another process's export being written (atomic_write's temp file)
            continue
        with contextlib.suppress(OSError):
            stat = path.stat()
            groups.setdefault(_export_key(path), []).append((stat.st_mtime, stat.st_size, path))
    total = sum(size for files in groups.values() for _, size, _ in files)
    limit, kept = cache_limit_bytes(), {_export_key(k) for k in keep}
    deleted = []
    for key, files in sorted(groups.items(), key=lambda g: max(m for m, _, _ in g[1])):
        if total <= limit:
            break
        if key in kept:
            continue
        for _, size, path in sorted(files):
            try:
                path.unlink()
            except FileNotFoundError:  # another process pruned it first: the space is free all the same
                total -= size
                continue
            except OSError:
                continue
            total -= size
            deleted.append(path)
    return deleted


def cached_onnx(checkpoint: Checkpoint) -> Path:
    """The checkpoint's network as ONNX in the cache folder, exported on first use: the graph the
    onnxruntime and OpenVINO backends read. Named by the weights, our network code and the exporter."""
    folder = cache_dir() / "onnx"
    from . import __version__

    stamp = re.sub(r"[^A-Za-z0-9.]+", "_", f"{__version__}-{_network_code_digest()}-torch{torch.__version__}")
    path = folder / f"{checkpoint.sha256[:32]}-{stamp}-opset{OPSET}.onnx"
    if not path.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise R2UNetError(f"cannot create the cache folder {folder}: {exc.strerror or exc}; set {CACHE_ENV}") from exc
        export_onnx(checkpoint, path)
        for stale in folder.glob(f"{checkpoint.sha256[:32]}-*"):  # graphs (and their IR) of older code for these weights
            if stale != path and stale.suffix in (".onnx", ".xml", ".bin"):
                with contextlib.suppress(OSError):
                    stale.unlink()
    else:
        _touch(path)  # least recently used goes first when the folder is pruned
    try:
        prune_cache(folder, keep=(path,))
    except R2UNetError as exc:  # housekeeping must not turn the backend off (a bad $R2UNET_CACHE_LIMIT_MB)
        warnings.warn(f"cache not pruned: {exc}", stacklevel=2)
    return path


def session_options(threads: int) -> Any:
    """The onnxruntime options every session that segments shares: ``threads`` intra-op threads
    (the caller's budget: the napari widget leaves a core to the GUI) and workers that sleep when
    a run ends instead of spinning. Spinning held a core that what follows a run needed: the
    sigmoid after a DRIVE image waited 2.6-8.4 ms for its thread, 0.6-1.1 ms without, and the runs
    took as long either way (4 alternating processes each, 2 cores, 2026-12-08)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxPredictor:
    """Logits of a checkpoint's network computed by onnxruntime on the CPU."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        import onnxruntime  # noqa: F401 (fail here, not at the first tile)

        self.checkpoint = checkpoint
        self.path = cached_onnx(checkpoint)
        self._session: Any = None
        self._threads = 0
        self._pending: tuple[Callable[[], Any], int] | None = None  # the session being built, and its threads
        self._lock = threading.Lock()  # session() may be called from two threads (the widget's warm-up and a Segment)

    @property
    def optimized_path(self) -> Path:
        """The graph as onnxruntime optimised it for this CPU (its NCHWc layout depends on the ISA):
        a fresh process loads it in about a third of the time the optimisation takes."""
        import onnxruntime as ort

        return self.path.with_name(f"{self.path.stem}-ort{ort.__version__}-{cpu_key()}.opt.onnx")

    def prepare(self) -> None:
        """Start building the session in a background thread (onnxruntime releases the GIL while
        it loads): the caller reads and preprocesses its image meanwhile. :meth:`session` waits."""
        with self._lock:
            if self._session is not None or self._pending is not None:
                return
            threads = torch.get_num_threads()
            self._pending = (in_background(self._new_session, threads, name="r2unet-onnx-session"), threads)

    def session(self) -> Any:
        threads = torch.get_num_threads()  # follow the thread budget the caller gave torch
        with self._lock:
            if self._pending is not None:
                (wait, built_threads), self._pending = self._pending, None
                self._session, self._threads = wait(), built_threads  # raises what failed, in the caller's thread
            if self._session is None or threads != self._threads:
                self._session, self._threads = self._new_session(threads), threads
            return self._session

    def _new_session(self, threads: int) -> Any:
        import onnxruntime as ort

        def options(level: Any, save: Path | None = None) -> Any:
            opts = session_options(threads)
            opts.graph_optimization_level = level
            opts.enable_mem_pattern = False  # with the arena below: peak memory of a 1024^2 tile 0.9 GB instead of 1.3, same speed
            opts.log_severity_level = 3  # not the warning that an optimised graph is for this CPU only: its name says so
            if save is not None:
                opts.optimized_model_filepath = str(save)
            return opts

        providers = [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
        optimized = self.optimized_path
        if optimized.is_file():
            _touch(optimized)
            try:
                return ort.InferenceSession(str(optimized), options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), providers=providers)
            except Exception:  # a corrupt or foreign file: optimise again below
                with contextlib.suppress(OSError):
                    optimized.unlink()
        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        tmp = optimized.with_name(f".{optimized.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        for attempt in (1, 2):
            try:
                session = self._save_optimized(ort, options, level, tmp, optimized, providers)
            except Exception as exc:  # the exported graph is corrupt: export it again (replacing it atomically), once
                if attempt == 2:
                    raise R2UNetError(f"onnxruntime cannot run {self.checkpoint.name}: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
                export_onnx(self.checkpoint, self.path)
                continue
            return session
        raise AssertionError("unreachable")

    def _save_optimized(self, ort: Any, options: Callable[..., Any], level: Any, tmp: Path, optimized: Path, providers: list) -> Any:
        """A session of the exported graph that also writes the optimised graph to the cache; where
        it cannot be written (a read-only or full cache folder) the session alone, which only costs
        start-up time. An error from the graph itself is raised."""
        try:
            session = ort.InferenceSession(str(self.path), options(level, tmp), providers=providers)
        except Exception:
            with contextlib.suppress(OSError):
                tmp.unlink()
            session = ort.InferenceSession(str(self.path), options(level), providers=providers)  # raises if the graph is bad
            return session
        try:
            os.replace(tmp, optimized)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return session

    def __call__(self, batch: np.ndarray, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Logits of ``batch``; with ``should_stop``, a watcher thread polls it every 50 ms and
        aborts the run inside the network (onnxruntime's ``RunOptions.terminate``): Cancel on a
        single large tile then takes a fraction of a second, not the whole tile."""
        feed = {"image": np.ascontiguousarray(batch, dtype=np.float32)}
        session = self.session()
        if should_stop is None:
            return session.run(None, feed)[0]
        import onnxruntime as ort

        options, finished = ort.RunOptions(), threading.Event()

        def watch() -> None:
            while not finished.wait(0.05):
                try:
                    stop = should_stop()
                except Exception:  # a broken callback must not leave a run that cannot be cancelled
                    stop = True
                if stop:
                    options.terminate = True
                    return

        watcher = threading.Thread(target=watch, name="r2unet-cancel-watch", daemon=True)
        watcher.start()
        try:
            return session.run(None, feed, options)[0]
        except Exception:
            if options.terminate:
                raise CancelledError() from None
            raise
        finally:
            finished.set()
            watcher.join()


EXPORT_FORMATS = ("onnx", "torchscript")
# An export is the same float32 graph run by another engine: only the summation order of its
# kernels differs. Logits of the checked net are O(1-10) after ~10^3-10^4-term reductions, so
# float32 rounding moves them by ~1e-5 at most; 1e-3 leaves two orders of margin for any CPU and
# still catches a wrong graph (a missing layer or a different padding moves logits by >= 1e-1).
EXPORT_TOLERANCE = 1e-3


def _run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.inference_mode():
        return torch.jit.load(str(path))(x).numpy()


def _check_target(checkpoint: Checkpoint, out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise R2UNetError(f"{out} already exists; pass --overwrite to replace it")
    if checkpoint.path is not None and out.resolve() == checkpoint.path.resolve():
        raise R2UNetError(f"{out} is the model itself; choose another output file")
    if not out.parent.is_dir():
        raise R2UNetError(f"output folder {out.parent} does not exist; create it first")


def export_checked(checkpoint: Checkpoint, out: str | os.PathLike[str], fmt: str = "onnx", overwrite: bool = False) -> float:
    """Export ``checkpoint`` as ``fmt`` (onnx | torchscript) to ``out``, kept only if the exported
    model's logits match PyTorch's on a random batch to :data:`EXPORT_TOLERANCE`; returns the
    max |logit difference|. The export goes to a temporary file beside ``out`` first, so ``out``
    is never left half-written or unchecked.
    """
    import tempfile

    if fmt not in EXPORT_FORMATS:
        raise R2UNetError(f"export format {fmt!r} must be one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out).expanduser()
    _check_target(checkpoint, out, overwrite)
    m = checkpoint.config.size_multiple
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, checkpoint.config.in_channels, 3 * m, 5 * m)).astype(np.float32))
    with torch.inference_mode():
        reference = checkpoint.build("cpu")(x).numpy()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".check", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == "onnx":
            import onnxruntime  # noqa: F401 (without it the export cannot be checked: fail before writing)
        (export_onnx if fmt == "onnx" else export_torchscript)(checkpoint, tmp)
        difference = float(np.abs(_run_exported(tmp, fmt, x) - reference).max())
        if not difference < EXPORT_TOLERANCE:
            raise R2UNetError(f"the exported model differs from PyTorch by {difference:.2g}; not written")
        os.replace(tmp, out)
    except ImportError as exc:
        raise R2UNetError(f"ONNX export needs onnxruntime to check the result ({exc}); pip install onnxruntime onnx") from exc
    except (R2UNetError, OSError):
        raise
    except Exception as exc:  # onnxruntime / TorchScript errors are not ours: say which step failed
        raise R2UNetError(f"the exported {fmt} model could not be checked: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return difference
