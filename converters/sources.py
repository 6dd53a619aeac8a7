"""Official checkpoint sources: TF1 TensorBundle (dir / prefix / release tarball) and Keras ``.h5``.

Both expose ``keys()``, ``shape(name)`` and ``read(name)`` with official variable names (no ``:0``).
Neither needs TensorFlow.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from .tensorbundle import CheckpointError, TensorBundleReader, resolve_prefix

__all__ = ["CheckpointError", "CheckpointSource", "H5Source", "TF1Source", "open_checkpoint", "safe_extract"]

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class CheckpointSource:
    """Read-only view of an official checkpoint."""

    kind: str = ""
    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self._keyset

    @property
    def _keyset(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TF1Source(CheckpointSource):
    """A name-based TF1 checkpoint (``<prefix>.index`` + ``<prefix>.data-*``).

    Opened from a release tarball (``archive``), it reads the copy extracted to ``cleanup`` and its
    errors name the file inside the archive (``efficientdet-d0.tar.gz:efficientdet-d0/model.index``),
    not the temporary copy that is gone once the error is reported.
    """

    kind = "tf1"

    def __init__(self, path: str | os.PathLike, cleanup: Path | None = None, archive: Path | None = None) -> None:
        self._cleanup, self._archive = cleanup, archive
        with self._naming_the_archive():
            self.prefix = resolve_prefix(path)
            self.path = Path(path)
            self._reader = TensorBundleReader(self.prefix)
            if "_CHECKPOINTABLE_OBJECT_GRAPH" in self._reader:
                raise CheckpointError(
                    f"{self.prefix}: an object-based (TF2 tf.train.Checkpoint) checkpoint; the official "
                    "release files are name-based TF1 checkpoints or Keras .h5 files"
                )

    @contextlib.contextmanager
    def _naming_the_archive(self) -> Iterator[None]:
        try:
            yield
        except CheckpointError as e:
            if self._archive is None or self._cleanup is None:
                raise
            raise type(e)(str(e).replace(f"{self._cleanup}{os.sep}", f"{self._archive}:")) from None

    def keys(self) -> list[str]:
        return self._reader.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        with self._naming_the_archive():
            return tuple(self._reader.shape(name))

    def read(self, name: str) -> np.ndarray:
        with self._naming_the_archive():
            return self._reader.read(name)

    def close(self) -> None:
        self._reader.close()
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None


#: what h5py raises on a damaged object header, heap, attribute or dataset (found by flipping bits)
_H5_DAMAGE = (KeyError, OSError, ValueError, RuntimeError, TypeError)


class H5Source(CheckpointSource):
    """A Keras ``save_weights`` ``.h5``: ``/<layer>/<weight name incl. ':0'>`` datasets.

    Read by name through each layer group's ``weight_names`` attribute (split into
    ``weight_names0..N`` when it exceeds HDF5's 64 KB attribute limit); h5 order is not forward order.
    """

    kind = "h5"

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise CheckpointError(f"{self.path}: not a readable HDF5 file ({e})") from None
        try:
            self._datasets = self._index()
        except CheckpointError:
            self._f.close()
            raise
        except _H5_DAMAGE as e:
            # h5py reports a damaged object header, heap or attribute (a flipped byte in the file's
            # structure) as KeyError/OSError/...; HDF5 keeps no checksums of its own to say more
            self._f.close()
            raise CheckpointError(f"{self.path}: damaged HDF5 structure ({type(e).__name__}: {e}); "
                                  "is the file corrupt or truncated?") from None

    def _index(self) -> dict[str, object]:
        """``{weight name without ':0': dataset}`` from ``layer_names`` and each layer's ``weight_names``."""
        root = self._f["model_weights"] if "model_weights" in self._f else self._f
        if "layer_names" not in root.attrs:
            raise CheckpointError(f"{self.path}: not a Keras weights file (no 'layer_names' attribute)")
        datasets: dict[str, object] = {}
        for layer in _decode_names(root.attrs["layer_names"]):
            if layer not in root:
                raise CheckpointError(f"{self.path}: layer_names lists {layer!r}, which the file lacks")
            group = root[layer]
            for wname in _weight_names(group):
                name = wname[:-2] if wname.endswith(":0") else wname
                if name in datasets:
                    raise CheckpointError(f"{self.path}: weight {name!r} appears twice")
                if wname not in group:
                    raise CheckpointError(f"{self.path}: layer {layer!r} lists weight {wname!r}, which it lacks")
                datasets[name] = group[wname]
        return datasets

    def keys(self) -> list[str]:
        return sorted(self._datasets)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._datasets[name].shape)

    def read(self, name: str) -> np.ndarray:
        if name not in self._datasets:
            raise CheckpointError(f"{self.path}: no weight {name!r}")
        try:
            return np.asarray(self._datasets[name][()])
        except _H5_DAMAGE as e:  # a damaged dataset header or data (h5py: OSError, TypeError, ValueError, ...)
            raise CheckpointError(f"{self.path}: cannot read {name!r} ({type(e).__name__}: {e}); "
                                  "is the file corrupt or truncated?") from None

    def close(self) -> None:
        self._f.close()


