"""Read and write TensorFlow TensorBundle checkpoints without TensorFlow.

A TensorBundle checkpoint named by a *prefix* ``X`` is two (or more) files:

``X.index``
    A LevelDB-style SSTable (sorted string table) mapping tensor names to
    ``BundleEntryProto`` messages.  The empty key ``""`` holds a
    ``BundleHeaderProto`` (number of shards, endianness, version).
``X.data-SSSSS-of-NNNNN``
    The raw little-endian tensor bytes, one file per shard.  Each entry of the
    index says which shard, at which offset, how many bytes and the masked
    CRC32C of those bytes.

Everything here is plain Python + numpy: the SSTable blocks, the protobuf
wire format (a tiny hand-written varint codec) and the checksums
(``google_crc32c``).  Public API:

* :class:`TensorBundleReader` -- list / inspect / read tensors lazily.
* :func:`write_bundle` -- write a single-shard checkpoint atomically.
* :func:`resolve_prefix` -- turn a user-supplied path into a checkpoint prefix.
* :class:`CheckpointError` -- every format / integrity problem.
"""

from __future__ import annotations

import codecs
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import numpy as np

from effdet_torch.checkpoint import CheckpointError
from effdet_torch.files import atomic_write_many

__all__ = [
    "CheckpointError",
    "TensorBundleReader",
    "resolve_prefix",
    "write_bundle",
    "data_shard_path",
    "mask_crc",
    "unmask_crc",
]


# CheckpointError (a TensorBundle checkpoint is missing, truncated, corrupt or unsupported; the message
# names the file and, where relevant, the variable) is the model library's one checkpoint error.


# --------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB/TF checksum masking: rotate right by 15 bits, add a constant."""
    crc &= _U32
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask_crc(masked: int) -> int:
    """Inverse of :func:`mask_crc`."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def _crc32c(data: Any, crc: int = 0) -> int:
    """CRC32C of a read-only bytes-like object (bytes, read-only ndarray)."""
    return google_crc32c.extend(crc, data) if crc else google_crc32c.value(data)


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view


# --------------------------------------------------------------------------
# protobuf wire format (just what the bundle protos need)
# --------------------------------------------------------------------------

_WT_VARINT, _WT_FIXED64, _WT_LEN, _WT_FIXED32 = 0, 1, 2, 5


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:  # int32/int64 negatives are 10-byte two's complement
        value += 1 << 64
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode an unsigned varint at ``pos``; return (value, new_pos)."""
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _as_int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class _Malformed(Exception):
    """Internal: low-level parse failure, wrapped into CheckpointError."""


