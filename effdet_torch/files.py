"""Writing files without losing anything, and their fingerprints: the one implementation the whole
project uses.

``atomic_write`` writes into a hidden temporary in the target folder, fsyncs it, gives it the
permissions the umask allows (``0666 & ~umask``, as ``open`` would) and renames it onto the target,
so a crash or Ctrl+C leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["atomic_write", "atomic_write_many", "atomic_write_bytes", "atomic_write_text", "write_json", "sha256_file",
           "sha256_array"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a hidden ``.<name>.*.tmp`` beside ``path``, fsync, then rename onto ``path``.

    A failure or interrupt removes the temporary; a killed process leaves at most that hidden file.
    The folder is created when missing, and fsynced after the rename so the new name survives a power cut.
    """
    atomic_write_many([(path, write)])


def atomic_write_many(writes: Sequence[tuple[str | os.PathLike, Callable[[str], None]]],
                      before_rename: Callable[[], None] | None = None) -> None:
    """:func:`atomic_write` for files that belong together: every ``write(tmp)`` runs first, then
    ``before_rename()`` (e.g. removing a file the new set replaces), then the renames in the given
    order. A failure in any write leaves every target as it was."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        if before_rename is not None:
            before_rename()
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for folder in {path.parent for _, path in staged}:
        _fsync_dir(folder)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` into ``path`` through :func:`atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 ``text`` with ``\\n`` line ends into ``path`` through :func:`atomic_write`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """``obj`` as JSON (numpy scalars and arrays as JSON values) into ``path``, atomically, newline-terminated."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_array(arr: np.ndarray) -> str:
    """Hex sha256 of an array's little-endian, C-order bytes (the goldens' ``values_sha256`` rule)."""
    a = np.asarray(arr)
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()