def _decode_names(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _weight_names(group) -> list[str]:
    attrs = group.attrs
    if "weight_names" in attrs:
        return _decode_names(attrs["weight_names"])
    names, i = [], 0
    while f"weight_names{i}" in attrs:  # tf_keras splits long attributes into chunks
        names += _decode_names(attrs[f"weight_names{i}"])
        i += 1
    return names


#: what tarfile and its decompressors raise on a truncated or damaged archive (EOFError: a gzip/bz2
#: stream that ends early; zlib.error: damaged deflate data; gzip.BadGzipFile is an OSError)
_TAR_DAMAGE = (tarfile.TarError, OSError, EOFError, zlib.error)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tarball, refusing members that escape ``dest`` (``..``, absolute paths, links
    pointing outside, devices). Raises :class:`CheckpointError` naming the member."""
    dest = Path(dest).resolve()
    try:
        tar = tarfile.open(archive, "r:*")
    except _TAR_DAMAGE as e:
        raise CheckpointError(f"{archive}: not a readable tar archive ({e})") from None
    with tar:
        try:  # reads the whole archive: a truncated or damaged stream shows here
            members = tar.getmembers()
        except _TAR_DAMAGE as e:
            raise CheckpointError(f"{archive}: cannot read the archive ({type(e).__name__}: {e}); "
                                  "is it truncated or corrupt?") from None
        for m in members:
            target = (dest / m.name).resolve()
            if not target.is_relative_to(dest):
                raise CheckpointError(f"{archive}: refusing member {m.name!r}: it escapes the extraction folder")
            if m.issym() or m.islnk():
                link = (target.parent / m.linkname) if m.issym() else (dest / m.linkname)
                if os.path.isabs(m.linkname) or not link.resolve().is_relative_to(dest):
                    raise CheckpointError(f"{archive}: refusing link {m.name!r} -> {m.linkname!r}: it points outside")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise CheckpointError(f"{archive}: refusing special member {m.name!r}")
        try:
            tar.extractall(dest, members=members, filter="data")
        except _TAR_DAMAGE as e:
            raise CheckpointError(f"{archive}: extraction failed ({type(e).__name__}: {e}); "
                                  "is the archive truncated or corrupt?") from None


def _find_checkpoint_dir(root: Path, archive: Path) -> Path:
    candidates = sorted({p.parent for p in root.rglob("*.index")})
    if len(candidates) != 1:
        raise CheckpointError(f"{archive}: expected one checkpoint (*.index) in the archive, found {len(candidates)}")
    return candidates[0]


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Open any official checkpoint: ``.h5``, a TF1 directory / prefix / ``.index``, or a release
    tarball (``.tar.gz``/``.tgz``/``.tar``, extracted safely to a temporary folder)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".h5", ".hdf5", ".keras")):
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
        return H5Source(p)
    if name.endswith(TAR_SUFFIXES):
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
        tmp = Path(tempfile.mkdtemp(prefix="effdet-ckpt-"))
        try:
            safe_extract(p, tmp)
            return TF1Source(_find_checkpoint_dir(tmp, p), cleanup=tmp, archive=p)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not p.exists() and not Path(str(p) + ".index").exists() and not p.parent.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return TF1Source(p)


def iter_keys(source: CheckpointSource) -> Iterator[str]:
    yield from source.keys()


RELEASE_SUFFIXES = ("", ".tar.gz", ".tgz", ".tar", ".h5")


def find_release_file(variant: str, where: str | os.PathLike) -> Path | None:
    """The official checkpoint of ``variant`` in ``where``, named as the release files: a folder
    ``efficientdet-d0/`` holding a ``*.index`` (the folder that holds it is returned),
    ``efficientdet-d0.tar.gz`` / ``.tgz`` / ``.tar`` or ``efficientdet-d0.h5``; None when absent."""
    root = Path(where)
    for suf in RELEASE_SUFFIXES:
        p = root / f"{variant}{suf}"
        if suf == "" and p.is_dir() and any(p.rglob("*.index")):
            return p if any(p.glob("*.index")) or (p / "checkpoint").is_file() else next(p.rglob("*.index")).parent
        if suf and p.is_file():
            return p
    return None