def _iter_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field_number, wire_type, value) for a serialized message.

    Varints come back as ints, fixed32/fixed64 as ints, length-delimited as
    bytes.
    """
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _get_varint(buf, pos, end)
        num, wt = tag >> 3, tag & 7
        if wt == _WT_VARINT:
            val, pos = _get_varint(buf, pos, end)
        elif wt == _WT_FIXED64:
            if pos + 8 > end:
                raise _Malformed("truncated fixed64")
            val = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wt == _WT_LEN:
            n, pos = _get_varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed("truncated length-delimited field")
            val = bytes(buf[pos : pos + n])
            pos += n
        elif wt == _WT_FIXED32:
            if pos + 4 > end:
                raise _Malformed("truncated fixed32")
            val = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise _Malformed(f"unsupported wire type {wt}")
        yield num, wt, val


def _tag(out: bytearray, num: int, wt: int) -> None:
    _put_varint(out, (num << 3) | wt)


def _put_len(out: bytearray, num: int, payload: bytes) -> None:
    _tag(out, num, _WT_LEN)
    _put_varint(out, len(payload))
    out += payload


# TensorFlow DataType enum values -> numpy dtypes (little-endian).
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8 = 1, 2, 3, 4, 5, 6
DT_STRING, DT_COMPLEX64, DT_INT64, DT_BOOL = 7, 8, 9, 10
DT_BFLOAT16, DT_UINT16, DT_COMPLEX128, DT_HALF = 14, 17, 18, 19
DT_RESOURCE, DT_VARIANT, DT_UINT32, DT_UINT64 = 20, 21, 22, 23

_NUMERIC: dict[int, np.dtype] = {
    DT_FLOAT: np.dtype("<f4"),
    DT_DOUBLE: np.dtype("<f8"),
    DT_HALF: np.dtype("<f2"),
    DT_INT8: np.dtype("i1"),
    DT_INT16: np.dtype("<i2"),
    DT_INT32: np.dtype("<i4"),
    DT_INT64: np.dtype("<i8"),
    DT_UINT8: np.dtype("u1"),
    DT_UINT16: np.dtype("<u2"),
    DT_UINT32: np.dtype("<u4"),
    DT_UINT64: np.dtype("<u8"),
    DT_BOOL: np.dtype("?"),
    DT_COMPLEX64: np.dtype("<c8"),
    DT_COMPLEX128: np.dtype("<c16"),
}
_DT_NAMES = {
    DT_FLOAT: "float32", DT_DOUBLE: "float64", DT_HALF: "float16",
    DT_BFLOAT16: "bfloat16", DT_INT8: "int8", DT_INT16: "int16",
    DT_INT32: "int32", DT_INT64: "int64", DT_UINT8: "uint8",
    DT_UINT16: "uint16", DT_UINT32: "uint32", DT_UINT64: "uint64",
    DT_BOOL: "bool", DT_COMPLEX64: "complex64", DT_COMPLEX128: "complex128",
    DT_STRING: "string", DT_RESOURCE: "resource", DT_VARIANT: "variant",
}  # fmt: skip


def _dt_name(dt: int) -> str:
    return _DT_NAMES.get(dt, f"DataType({dt})")


@dataclass
class BundleEntry:
    """Decoded ``BundleEntryProto`` (``crc32c`` is the stored *masked* value)."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    num_slices: int = 0
    unknown_rank: bool = False


@dataclass
class BundleHeader:
    """Decoded ``BundleHeaderProto``."""

    num_shards: int = 0
    endianness: int = 0  # 0 = LITTLE, 1 = BIG
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: list[int] = field(default_factory=list)


def _decode_shape(buf: bytes) -> tuple[tuple[int, ...], bool]:
    dims: list[int] = []
    unknown_rank = False
    for num, wt, val in _iter_fields(buf):
        if num == 2 and wt == _WT_LEN:  # Dim
            size = 0
            for dnum, dwt, dval in _iter_fields(val):
                if dnum == 1 and dwt == _WT_VARINT:
                    size = _as_int64(dval)
            dims.append(size)
        elif num == 3 and wt == _WT_VARINT:
            unknown_rank = bool(val)
    return tuple(dims), unknown_rank


def _decode_entry(buf: bytes) -> BundleEntry:
    e = BundleEntry()
    for num, wt, val in _iter_fields(buf):
        if num == 1 and wt == _WT_VARINT:
            e.dtype = val
        elif num == 2 and wt == _WT_LEN:
            e.shape, e.unknown_rank = _decode_shape(val)
        elif num == 3 and wt == _WT_VARINT:
            e.shard_id = _as_int64(val)
        elif num == 4 and wt == _WT_VARINT:
            e.offset = _as_int64(val)
        elif num == 5 and wt == _WT_VARINT:
            e.size = _as_int64(val)
        elif num == 6 and wt == _WT_FIXED32:
            e.crc32c = val
        elif num == 7 and wt == _WT_LEN:
            e.num_slices += 1
    return e


def _decode_header(buf: bytes) -> BundleHeader:
    h = BundleHeader()
    for num, wt, val in _iter_fields(buf):
        if num == 1 and wt == _WT_VARINT:
            h.num_shards = _as_int64(val)
        elif num == 2 and wt == _WT_VARINT:
            h.endianness = val
        elif num == 3 and wt == _WT_LEN:
            for vnum, vwt, vval in _iter_fields(val):
                if vnum == 1 and vwt == _WT_VARINT:
                    h.producer = _as_int64(vval)
                elif vnum == 2 and vwt == _WT_VARINT:
                    h.min_consumer = _as_int64(vval)
                elif vnum == 3 and vwt == _WT_VARINT:
                    h.bad_consumers.append(_as_int64(vval))
    return h


