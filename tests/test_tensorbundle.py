"""Tests for converters.tensorbundle: TF TensorBundle checkpoints without TensorFlow."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
from converters import tensorbundle as tb

from converters.tensorbundle import (  # noqa: E402
    CheckpointError,
    TensorBundleReader,
    resolve_prefix,
    write_bundle,
)

GOLDEN_CKPT = REPO.parent / "shared/golden/efficientdet-d0/ckpt"
needs_golden = pytest.mark.skipif(
    not (GOLDEN_CKPT / "model.index").is_file(),
    reason=f"golden checkpoint not present: {GOLDEN_CKPT / 'model.index'}",
)


def _tf():
    return pytest.importorskip("tensorflow", exc_type=ImportError)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (so NaN payloads and -0.0 count)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "O" or b.dtype.kind == "O":
        return a.shape == b.shape and a.astype(object).tolist() == b.astype(object).tolist()
    return (
        a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
        and a.shape == b.shape
        and a.astype(a.dtype.newbyteorder("<")).tobytes() == b.astype(b.dtype.newbyteorder("<")).tobytes()
    )


def _small(tmp_path: Path, name: str = "ck") -> tuple[Path, dict[str, np.ndarray]]:
    tensors = {
        "a/kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "b/bias": np.linspace(-1, 1, 10),
        "c/step": np.int64(42),
    }
    prefix = tmp_path / name
    write_bundle(prefix, tensors)
    return prefix, tensors


# --------------------------------------------------------------------------
# round trips (no TF)
# --------------------------------------------------------------------------

_DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "bool",
           "uint16", "uint32", "uint64", "complex64", "complex128"]  # fmt: skip


def _sample(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        a = rng.standard_normal(shape).astype(dt)
        if a.size >= 4:
            a.flat[:4] = [np.nan, np.inf, -np.inf, -0.0]
        return a
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dt)
    a = rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    if a.size >= 2:
        a.flat[:2] = [info.min, info.max]
    return a


@pytest.mark.parametrize("dtype", _DTYPES)
def test_roundtrip_dtypes(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "scalar": _sample(dtype, (), rng),
        "vector": _sample(dtype, (7,), rng),
        "empty": _sample(dtype, (0,), rng),
        "empty_2d": _sample(dtype, (3, 0), rng),
        "conv/kernel": _sample(dtype, (3, 3, 8, 16), rng),
        "big_endian": _sample(dtype, (5,), rng).astype(np.dtype(dtype).newbyteorder(">")),
        "fortran": np.asfortranarray(_sample(dtype, (4, 5), rng)),
    }
    write_bundle(tmp_path / "m", tensors)
    with TensorBundleReader(tmp_path / "m") as r:
        assert r.keys() == sorted(tensors)
        for name, want in tensors.items():
            got = r.read(name)
            assert r.shape(name) == want.shape
            assert r.dtype(name) == want.dtype.newbyteorder("<")
            assert got.dtype.isnative and got.flags.c_contiguous and got.flags.writeable
            assert _same(got, want), name
    # data is contiguous: the shard is exactly the sum of the tensor sizes
    assert (tmp_path / "m.data-00000-of-00001").stat().st_size == sum(t.nbytes for t in tensors.values())


def test_roundtrip_bfloat16(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    vals = np.array([1.5, -3.0, 1e30, np.inf, np.nan, 0.0078125], dtype=ml_dtypes.bfloat16).reshape(2, 3)
    write_bundle(tmp_path / "m", {"w": vals, "s": vals[0, 0]})
    r = TensorBundleReader(tmp_path / "m")
    assert r.tf_dtype_name("w") == "bfloat16"
    assert r.dtype("w") == np.float32
    got = r.read("w")
    assert got.dtype == np.float32 and got.shape == (2, 3)
    assert got.tobytes() == vals.astype(np.float32).tobytes()  # widening is exact
    assert r.read("s").shape == ()


def test_bfloat16_widening_bits(tmp_path: Path) -> None:
    """Hand-built DT_BFLOAT16 entry: read() shifts the 16 bits into float32."""
    bits = np.array([0x3FC0, 0xC040, 0x7F80, 0x0001], dtype="<u2")  # 1.5, -3, inf, denormal
    _write_raw_bundle(tmp_path / "m", [("x", tb.DT_BFLOAT16, (4,), bits.tobytes())])
    got = TensorBundleReader(tmp_path / "m").read("x")
    assert got.tobytes() == (bits.astype(np.uint32) << 16).astype("<u4").tobytes()
    assert got[:3].tolist() == [1.5, -3.0, np.inf]


def test_roundtrip_strings(tmp_path: Path) -> None:
    tensors = {
        "graph": np.array(b"\x00\x01binary\xff" * 50, dtype=object),
        "names": np.array([b"a", b"", b"xyz" * 100], dtype=object),
        "fixed": np.array([[b"ab", b"c"]]),  # numpy 'S' dtype
        "unicode": np.array(["ünï", "x"]),
        "none": np.array([], dtype=object),
    }
    write_bundle(tmp_path / "m", tensors)
    r = TensorBundleReader(tmp_path / "m")
    assert r.tf_dtype_name("graph") == "string"
    assert r.dtype("graph") == np.dtype(object)
    assert r.read("graph").shape == () and r.read("graph").item() == b"\x00\x01binary\xff" * 50
    assert r.read("names").tolist() == [b"a", b"", b"xyz" * 100]
    assert r.read("fixed").tolist() == [[b"ab", b"c"]]
    assert r.read("unicode").tolist() == ["ünï".encode(), b"x"]
    assert r.read("none").shape == (0,)


def test_many_keys_multiple_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {f"layer_{i % 37}/block{i:05d}/w": rng.standard_normal(i % 5).astype(np.float32) for i in range(2500)}
    # keys that are prefixes of each other, non-ASCII and byte-order edge cases
    for k in ["a", "a/", "a/b", "a0", "Z", "é/ü", "z\u20ac", "z~"]:
        tensors[k] = np.float32(len(k))
    write_bundle(tmp_path / "m", tensors, block_size=1024, restart_interval=16)

    items = tb._read_table(tmp_path / "m.index")
    raw_keys = [k for k, _ in items]
    assert raw_keys == sorted(raw_keys) and raw_keys[0] == b""
    # structure: many data blocks (index entries) and several restarts per block
    table = (tmp_path / "m.index").read_bytes()
    foot = len(table) - 48
    _, _, pos = tb._parse_handle(table, foot, foot + 40)
    off, size, _ = tb._parse_handle(table, pos, foot + 40)
    handles = list(tb._iter_block(table[off : off + size]))
    assert len(handles) > 20
    b_off, b_size, _ = tb._parse_handle(handles[0][1], 0, len(handles[0][1]))
    first = table[b_off : b_off + b_size]
    assert struct.unpack_from("<I", first, len(first) - 4)[0] > 1  # restart points

    r = TensorBundleReader(tmp_path / "m")
    assert r.keys() == sorted(tensors, key=lambda k: k.encode())
    assert len(r) == len(tensors) and "é/ü" in r and "nope" not in r
    n = 0
    for name, arr in r.items():
        assert _same(arr, tensors[name]), name
        n += 1
    assert n == len(tensors)


def test_default_block_size_and_tiny_blocks(tmp_path: Path) -> None:
    tensors = {f"v{i:04d}": np.float32(i) for i in range(300)}
    for bs in (1, 64, 4096, 1 << 20):
        write_bundle(tmp_path / f"m{bs}", tensors, block_size=bs, restart_interval=3)
        r = TensorBundleReader(tmp_path / f"m{bs}")
        assert [float(r.read(k)) for k in r.keys()] == list(range(300))


def test_empty_bundle(tmp_path: Path) -> None:
    write_bundle(tmp_path / "m", {})
    r = TensorBundleReader(tmp_path / "m")
    assert r.keys() == [] and list(r.items()) == []


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        write_bundle(tmp_path / "m", {"": np.float32(1)})
    with pytest.raises(TypeError, match="'obj'"):
        write_bundle(tmp_path / "m", {"a": np.float32(1), "obj": np.array([object()])})
    assert sorted(os.listdir(tmp_path)) == []  # failed writes leave nothing behind


def test_write_is_atomic(tmp_path: Path) -> None:
    prefix, tensors = _small(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # a failure half-way through writing (bad 3rd tensor) keeps the old checkpoint intact
    with pytest.raises(TypeError):
        write_bundle(prefix, {"a": np.zeros(1000, np.float32), "b": np.ones(3), "c": np.array([object()])})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a successful overwrite replaces both files and leaves no temporaries
    write_bundle(prefix, {"only": np.arange(3, dtype=np.int32)})
    assert sorted(os.listdir(tmp_path)) == ["ck.data-00000-of-00001", "ck.index"]
    r = TensorBundleReader(prefix)
    assert r.keys() == ["only"] and r.read("only").tolist() == [0, 1, 2]
    # creates missing parent directories
    write_bundle(tmp_path / "new" / "dir" / "m", tensors)
    assert TensorBundleReader(tmp_path / "new" / "dir" / "m").keys() == sorted(tensors)


def test_crc_masking() -> None:
    assert tb._crc32c(b"123456789") == 0xE3069283  # CRC32C check value
    for v in (0, 1, 0xE3069283, 0xFFFFFFFF, 0x12345678):
        assert tb.unmask_crc(tb.mask_crc(v)) == v
    assert tb.mask_crc(0) == 0xA282EAD8


# --------------------------------------------------------------------------
# resolve_prefix
# --------------------------------------------------------------------------


def test_resolve_prefix(tmp_path: Path) -> None:
    prefix, _ = _small(tmp_path, "model.ckpt-100")
    assert resolve_prefix(prefix) == prefix
    assert resolve_prefix(str(prefix) + ".index") == prefix
    assert resolve_prefix(str(prefix) + ".data-00000-of-00001") == prefix
    assert resolve_prefix(tmp_path / "x.data-00003-of-00010") == tmp_path / "x"
    # directory with exactly one .index
    assert resolve_prefix(tmp_path) == prefix
    # directory with two .index files and no state file is ambiguous
    _small(tmp_path, "other")
    with pytest.raises(CheckpointError, match="2 \\*.index files"):
        resolve_prefix(tmp_path)
    # a TF `checkpoint` state file decides (relative to the directory)
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt-100"\nall_model_checkpoint_paths: "other"\n'
    )
    assert resolve_prefix(tmp_path) == prefix
    assert TensorBundleReader(tmp_path).prefix == prefix
    # ... or absolute
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{tmp_path / "other"}"\n')
    assert resolve_prefix(tmp_path) == tmp_path / "other"
    (tmp_path / "checkpoint").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="model_checkpoint_path"):
        resolve_prefix(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        resolve_prefix(empty)


# --------------------------------------------------------------------------
# error cases
# --------------------------------------------------------------------------


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as ei:
        TensorBundleReader(tmp_path / "nothing")
    msg = str(ei.value)
    assert f"no such file: {tmp_path / 'nothing.index'}" in msg
    assert "needs both" in msg and "nothing.data-00000-of-00001" in msg
    assert isinstance(ei.value, ValueError)


def test_missing_data_shard(tmp_path: Path) -> None:
    prefix, _ = _small(tmp_path)
    (tmp_path / "ck.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match="missing data shard.*ck.data-00000-of-00001"):
        TensorBundleReader(prefix)


def test_truncated_data(tmp_path: Path) -> None:
    prefix, tensors = _small(tmp_path)
    data = tmp_path / "ck.data-00000-of-00001"
    full = data.stat().st_size
    os.truncate(data, full - 8)
    r = TensorBundleReader(prefix)  # opening still works
    assert _same(r.read("a/kernel"), tensors["a/kernel"])
    with pytest.raises(CheckpointError) as ei:
        r.read("c/step")
    msg = str(ei.value)
    assert "'c/step'" in msg and str(data) in msg
    assert f"[{full - 8}, {full})" in msg and "8 bytes" in msg and f"only {full - 8} bytes" in msg


@needs_golden
def test_truncated_golden_data(tmp_path: Path) -> None:
    for f in ("model.index", "model.data-00000-of-00001"):
        shutil.copyfile(GOLDEN_CKPT / f, tmp_path / f)
    data = tmp_path / "model.data-00000-of-00001"
    half = data.stat().st_size // 2
    os.truncate(data, half)
    r = TensorBundleReader(tmp_path / "model")
    failed = []
    for name in r.keys():
        e = r.entry(name)
        if e.offset + e.size <= half:
            r.read(name)
        else:
            with pytest.raises(CheckpointError, match=f"truncated data file .*{name!r}.*only {half} bytes"):
                r.read(name)
            failed.append(name)
    assert 0 < len(failed) < len(r)


def test_flipped_data_byte(tmp_path: Path) -> None:
    prefix, tensors = _small(tmp_path)
    r0 = TensorBundleReader(prefix)
    e = r0.entry("b/bias")
    data = tmp_path / "ck.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[e.offset + 3] ^= 0x10
    data.write_bytes(bytes(raw))
    r = TensorBundleReader(prefix)
    with pytest.raises(CheckpointError, match=r"checksum mismatch in data file .*ck.data.* variable 'b/bias'"):
        r.read("b/bias")
    assert not _same(r.read("b/bias", verify=False), tensors["b/bias"])  # verify=False skips the check
    assert _same(r.read("a/kernel"), tensors["a/kernel"])  # neighbours are fine


def test_flipped_string_byte(tmp_path: Path) -> None:
    write_bundle(tmp_path / "m", {"s": np.array([b"hello", b"world"], dtype=object)})
    data = tmp_path / "m.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch.*'s'"):
        TensorBundleReader(tmp_path / "m").read("s")


def test_garbage_index(tmp_path: Path) -> None:
    prefix, _ = _small(tmp_path)
    index = tmp_path / "ck.index"
    good = index.read_bytes()

    index.write_bytes(b"this is not an sstable at all, just some text padding it out to > 48 bytes")
    with pytest.raises(CheckpointError, match=r"bad index file .*ck\.index.*magic"):
        TensorBundleReader(prefix)

    index.write_bytes(b"tiny")
    with pytest.raises(CheckpointError, match=r"truncated index file .*ck\.index.*4 bytes"):
        TensorBundleReader(prefix)

    index.write_bytes(good[: len(good) // 2])  # cut: footer (and magic) gone
    with pytest.raises(CheckpointError, match=r"ck\.index"):
        TensorBundleReader(prefix)

    bad = bytearray(good)
    bad[5] ^= 0xFF  # inside the first data block: block checksum catches it
    index.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"corrupt index file .*ck\.index.*checksum"):
        TensorBundleReader(prefix)

    # footer pointing past the end of the file
    foot = bytearray(good[-48:])
    index.write_bytes(b"\x00" * 10 + bytes(foot))
    with pytest.raises(CheckpointError, match=r"truncated index file .*ck\.index"):
        TensorBundleReader(prefix)


def test_compressed_block_rejected(tmp_path: Path) -> None:
    prefix, _ = _small(tmp_path)
    index = tmp_path / "ck.index"
    table = bytearray(index.read_bytes())
    foot = len(table) - 48
    _, _, pos = tb._parse_handle(table, foot, foot + 40)
    off, size, _ = tb._parse_handle(table, pos, foot + 40)
    d_off, d_size, _ = tb._parse_handle(next(tb._iter_block(bytes(table[off : off + size])))[1], 0, 20)
    table[d_off + d_size] = 1  # mark snappy, with a valid checksum
    crc = tb.mask_crc(tb._crc32c(b"\x01", tb._crc32c(bytes(table[d_off : d_off + d_size]))))
    struct.pack_into("<I", table, d_off + d_size + 1, crc)
    index.write_bytes(bytes(table))
    with pytest.raises(CheckpointError, match="snappy-compressed"):
        TensorBundleReader(prefix)


def _write_raw_bundle(prefix: Path, entries, header: bytes | None = None) -> None:
    """Hand-build a bundle from (name, dtype enum, shape, raw bytes)."""
    data = b""
    items = [(b"", header if header is not None else tb._encode_header())]
    for name, dt, shape, raw in sorted(entries):
        items.append((name.encode(), tb._encode_entry(dt, shape, len(data), len(raw), tb.mask_crc(tb._crc32c(raw)))))
        data += raw
    prefix.with_name(prefix.name + ".index").write_bytes(tb._build_table(items, 4096, 16))
    tb.data_shard_path(prefix).write_bytes(data)


def test_big_endian_rejected(tmp_path: Path) -> None:
    header = tb._encode_header() + bytes([0x10, 0x01])  # endianness = BIG
    _write_raw_bundle(tmp_path / "m", [("x", tb.DT_FLOAT, (1,), b"\0\0\0\0")], header=header)
    with pytest.raises(CheckpointError, match="big-endian"):
        TensorBundleReader(tmp_path / "m")


def test_unsupported_dtype_only_fails_on_read(tmp_path: Path) -> None:
    _write_raw_bundle(
        tmp_path / "m",
        [("v", tb.DT_VARIANT, (), b"\x01\x02"), ("x", tb.DT_INT32, (2,), b"\1\0\0\0\2\0\0\0")],
    )
    r = TensorBundleReader(tmp_path / "m")
    assert r.keys() == ["v", "x"] and r.tf_dtype_name("v") == "variant"
    assert r.read("x").tolist() == [1, 2]
    with pytest.raises(NotImplementedError, match="'v'.*variant"):
        r.read("v")
    with pytest.raises(NotImplementedError, match="variant"):
        r.dtype("v")
    with pytest.raises(KeyError, match="nope"):
        r.read("nope")


# --------------------------------------------------------------------------
# golden d0 checkpoint
# --------------------------------------------------------------------------


@needs_golden
def test_golden_d0_sha256() -> None:
    meta = json.loads((GOLDEN_CKPT / "model.values_sha256.json").read_text())
    want = meta["values"]
    r = TensorBundleReader(GOLDEN_CKPT)  # directory with a `checkpoint` file
    assert r.prefix == GOLDEN_CKPT / "model"
    assert len(r) == meta["n"] == len(want) == 1419
    assert sorted(r.keys()) == sorted(want)
    assert r.dtype("global_step") == np.int64 and r.shape("global_step") == ()
    for name, arr in r.items():
        w = want[name]
        assert arr.dtype == np.dtype(w["dtype"]) and list(arr.shape) == w["shape"], name
        digest = hashlib.sha256(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()).hexdigest()
        assert digest == w["sha256"], name


# --------------------------------------------------------------------------
# against TensorFlow
# --------------------------------------------------------------------------


@pytest.mark.tf
@needs_golden
def test_golden_d0_matches_tf() -> None:
    tf = _tf()
    tfr = tf.train.load_checkpoint(str(GOLDEN_CKPT / "model"))
    shapes = tfr.get_variable_to_shape_map()
    r = TensorBundleReader(GOLDEN_CKPT / "model.index")
    assert sorted(shapes) == r.keys()
    for name in r.keys():
        assert _same(r.read(name), tfr.get_tensor(name)), name


@pytest.mark.tf
def test_tf_checkpoint_read_by_us(tmp_path: Path) -> None:
    tf = _tf()
    rng = np.random.default_rng(2)
    variables = {
        "f32": tf.Variable(rng.standard_normal((3, 3, 4, 8)).astype(np.float32)),
        "f64": tf.Variable(rng.standard_normal(5)),
        "f16": tf.Variable(np.float16([1.5, -2])),
        "bf16": tf.Variable(tf.constant([1.5, -3.0, 7.0], dtype=tf.bfloat16)),
        "i8": tf.Variable(np.int8([-128, 127])),
        "i16": tf.Variable(np.int16([-3])),
        "i32": tf.Variable(np.int32(7)),
        "i64": tf.Variable(np.int64([1 << 40, -1])),
        "u8": tf.Variable(np.uint8([0, 255])),
        "flag": tf.Variable(np.array([True, False])),
        "empty": tf.Variable(np.zeros((0, 4), np.float32)),
        "text": tf.Variable(tf.constant([b"ab", b"", b"xyz" * 50])),
    }
    prefix = tf.train.Checkpoint(**variables).write(str(tmp_path / "obj"))
    tfr = tf.train.load_checkpoint(prefix)
    r = TensorBundleReader(prefix)
    assert r.keys() == sorted(tfr.get_variable_to_shape_map())
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in r
    for name in r.keys():
        want = tfr.get_tensor(name)
        got = r.read(name)
        if r.tf_dtype_name(name) == "bfloat16":
            want = np.asarray(want).astype(np.float32)
        if r.tf_dtype_name(name) == "string":
            assert np.asarray(want, dtype=object).tolist() == got.tolist(), name
        else:
            assert _same(got, want), name
        assert list(r.shape(name)) == tfr.get_variable_to_shape_map()[name]
    graph = r.read("_CHECKPOINTABLE_OBJECT_GRAPH")
    assert graph.shape == () and isinstance(graph.item(), bytes)


@pytest.mark.tf
def test_write_bundle_read_by_tf(tmp_path: Path) -> None:
    tf = _tf()
    rng = np.random.default_rng(3)
    tensors: dict[str, np.ndarray] = {}
    for dt in _DTYPES:
        tensors[f"{dt}/4d"] = _sample(dt, (2, 3, 4, 5), rng)
        tensors[f"{dt}/scalar"] = _sample(dt, (), rng)
        tensors[f"{dt}/empty"] = _sample(dt, (0, 2), rng)
    tensors["text"] = np.array([b"a", b"", b"\xffbytes"], dtype=object)
    tensors["text_scalar"] = np.array(b"graph", dtype=object)
    try:
        import ml_dtypes

        tensors["bf16"] = np.array([1.5, -2.0, 3e38], dtype=ml_dtypes.bfloat16)
    except ImportError:
        pass
    for i in range(2100):
        tensors[f"many/{i:05d}"] = np.full((3,), i, np.int32)
    prefix = tmp_path / "ours"
    write_bundle(prefix, tensors)

    tfr = tf.train.load_checkpoint(str(prefix))
    dtypes = tfr.get_variable_to_dtype_map()
    shapes = tfr.get_variable_to_shape_map()
    assert sorted(dtypes) == sorted(tensors)
    for name, want in tensors.items():
        got = tfr.get_tensor(name)
        assert shapes[name] == list(want.shape), name
        if want.dtype.kind == "O":
            assert dtypes[name] == tf.string
            assert np.asarray(got, dtype=object).tolist() == want.tolist(), name
            continue
        assert dtypes[name].as_numpy_dtype == want.dtype, name
        assert _same(got, want), name
