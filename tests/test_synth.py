"""Tests for fixtures.synth_ckpt: the synthetic release-checkpoint rule edet-synth-v2."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
from effdet_cli.parity import main as parity_main
from fixtures import synth_ckpt as synth

from converters.tensorbundle import TensorBundleReader
from effdet_torch.files import sha256_array

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
needs_golden = pytest.mark.skipif(
    not (GOLDEN / "manifests").is_dir(),
    reason=f"shared goldens not present: {GOLDEN} (needs manifests/, bn_stats/ and the d0/lite0 ckpt folders)",
)
EMA = "/ExponentialMovingAverage"
MOM = "/Momentum"


def _golden_shas(variant: str) -> dict:
    path = GOLDEN / variant / "ckpt" / "model.values_sha256.json"
    if not path.is_file():
        pytest.skip(f"golden sha256 list not present: {path}")
    return json.loads(path.read_text())


def _var(name, shape, kind="trainable", in_release=True, dtype="float32"):
    return {
        "name": name,
        "shape": list(shape),
        "dtype": dtype,
        "kind": kind,
        "has_ema": kind in ("trainable", "non_trainable"),
        "in_release_ckpt": in_release,
    }


def _tiny_manifest() -> dict:
    """One variable of every row of the rule table, plus non-release entries."""
    raws = [
        _var("efficientnet-b0/stem/conv2d/kernel", (3, 3, 3, 32)),
        _var("efficientnet-b0/blocks_3/depthwise_conv2d/depthwise_kernel", (5, 5, 144, 1)),
        _var("class_net/class-0/pointwise_kernel", (1, 1, 64, 64)),
        _var("class_net/class-0/bias", (64,)),
        _var("class_net/class-predict/pointwise_kernel", (1, 1, 64, 810)),
        _var("class_net/class-predict/bias", (810,)),
        _var("box_net/box-predict/bias", (36,)),
        _var("efficientnet-b0/blocks_0/se/conv2d/bias", (8,)),
        _var("resample_p6/conv2d/kernel", (1, 1, 320, 64)),
        _var("efficientnet-b0/stem/tpu_batch_normalization/gamma", (32,)),
        _var("efficientnet-b0/stem/tpu_batch_normalization/beta", (32,)),
        _var("efficientnet-b0/stem/tpu_batch_normalization/moving_mean", (32,), "non_trainable"),
        _var("efficientnet-b0/stem/tpu_batch_normalization/moving_variance", (32,), "non_trainable"),
        _var("fpn_cells/cell_0/fnode0/WSM", ()),
        _var("fpn_cells/cell_0/fnode0/WSM_1", ()),
        _var("fpn_cells/cell_0/fnode2/WSM_2", ()),
    ]
    extra = [
        _var("efficientnet-b0/stem/conv2d/kernel/Momentum", (3, 3, 3, 32), "momentum", in_release=False),
        _var("efficientnet-b0/stem/conv2d/kernel" + EMA, (3, 3, 3, 32), "ema"),
        _var("global_step", (), "global_step", dtype="int64"),
    ]
    return {"variant": "efficientdet-tiny", "tf1_release_ckpt": {"variables": raws + extra}}


def _synth_quiet(manifest, bn_stats=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return synth.synth_variables(manifest, bn_stats, **kw)


# --------------------------------------------------------------------------
# 1. d0: sha256 list and the TF-written checkpoint
# --------------------------------------------------------------------------


@pytest.mark.shared_golden
@needs_golden
def test_d0_bit_exact_against_sha_list_and_tf_checkpoint():
    ref = _golden_shas("efficientdet-d0")
    manifest = synth.load_manifest("d0", golden_dir=GOLDEN)
    with np.load(GOLDEN / "bn_stats" / "efficientdet-d0.npz") as bn:
        vals = synth.synth_variables(manifest, bn)
    assert ref["n"] == 1419 == len(vals) == len(ref["values"])
    assert set(vals) == set(ref["values"])
    sha_ok = 0
    for k, want in ref["values"].items():
        arr = vals[k]
        assert arr.dtype.name == want["dtype"] and list(arr.shape) == want["shape"], k
        assert sha256_array(arr) == want["sha256"], f"sha256 mismatch: {k}"
        sha_ok += 1
    assert sha_ok == 1419

    prefix = GOLDEN / "efficientdet-d0" / "ckpt" / "model"
    with TensorBundleReader(prefix) as r:
        keys = list(r.keys())
        assert set(keys) == set(vals)
        for k in keys:
            got = r.read(k)
            assert got.dtype == vals[k].dtype and got.shape == vals[k].shape, k
            assert got.tobytes() == vals[k].tobytes(), f"value mismatch vs TF checkpoint: {k}"
    assert vals["global_step"].dtype == np.int64 and int(vals["global_step"]) == 123456


# --------------------------------------------------------------------------
# 2. lite0: write a checkpoint, check it against the sha list, read it back
# --------------------------------------------------------------------------


@pytest.mark.shared_golden
@needs_golden
def test_lite0_written_checkpoint_matches_sha_list(tmp_path):
    ref = _golden_shas("efficientdet-lite0")
    bn_path = GOLDEN / "bn_stats" / "efficientdet-lite0.npz"
    out = synth.write_synth_checkpoint(
        "efficientdet-lite0", tmp_path / "lite0", bn_stats_path=bn_path, golden_dir=GOLDEN, progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint",
        "model.data-00000-of-00001",
        "model.index",
        "model.values_sha256.json",
    ]
    assert (out / "checkpoint").read_text() == 'model_checkpoint_path: "model"\nall_model_checkpoint_paths: "model"\n'

    written = json.loads((out / "model.values_sha256.json").read_text())
    assert {k: v for k, v in written.items() if k != "values"} == {k: v for k, v in ref.items() if k != "values"}
    assert written["values"] == ref["values"]
    # byte-for-byte the golden file format
    golden_file = GOLDEN / "efficientdet-lite0" / "ckpt" / "model.values_sha256.json"
    assert (out / "model.values_sha256.json").read_bytes() == golden_file.read_bytes()

    n_ok = 0
    with TensorBundleReader(out / "model") as r:
        assert set(r.keys()) == set(ref["values"])
        for k, want in ref["values"].items():
            arr = r.read(k)
            assert arr.dtype.name == want["dtype"] and list(arr.shape) == want["shape"], k
            assert sha256_array(arr) == want["sha256"], f"sha256 mismatch after read-back: {k}"
            n_ok += 1
        # and identical to the in-memory generator
        manifest = synth.load_manifest(GOLDEN / "manifests" / "efficientdet-lite0.json.gz")
        with np.load(bn_path) as bn:
            for k, v in synth.iter_synth_variables(manifest, bn):
                assert r.read(k).tobytes() == v.tobytes(), k
    assert n_ok == ref["n"] == 1177


# --------------------------------------------------------------------------
# 3. properties from first principles
# --------------------------------------------------------------------------


def test_keys_one_ema_per_raw_and_global_step():
    m = _tiny_manifest()
    raws = [v["name"] for v in m["tf1_release_ckpt"]["variables"] if v["kind"] in ("trainable", "non_trainable")]
    vals = _synth_quiet(m)
    assert set(vals) == {"global_step"} | set(raws) | {r + EMA for r in raws}
    for r in raws:
        assert sum(k.startswith(r + "/") for k in vals) == 1  # exactly one shadow, no slot
        assert vals[r].dtype == np.float32 and vals[r + EMA].dtype == np.float32
        assert vals[r].shape == vals[r + EMA].shape
    gs = vals["global_step"]
    assert gs.dtype == np.int64 and gs.shape == () and int(gs) == 123456
    assert not any(k.endswith(MOM) for k in vals)
    assert sorted(vals, key=str.encode) == synth.synth_keys(m)


def test_raw_values_follow_the_rule_table():
    m = _tiny_manifest()
    vals = _synth_quiet(m)
    # independent recomputation of one kernel: N(0, 1/sqrt(3*3*3)), float64 then float32
    name = "efficientnet-b0/stem/conv2d/kernel"
    rng = np.random.default_rng(zlib.crc32(name.encode()) ^ 1234)
    expect = (0 + (1 / np.sqrt(27)) * rng.standard_normal(size=(3, 3, 3, 32))).astype(np.float32)
    assert vals[name].tobytes() == expect.tobytes()
    # depthwise: sigma = 1/sqrt(kh*kw) = 0.2 (not 1/sqrt(kh*kw*cin))
    dw = vals["efficientnet-b0/blocks_3/depthwise_conv2d/depthwise_kernel"]
    assert abs(dw.std() - 0.2) < 0.02
    assert abs(vals["resample_p6/conv2d/kernel"].std() - 1 / np.sqrt(320)) < 0.003
    assert abs(vals["class_net/class-predict/pointwise_kernel"].std() - 1 / 8) < 0.005
    # class-predict bias is the prior -4.6, every other bias is ~0
    assert abs(vals["class_net/class-predict/bias"].mean() + 4.6) < 0.1
    assert abs(vals["class_net/class-predict/bias"].std() - 0.5) < 0.05
    for b in ("box_net/box-predict/bias", "class_net/class-0/bias"):
        assert abs(vals[b].mean()) < 0.03 and vals[b].std() < 0.08
    g = vals["efficientnet-b0/stem/tpu_batch_normalization/gamma"]
    assert g.min() >= 0.8 and g.max() <= 1.2
    v = vals["efficientnet-b0/stem/tpu_batch_normalization/moving_variance"]
    assert v.min() >= 0.8 and v.max() <= 1.2
    for w in ("WSM", "WSM_1"):
        x = vals[f"fpn_cells/cell_0/fnode0/{w}"]
        assert x.shape == () and x.dtype == np.float32 and 0.5 <= float(x) <= 1.5
    assert synth.rule_for("a/WSM_2", ()).scale == 0.5
    assert synth.rule_for("x/class-predict/bias", (9,)).mu == -4.6
    assert synth.rule_for("x/box-predict/bias", (9,)).mu == 0.0
    with pytest.raises(ValueError, match="not covered"):
        synth.rule_for("x/unknown_thing", (3,))


def test_ema_is_raw_plus_ten_percent_of_scale():
    m = _tiny_manifest()
    vals = _synth_quiet(m)
    pooled = []
    for v in m["tf1_release_ckpt"]["variables"]:
        if v["kind"] not in ("trainable", "non_trainable"):
            continue
        s = synth.rule_for(v["name"], v["shape"]).scale
        d = (vals[v["name"] + EMA].astype(np.float64) - vals[v["name"]].astype(np.float64)) / s
        assert np.any(d != 0), v["name"]
        if d.size >= 4096:
            assert abs(d.std() - 0.1) < 0.01, v["name"]
        pooled.append(d.reshape(-1))
    pooled = np.concatenate(pooled)
    assert pooled.size > 50000
    assert abs(pooled.std() - 0.1) < 0.003
    assert abs(pooled.mean()) < 0.003


def test_momentum_slots_only_when_asked():
    m = _tiny_manifest()
    plain = _synth_quiet(m)
    with_m = _synth_quiet(m, momentum=True)
    trainable = [v["name"] for v in m["tf1_release_ckpt"]["variables"] if v["kind"] == "trainable"]
    assert not any(k.endswith(MOM) for k in plain)
    assert {k for k in with_m if k.endswith(MOM)} == {t + MOM for t in trainable}
    assert "efficientnet-b0/stem/tpu_batch_normalization/moving_mean" + MOM not in with_m
    for k, v in plain.items():  # momentum does not change the other keys
        assert with_m[k].tobytes() == v.tobytes(), k
    big = "class_net/class-predict/pointwise_kernel"
    s = synth.rule_for(big, (1, 1, 64, 810)).scale
    assert abs(with_m[big + MOM].std() / s - 0.01) < 0.001
    assert len(synth.synth_keys(m, momentum=True)) == len(with_m)


def test_seed_bn_stats_and_lazy_mapping():
    m = _tiny_manifest()
    a = _synth_quiet(m, seed=1234)
    b = _synth_quiet(m, seed=7)
    k = "class_net/class-0/pointwise_kernel"
    assert not np.array_equal(a[k], b[k])
    assert int(b["global_step"]) == 123456

    bn_names = [
        "efficientnet-b0/stem/tpu_batch_normalization/moving_mean",
        "efficientnet-b0/stem/tpu_batch_normalization/moving_variance",
    ]
    bn = {}
    for i, n in enumerate(bn_names):
        bn[n] = np.full(32, i + 0.25, np.float32)
        bn[n + EMA] = np.full(32, i + 0.75, np.float32)
    c = synth.synth_variables(m, bn)
    for n in bn:
        assert c[n].tobytes() == bn[n].tobytes()
    for key in c:
        if key not in bn:
            assert c[key].tobytes() == a[key].tobytes(), key
    with pytest.raises(ValueError, match="missing"):
        synth.synth_variables(m, {k: v for k, v in bn.items() if not k.endswith(EMA)})
    with pytest.raises(ValueError, match="not BN statistics"):
        synth.synth_variables(m, {**bn, "other/moving_mean": np.zeros(3, np.float32)})
    with pytest.warns(UserWarning, match="BN"):
        synth.synth_variables(m, None)

    lazy = synth.SynthVariables(m, bn)
    assert list(lazy) == synth.synth_keys(m) and len(lazy) == len(c)
    for key in reversed(list(lazy)):  # any access order gives the same values
        assert lazy[key].tobytes() == c[key].tobytes(), key
    with pytest.raises(KeyError):
        lazy["nope"]

    odd = _tiny_manifest()
    odd["tf1_release_ckpt"]["variables"].append(_var("x/kernel/Adam", (3, 3), "slot"))
    with pytest.raises(ValueError, match="x/kernel/Adam"):
        synth.synth_variables(odd, bn)


def test_load_manifest_by_name_and_path(tmp_path, monkeypatch):
    m = _tiny_manifest()
    (tmp_path / "manifests").mkdir()
    # variant names resolve by the one resolver (effdet_torch.config), so the test manifest stands in for d0
    with gzip.open(tmp_path / "manifests" / "efficientdet-d0.json.gz", "wt") as f:
        json.dump(m, f)
    (tmp_path / "plain.json").write_text(json.dumps(m))
    assert synth.load_manifest("d0", golden_dir=tmp_path) == m
    assert synth.load_manifest("efficientdet-d0", golden_dir=tmp_path) == m
    monkeypatch.setenv("EFFDET_GOLDEN_DIR", str(tmp_path))
    assert synth.load_manifest("D0") == m
    assert synth.load_manifest(tmp_path / "plain.json") == m
    assert synth.load_manifest(str(tmp_path / "manifests" / "efficientdet-d0.json.gz")) == m
    with pytest.raises(FileNotFoundError, match="efficientdet-d1"):
        synth.load_manifest("d1")
    with pytest.raises(ValueError, match="unknown EfficientDet variant 'd9'"):
        synth.load_manifest("d9")
    missing = tmp_path / "nope.json.gz"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
        synth.load_manifest(missing)
    with pytest.raises(FileNotFoundError, match="no-such.npz"):
        synth.write_synth_checkpoint("d0", tmp_path / "o", bn_stats_path=tmp_path / "no-such.npz")


# --------------------------------------------------------------------------
# 4. command line
# --------------------------------------------------------------------------


@pytest.fixture
def tiny_manifest_path(tmp_path):
    p = tmp_path / "efficientdet-tiny.json"
    p.write_text(json.dumps(_tiny_manifest()))
    return p


def test_cli_refuses_non_empty_dir_without_force(tmp_path, tiny_manifest_path, capsys):
    out = tmp_path / "out dir"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = parity_main(["synth-ckpt", str(tiny_manifest_path), "-o", str(out), "-q"])
    assert rc != 0
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    with pytest.warns(UserWarning, match="BN"):
        rc = parity_main(["synth-ckpt", str(tiny_manifest_path), "-o", str(out), "--force", "--momentum", "--seed", "5"])
    assert rc == 0
    doc = json.loads((out / "model.values_sha256.json").read_text())
    assert doc["seed"] == 5 and doc["momentum"] is True and doc["bn_stats"] is None
    with TensorBundleReader(out / "model") as r:
        assert set(r.keys()) == set(doc["values"])
        assert int(r.read("global_step")) == 123456
        for k, v in doc["values"].items():
            assert sha256_array(r.read(k)) == v["sha256"], k

    # a fresh (missing or empty) directory needs no --force
    fresh = tmp_path / "fresh"
    with pytest.warns(UserWarning):
        assert parity_main(["synth-ckpt", str(tiny_manifest_path), "-o", str(fresh), "-q"]) == 0
    assert (fresh / "model.index").is_file()


def test_cli_module_entry_point(tmp_path, tiny_manifest_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "effdet_cli.parity", "synth-ckpt", str(tiny_manifest_path), "-o", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode != 0 and str(out) in p.stderr
    h = subprocess.run(
        [sys.executable, "-m", "effdet_cli.parity", "synth-ckpt", "--help"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert h.returncode == 0
    for word in ("--seed", "--bn-stats", "--momentum", "--force", "-o", "edet-synth-v2"):
        assert word in h.stdout