def _encode_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, masked_crc: int) -> bytes:
    out = bytearray()
    _tag(out, 1, _WT_VARINT)
    _put_varint(out, dtype)
    shp = bytearray()
    for d in shape:
        dim = bytearray()
        if d:
            _tag(dim, 1, _WT_VARINT)
            _put_varint(dim, d)
        _put_len(shp, 2, bytes(dim))
    _put_len(out, 2, bytes(shp))
    # shard_id (field 3) is always 0 here and proto3 omits zero scalars.
    if offset:
        _tag(out, 4, _WT_VARINT)
        _put_varint(out, offset)
    if size:
        _tag(out, 5, _WT_VARINT)
        _put_varint(out, size)
    if masked_crc:  # never 0 in practice: mask_crc(0) == 0xa282ead8
        _tag(out, 6, _WT_FIXED32)
        out += struct.pack("<I", masked_crc)
    return bytes(out)


def _encode_header(num_shards: int = 1, producer: int = 1) -> bytes:
    out = bytearray()
    _tag(out, 1, _WT_VARINT)
    _put_varint(out, num_shards)
    # endianness LITTLE == 0 is the proto3 default and therefore omitted.
    version = bytearray()
    _tag(version, 1, _WT_VARINT)
    _put_varint(version, producer)
    _put_len(out, 3, bytes(version))
    return bytes(out)


# --------------------------------------------------------------------------
# SSTable (LevelDB table format, as used by tensorflow/core/lib/io/table)
# --------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
_TRAILER_LEN = 5  # compression type byte + masked crc32c


