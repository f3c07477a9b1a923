"""Torch-free file helpers: atomic writes (temp file + fsync + rename) and copies.

A file we write is either its old content or its complete new content, never half of each:
each write goes to a temporary file in the same folder, is flushed to disk, then renamed onto
the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import R2UNetError


def user_folder(kind: str, override_env: str) -> Path:
    """``$override_env`` if set, else this platform's per-user ``data`` or ``cache`` folder + napari-r2unet."""
    if os.environ.get(override_env):
        return Path(os.environ[override_env]).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / ("Caches" if kind == "cache" else "Application Support")
    else:
        xdg, default = ("XDG_CACHE_HOME", home / ".cache") if kind == "cache" else ("XDG_DATA_HOME", home / ".local" / "share")
        base = Path(os.environ.get(xdg) or default)
    return base / "napari-r2unet"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: changing the umask while other threads create files is a race


def _fsync(path: str | Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk; a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Any, suffix: str = "") -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; ``path`` is never half-written."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise R2UNetError(f"output folder {directory} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=directory)
    except OSError as exc:
        raise R2UNetError(f"cannot write in {directory}: {exc.strerror or exc}; check the folder's space and permissions") from exc
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
        _fsync(directory)  # makes the rename itself durable
    except OSError as exc:
        raise R2UNetError(f"cannot write {target}: {exc.strerror or exc}; check the folder's space and permissions") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Copy ``source`` to ``target`` atomically (``target`` is never half-written)."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), suffix=Path(target).suffix)