def _parse_handle(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    off, pos = _get_varint(buf, pos, end)
    size, pos = _get_varint(buf, pos, end)
    return off, size, pos


def _read_block(path: Path, table: bytes, off: int, size: int, what: str) -> bytes:
    """Return the contents of the block at ``off`` after checking its trailer."""
    end = off + size + _TRAILER_LEN
    if end > len(table) - _FOOTER_LEN:
        raise CheckpointError(
            f"truncated index file {path}: {what} block [{off}, {end}) extends past the "
            f"table data ({len(table) - _FOOTER_LEN} bytes before the footer)"
        )
    contents = table[off : off + size]
    ctype = table[off + size]
    (stored,) = struct.unpack_from("<I", table, off + size + 1)
    actual = mask_crc(_crc32c(bytes([ctype]), _crc32c(contents)))
    if stored != actual:
        raise CheckpointError(
            f"corrupt index file {path}: checksum mismatch in {what} block at offset {off} "
            f"(stored {stored:#010x}, computed {actual:#010x})"
        )
    if ctype != 0:
        kind = {1: "snappy"}.get(ctype, f"type {ctype}")
        raise CheckpointError(
            f"unsupported index file {path}: {what} block at offset {off} is {kind}-compressed; "
            "only uncompressed SSTable blocks are supported"
        )
    return contents


def _iter_block(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) pairs of one SSTable block, in order."""
    n = len(block)
    if n < 4:
        raise _Malformed("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, n - 4)
    limit = n - 4 - 4 * num_restarts
    if limit < 0:
        raise _Malformed(f"restart array ({num_restarts} entries) larger than the block")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = _get_varint(block, pos, limit)
        non_shared, pos = _get_varint(block, pos, limit)
        vlen, pos = _get_varint(block, pos, limit)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise _Malformed("block entry overruns the block")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + vlen]
        pos += vlen


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """Read every (key, value) of the SSTable at ``path``."""
    try:
        table = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(_missing_index_msg(path)) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read index file {path}: {exc}") from exc
    if len(table) < _FOOTER_LEN:
        raise CheckpointError(
            f"truncated index file {path}: {len(table)} bytes, smaller than the "
            f"{_FOOTER_LEN}-byte SSTable footer; not a TensorBundle .index"
        )
    (magic,) = struct.unpack_from("<Q", table, len(table) - 8)
    if magic != _TABLE_MAGIC:
        raise CheckpointError(
            f"bad index file {path}: footer magic {magic:#018x} != {_TABLE_MAGIC:#018x}; "
            "not an SSTable / TensorBundle .index (truncated or a different file?)"
        )
    foot = len(table) - _FOOTER_LEN
    try:
        _, _, pos = _parse_handle(table, foot, foot + 40)  # metaindex (unused)
        idx_off, idx_size, _ = _parse_handle(table, pos, foot + 40)
        index_block = _read_block(path, table, idx_off, idx_size, "index")
        items: list[tuple[bytes, bytes]] = []
        for _, handle in _iter_block(index_block):
            off, size, _ = _parse_handle(handle, 0, len(handle))
            items.extend(_iter_block(_read_block(path, table, off, size, "data")))
    except _Malformed as exc:
        raise CheckpointError(f"corrupt index file {path}: {exc}") from None
    return items


class _BlockBuilder:
    """Builds one SSTable block with prefix-compressed keys and restarts."""

    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""
        self.num_entries = 0

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            lim = min(len(key), len(self.last_key))
            while shared < lim and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        _put_varint(self.buf, shared)
        _put_varint(self.buf, len(key) - shared)
        _put_varint(self.buf, len(value))
        self.buf += key[shared:]
        self.buf += value
        self.last_key = key
        self.counter += 1
        self.num_entries += 1

    def estimated_size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        out = self.buf + b"".join(struct.pack("<I", r) for r in self.restarts)
        out += struct.pack("<I", len(self.restarts))
        return bytes(out)


def _build_table(items: list[tuple[bytes, bytes]], block_size: int, restart_interval: int) -> bytes:
    """Serialize sorted (key, value) pairs as an uncompressed SSTable."""
    out = bytearray()

    def emit(contents: bytes) -> bytes:
        handle = bytearray()
        _put_varint(handle, len(out))
        _put_varint(handle, len(contents))
        out.extend(contents)
        out.append(0)  # no compression
        out.extend(struct.pack("<I", mask_crc(_crc32c(b"\x00", _crc32c(contents)))))
        return bytes(handle)

    data = _BlockBuilder(restart_interval)
    index = _BlockBuilder(1)
    for key, value in items:
        data.add(key, value)
        if data.estimated_size() >= block_size:
            # The block's last key is a valid separator: >= every key in this
            # block and < every key in the next one.
            index.add(data.last_key, emit(data.finish()))
            data.reset()
    if data.num_entries:
        index.add(data.last_key, emit(data.finish()))
    meta_handle = emit(_BlockBuilder(restart_interval).finish())
    index_handle = emit(index.finish())
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + struct.pack("<Q", _TABLE_MAGIC)
    out += footer
    return bytes(out)


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------

_DATA_RE = re.compile(r"\.data-\d{5}-of-\d{5}$")
_CKPT_LINE_RE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"\s*$', re.M)


def data_shard_path(prefix: str | os.PathLike, shard: int = 0, num_shards: int = 1) -> Path:
    """``<prefix>.data-SSSSS-of-NNNNN``."""
    p = Path(prefix)
    return p.with_name(f"{p.name}.data-{shard:05d}-of-{num_shards:05d}")


def _index_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".index")


def _missing_index_msg(index: Path) -> str:
    prefix = index.with_name(index.name[: -len(".index")])
    return (
        f"no such file: {index}; a TF checkpoint needs both {index} and "
        f"{data_shard_path(prefix)}"
    )


def resolve_prefix(path: str | os.PathLike) -> Path:
    """Turn a user-supplied checkpoint path into a TensorBundle prefix.

    Accepts a prefix (``dir/model``), the ``dir/model.index`` file, any
    ``dir/model.data-*`` shard, or a directory that contains either a TF
    ``checkpoint`` state file (its ``model_checkpoint_path`` is used,
    relative to the directory unless absolute) or exactly one ``*.index``
    file.  Plain prefixes are returned without checking that files exist;
    :class:`TensorBundleReader` reports missing files.
    """
    p = Path(path)
    if p.is_dir():
        state = p / "checkpoint"
        if state.is_file():
            text = state.read_text(encoding="utf-8", errors="replace")
            m = _CKPT_LINE_RE.search(text)
            if not m:
                raise CheckpointError(f"{state}: no model_checkpoint_path line in the checkpoint state file")
            target = codecs.escape_decode(m.group(1).encode("utf-8"))[0].decode("utf-8")
            tp = Path(target)
            return tp if tp.is_absolute() else p / tp
        indexes = sorted(p.glob("*.index"))
        if len(indexes) == 1:
            return _index_prefix(indexes[0])
        if not indexes:
            raise CheckpointError(f"{p}: directory has neither a 'checkpoint' state file nor any *.index file")
        names = ", ".join(i.name for i in indexes)
        raise CheckpointError(
            f"{p}: directory has no 'checkpoint' state file and {len(indexes)} *.index files "
            f"({names}); pass the prefix of the one you mean"
        )
    if p.name.endswith(".index"):
        return _index_prefix(p)
    m = _DATA_RE.search(p.name)
    if m:
        return p.with_name(p.name[: m.start()])
    return p


def _index_prefix(index: Path) -> Path:
    return index.with_name(index.name[: -len(".index")])


# --------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------


class TensorBundleReader:
    """Lazy reader for a TensorBundle checkpoint (``X.index`` + ``X.data-*``).

    Opening parses only the ``.index`` file; tensor bytes are read on demand
    with ``seek`` from the data shard(s).  Numeric tensors come back as
    native numpy arrays, except ``bfloat16``, which numpy lacks: it is
    returned widened to ``float32`` (exactly, by shifting the 16 bits into
    the high half of a float32).  ``DT_STRING`` tensors (such as
    ``_CHECKPOINTABLE_OBJECT_GRAPH`` in object-based checkpoints) come back as
    ``object`` arrays of ``bytes``.  Other dtypes (resource, variant) and
    partitioned (sliced) variables are listed but raise
    ``NotImplementedError`` when read.

    Usable as a context manager; :meth:`close` releases the shard files.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = resolve_prefix(prefix)
        self.index_path = _index_path(self.prefix)
        items = _read_table(self.index_path)
        if not items or items[0][0] != b"":
            raise CheckpointError(f"bad index file {self.index_path}: no bundle header entry (key \"\")")
        try:
            self.header = _decode_header(items[0][1])
        except _Malformed as exc:
            raise CheckpointError(f"corrupt index file {self.index_path}: bundle header: {exc}") from None
        if self.header.endianness != 0:
            raise CheckpointError(
                f"unsupported checkpoint {self.index_path}: written big-endian; only "
                "little-endian TensorBundles are supported"
            )
        if self.header.num_shards < 1:
            raise CheckpointError(f"bad index file {self.index_path}: num_shards = {self.header.num_shards}")
        self._entries: dict[str, BundleEntry] = {}
        for raw_key, value in items[1:]:
            if raw_key.startswith(b"\x00"):
                continue  # internal keys of partitioned variables' slices
            name = raw_key.decode("utf-8", "surrogateescape")
            try:
                entry = _decode_entry(value)
            except _Malformed as exc:
                raise CheckpointError(f"corrupt index file {self.index_path}: entry {name!r}: {exc}") from None
            if not 0 <= entry.shard_id < self.header.num_shards:
                raise CheckpointError(
                    f"bad index file {self.index_path}: variable {name!r} is in shard "
                    f"{entry.shard_id} but the bundle has {self.header.num_shards}"
                )
            self._entries[name] = entry
        self._keys = list(self._entries)  # already byte-wise sorted by the table
        self.data_paths = [
            data_shard_path(self.prefix, s, self.header.num_shards) for s in range(self.header.num_shards)
        ]
        for dp in self.data_paths:
            if not dp.is_file():
                raise CheckpointError(
                    f"missing data shard: no such file: {dp} (index {self.index_path} has "
                    f"{self.header.num_shards} shard(s))"
                )
        self._files: dict[int, BinaryIO] = {}

    # -- container protocol ------------------------------------------------
    def keys(self) -> list[str]:
        """Names of all tensors, sorted byte-wise (the order of the index)."""
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def items(self, verify: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, array)`` for every tensor, in key order."""
        for name in self._keys:
            yield name, self.read(name, verify=verify)

    def entry(self, name: str) -> BundleEntry:
        """The raw decoded ``BundleEntryProto`` of ``name``."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a variable of checkpoint {self.prefix}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``."""
        return self.entry(name).shape

    def tf_dtype_name(self, name: str) -> str:
        """TF dtype name of ``name`` (``"float32"``, ``"bfloat16"``, ``"string"``...)."""
        return _dt_name(self.entry(name).dtype)

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype that :meth:`read` returns for ``name``.

        ``bfloat16`` maps to ``float32`` and ``string`` to ``object``.
        """
        dt = self.entry(name).dtype
        if dt in _NUMERIC:
            return _NUMERIC[dt]
        if dt == DT_BFLOAT16:
            return np.dtype("<f4")
        if dt == DT_STRING:
            return np.dtype(object)
        raise NotImplementedError(
            f"variable {name!r} of checkpoint {self.prefix} has unsupported dtype {_dt_name(dt)}"
        )

    # -- reading -----------------------------------------------------------
    def _file(self, shard: int) -> BinaryIO:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.data_paths[shard], "rb")  # noqa: SIM115
        return f

    def read_bytes(self, name: str, verify: bool = True) -> bytes:
        """Raw bytes of ``name`` from its data shard (size and CRC checked)."""
        buf = self._read_raw(name, verify)
        return buf.tobytes()

    def _read_raw(self, name: str, verify: bool) -> np.ndarray:
        e = self.entry(name)
        path = self.data_paths[e.shard_id]
        f = self._file(e.shard_id)
        file_size = os.fstat(f.fileno()).st_size
        if e.offset < 0 or e.size < 0 or e.offset + e.size > file_size:
            raise CheckpointError(
                f"truncated data file {path}: variable {name!r} needs bytes "
                f"[{e.offset}, {e.offset + e.size}) ({e.size} bytes) but the file has only "
                f"{file_size} bytes"
            )
        buf = np.empty(e.size, dtype=np.uint8)
        f.seek(e.offset)
        got = f.readinto(memoryview(buf)) if e.size else 0
        if got != e.size:
            raise CheckpointError(
                f"truncated data file {path}: variable {name!r}: expected {e.size} bytes at "
                f"offset {e.offset}, read {got} (file size {file_size})"
            )
        if verify and e.dtype != DT_STRING:
            actual = _crc32c(_readonly(buf))
            if actual != unmask_crc(e.crc32c):
                raise CheckpointError(
                    f"checksum mismatch in data file {path} for variable {name!r}: stored crc32c "
                    f"{unmask_crc(e.crc32c):#010x}, computed {actual:#010x} over {e.size} bytes "
                    f"at offset {e.offset}"
                )
        return buf

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """Read tensor ``name`` as a numpy array (C order, native dtype).

        ``verify`` checks the masked CRC32C stored in the index against the
        bytes read.  ``bfloat16`` is returned as ``float32`` (exact
        widening); ``string`` as an ``object`` array of ``bytes``.
        """
        e = self.entry(name)
        if e.num_slices:
            raise NotImplementedError(
                f"variable {name!r} of checkpoint {self.prefix} is partitioned into "
                f"{e.num_slices} slices; sliced variables are not supported"
            )
        if e.dtype not in _NUMERIC and e.dtype not in (DT_BFLOAT16, DT_STRING):
            raise NotImplementedError(
                f"variable {name!r} of checkpoint {self.prefix} has unsupported dtype {_dt_name(e.dtype)}"
            )
        if e.unknown_rank or any(d < 0 for d in e.shape):
            raise CheckpointError(f"bad index file {self.index_path}: variable {name!r} has shape {e.shape}")
        buf = self._read_raw(name, verify)
        count = int(np.prod(e.shape, dtype=np.int64))
        if e.dtype == DT_STRING:
            return self._decode_strings(name, e, buf, count, verify)
        np_dt = _NUMERIC.get(e.dtype, np.dtype("<u2"))
        if e.size != count * np_dt.itemsize:
            raise CheckpointError(
                f"bad index file {self.index_path}: variable {name!r} ({_dt_name(e.dtype)}, "
                f"shape {e.shape}) should take {count * np_dt.itemsize} bytes, entry says {e.size}"
            )
        arr = buf.view(np_dt).reshape(e.shape)
        if e.dtype == DT_BFLOAT16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif not np_dt.isnative:
            arr = arr.astype(np_dt.newbyteorder("="))
        return arr

    def _decode_strings(self, name: str, e: BundleEntry, buf: np.ndarray, count: int, verify: bool) -> np.ndarray:
        # Layout: varint64 length of each element, masked crc32c (4 bytes) of
        # those lengths, then the concatenated element bytes.  The entry's
        # crc32c covers each length as a little-endian uint32 (uint64 when it
        # does not fit), the 4 checksum bytes, then the element bytes.
        raw = buf.tobytes()
        path = self.data_paths[e.shard_id]

        def bad(msg: str) -> CheckpointError:
            return CheckpointError(f"corrupt data file {path}: string variable {name!r}: {msg}")

        lengths = []
        pos = 0
        crc = 0
        try:
            for _ in range(count):
                n, pos = _get_varint(raw, pos, len(raw))
                lengths.append(n)
                crc = _crc32c(struct.pack("<I", n) if n <= _U32 else struct.pack("<Q", n), crc)
        except _Malformed:
            raise bad("truncated element lengths") from None
        if pos + 4 > len(raw):
            raise bad("truncated length checksum")
        (len_crc,) = struct.unpack_from("<I", raw, pos)
        if verify and count and len_crc != mask_crc(crc):
            raise bad("checksum mismatch in the element lengths")
        crc = _crc32c(raw[pos : pos + 4], crc)
        pos += 4
        total = sum(lengths)
        if pos + total != len(raw):
            raise bad(f"element lengths add up to {pos + total} bytes, entry says {len(raw)}")
        if verify:
            if total:
                crc = _crc32c(raw[pos:], crc)
            if crc != unmask_crc(e.crc32c):
                raise CheckpointError(
                    f"checksum mismatch in data file {path} for variable {name!r}: stored crc32c "
                    f"{unmask_crc(e.crc32c):#010x}, computed {crc:#010x}"
                )
        out = np.empty(count, dtype=object)
        for i, n in enumerate(lengths):
            out[i] = raw[pos : pos + n]
            pos += n
        return out.reshape(e.shape)

    # -- lifetime ----------------------------------------------------------
    def close(self) -> None:
        """Close any open data shard files."""
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> TensorBundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"TensorBundleReader({str(self.prefix)!r}, {len(self._keys)} tensors)"


# --------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------


def _to_tf(name: str, value: Any) -> tuple[int, tuple[int, ...], list[Any], int | None]:
    """Return (dtype enum, shape, byte chunks to write, entry crc) for one tensor.

    The entry crc is None when it is simply the CRC32C of the written bytes;
    string tensors checksum their lengths as fixed-width integers instead.
    """
    arr = np.asarray(value)
    shape = tuple(int(d) for d in arr.shape)
    kind = arr.dtype
    if kind.kind in "OSU":
        flat = arr.reshape(-1)
        elems = []
        for x in flat:
            if isinstance(x, str):
                x = x.encode("utf-8")
            elif isinstance(x, np.bytes_ | bytes | bytearray | memoryview):
                x = bytes(x)
            else:
                raise TypeError(f"tensor {name!r}: string tensors need bytes or str elements, got {type(x).__name__}")
            elems.append(x)
        lengths = bytearray()
        crc = 0
        for x in elems:
            _put_varint(lengths, len(x))
            crc = _crc32c(struct.pack("<I", len(x)) if len(x) <= _U32 else struct.pack("<Q", len(x)), crc)
        len_crc = struct.pack("<I", mask_crc(crc))
        crc = _crc32c(len_crc, crc)
        for x in elems:
            if x:
                crc = _crc32c(x, crc)
        return DT_STRING, shape, [bytes(lengths), len_crc, *elems], crc
    if kind.name == "bfloat16" and kind.itemsize == 2:  # ml_dtypes / TF bfloat16
        dt = DT_BFLOAT16
        le = np.ascontiguousarray(arr).view(np.uint16).astype("<u2", copy=False)
    else:
        dt = next((k for k, v in _NUMERIC.items() if v == kind.newbyteorder("<")), None)
        if dt is None:
            raise TypeError(f"tensor {name!r}: unsupported dtype {kind}")
        le = np.ascontiguousarray(arr, dtype=_NUMERIC[dt])
    return dt, shape, [_readonly(le.reshape(-1).view(np.uint8))], None


def write_bundle(
    prefix: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    block_size: int = 4096,
    restart_interval: int = 16,
) -> None:
    """Write ``tensors`` as a one-shard TensorBundle at ``prefix``.

    Produces ``<prefix>.index`` and ``<prefix>.data-00000-of-00001``,
    readable by ``tf.train.load_checkpoint(prefix)``.  Keys are stored
    byte-wise sorted, tensor bytes contiguous in key order, little-endian,
    C order.  Accepted values: numpy arrays (or anything ``np.asarray``
    takes) of float16/32/64, int8/16/32/64, uint8/16/32/64, bool,
    complex64/128, ``bfloat16`` (the ``ml_dtypes`` dtype) and string
    tensors (``bytes``/``str`` elements, stored as ``DT_STRING``).

    The write is atomic: both files are written under temporary names in the
    target directory, then moved into place with ``os.replace`` (an existing
    ``.index`` is removed first and the new one is moved last), so an
    interruption never leaves a half-written checkpoint under the final name.
    """
    prefix = Path(prefix)
    if not prefix.name:
        raise ValueError(f"checkpoint prefix {str(prefix)!r} has no file name part")
    if "" in tensors:
        raise ValueError('the empty tensor name "" is reserved for the bundle header')
    directory = prefix.parent
    directory.mkdir(parents=True, exist_ok=True)
    index_path = _index_path(prefix)
    data_path = data_shard_path(prefix)

    keyed = sorted(((str(k).encode("utf-8", "surrogateescape"), k) for k in tensors), key=lambda t: t[0])
    items: list[tuple[bytes, bytes]] = [(b"", _encode_header())]

    def write_data(tmp: str) -> None:
        offset = 0
        with open(tmp, "wb") as f:
            for raw_key, key in keyed:
                dt, shape, chunks, entry_crc = _to_tf(key, tensors[key])
                crc = 0
                size = 0
                for c in chunks:
                    f.write(c)
                    size += len(c)
                    if entry_crc is None and len(c):
                        crc = _crc32c(c, crc)
                if entry_crc is not None:
                    crc = entry_crc
                # TF stores the masked crc even of zero bytes (mask(0) != 0) and checks it.
                items.append((raw_key, _encode_entry(dt, shape, offset, size, mask_crc(crc))))
                offset += size

    def write_index(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(_build_table(items, block_size=block_size, restart_interval=restart_interval))

    # both files are staged first; the old index goes, then the data and last the new index are renamed
    # in: a reader never sees an index with other data, a failed write leaves the old checkpoint intact
    atomic_write_many([(data_path, write_data), (index_path, write_index)],
                      before_rename=lambda: index_path.unlink(missing_ok=True))
