"""Export back to the official formats: TF1 release checkpoint and Keras .h5 (converters.writers).

Expected layouts come from the recorded official manifests (all 15 variants) and from the official
files in ../shared/golden (a TF1 checkpoint written by TF, an .h5 written by the official Keras model);
round trips go through the existing, independently tested reader/converter.
"""
from __future__ import annotations

import gzip
import json

import h5py
import numpy as np
import pytest
import torch

from converters.convert import ConversionError, convert_checkpoint
from converters.name_map import name_map_for
from converters.tensorbundle import TensorBundleReader
from converters.hparams import hparams_for
from converters.writers import (ExportError, keras_layer_names, keras_weight_order, tf1_keys,
                                weight_names_chunks, write_keras_h5, write_tf1_checkpoint)
from effdet_torch.config import VARIANTS, get_config
from effdet_torch.model import create_model

from .conftest import PROJECT_GOLDEN, tf_or_skip

VARIANT_NAMES = list(VARIANTS)


def _manifest(variant: str) -> dict:
    with gzip.open(PROJECT_GOLDEN / "manifests" / f"{variant}.json.gz") as f:
        return json.load(f)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Every variant's layout against the recorded official manifests (no weights needed)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_layouts_equal_official_manifest(variant):
    m = _manifest(variant)
    entries = name_map_for(variant)
    release = {v["name"]: tuple(v["shape"]) for v in m["tf1_release_ckpt"]["variables"] if v["in_release_ckpt"]}
    assert set(tf1_keys(entries)) == set(release)
    assert len(tf1_keys(entries)) == len(release)
    k = m["keras"]
    assert keras_layer_names(variant) == k["h5_layer_names"]
    order = keras_weight_order(entries)
    ours = [(layer, e.tf_name + ":0", list(e.tf_shape)) for layer, es in order.items() for e in es]
    assert ours == [(d["layer"], d["weight_name"], d["shape"]) for d in k["h5_datasets"]]
    chunked = {layer: weight_names_chunks([e.tf_name + ":0" for e in es]) for layer, es in order.items()}
    assert {l: n for l, n in chunked.items() if n > 1} == k["h5_weight_names_attr_chunked"]


# ---------------------------------------------------------------------------------------------
# Against the official files themselves
# ---------------------------------------------------------------------------------------------

def _attrs(obj) -> dict:
    return {k: (list(v) if isinstance(v, np.ndarray) else v, str(obj.attrs.get_id(k).dtype),
                obj.attrs.get_id(k).shape) for k, v in obj.attrs.items()}


def test_h5_equals_the_official_keras_file(shared_golden, tmp_path):
    """The .h5 the official Keras model saved and ours from the same weights: same groups, attributes
    (values, string types, order of weight_names), dataset paths, dtypes, shapes and bytes."""
    d = shared_golden / "efficientdet-d0"
    state = convert_checkpoint(d / "ckpt", "d0").state_dict
    out = write_keras_h5(state, "d0", tmp_path / "ours.h5")
    with h5py.File(d / "efficientdet-d0.h5", "r") as a, h5py.File(out, "r") as b:
        assert _attrs(a) == _attrs(b)
        assert sorted(a) == sorted(b)
        for g in a:
            assert _attrs(a[g]) == _attrs(b[g]), g
        paths = []
        a.visititems(lambda name, o: paths.append(name) if isinstance(o, h5py.Dataset) else None)
        assert len(paths) == 709
        for p in paths:
            assert a[p].dtype == b[p].dtype and a[p].shape == b[p].shape, p
            assert np.array_equal(a[p][()], b[p][()]), p


def test_tf1_matches_the_official_release_layout(shared_golden, tmp_path):
    """Same keys, dtypes and shapes as the TF-written d0 checkpoint; EMA shadows equal to it."""
    ck = shared_golden / "efficientdet-d0" / "ckpt"
    state = convert_checkpoint(ck, "d0").state_dict
    out = write_tf1_checkpoint(state, "d0", tmp_path / "tf1", global_step=7)
    a, b = TensorBundleReader(ck / "model"), TensorBundleReader(out / "model")
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert (a.tf_dtype_name(k), a.shape(k)) == (b.tf_dtype_name(k), b.shape(k)), k
        if k.endswith("/ExponentialMovingAverage"):
            np.testing.assert_array_equal(a.read(k), b.read(k))
            np.testing.assert_array_equal(b.read(k[: -len("/ExponentialMovingAverage")]), b.read(k))
    assert int(b.read("global_step")) == 7
    assert (out / "checkpoint").read_text() == (ck / "checkpoint").read_text()


@pytest.mark.tf
def test_tensorflow_reads_the_export(tmp_path):
    tf = tf_or_skip()
    torch.manual_seed(0)
    state = create_model("lite0", num_classes=5).state_dict()
    out = write_tf1_checkpoint(state, "lite0", tmp_path / "ck")
    assert tf.train.latest_checkpoint(str(out)) == str(out / "model")
    reader = tf.train.load_checkpoint(str(out))
    for e in name_map_for("lite0", num_classes=5):
        want = e.layout.to_tf(state[e.torch_key].numpy())
        np.testing.assert_array_equal(reader.get_tensor(e.tf_name + "/ExponentialMovingAverage"), want)
    assert reader.get_tensor("global_step") == 0


# ---------------------------------------------------------------------------------------------
# Round trips .pth -> official -> .pth, bit-exact
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def d0_state(synth_ckpt_dir):
    return convert_checkpoint(synth_ckpt_dir("efficientdet-d0"), "d0").state_dict


def _random_state(variant: str, num_classes: int | None = None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = create_model(variant, num_classes=num_classes)
    with torch.no_grad():  # BN statistics and fusion weights away from their init constants
        for k, v in m.state_dict().items():
            v.copy_(torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v))
    return m.state_dict()


@pytest.mark.parametrize("case", ["d0-synthetic", "lite0-random", "d0-7-classes"])
def test_round_trip_bit_exact(case, d0_state, tmp_path):
    variant, state = {
        "d0-synthetic": lambda: ("efficientdet-d0", d0_state),
        "lite0-random": lambda: ("efficientdet-lite0", _random_state("lite0")),
        "d0-7-classes": lambda: ("efficientdet-d0", _random_state("d0", num_classes=7)),
    }[case]()
    ck = write_tf1_checkpoint(state, variant, tmp_path / "tf1")
    for ema in (True, False):  # shadows and raw values are both the weights
        assert _equal(convert_checkpoint(ck, variant, ema=ema).state_dict, state)
    h5 = write_keras_h5(state, variant, tmp_path / "w.h5")
    assert _equal(convert_checkpoint(h5, variant).state_dict, state)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["efficientdet-d7x"])
def test_round_trip_largest_variant(variant, tmp_path):
    """The largest variant (77 M parameters, P3-P8, its backbone's weight_names split in two h5
    attributes) through both formats with random values. Every variant took 5 min on 2 cores; the
    layouts of all 15 are checked above without weights, and the layouts are the same code."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for e in name_map_for(variant):
        shape = e.layout.to_torch(np.zeros(e.tf_shape, np.float32)).shape
        state[e.torch_key] = torch.randn(shape, generator=g)
    ck = write_tf1_checkpoint(state, variant, tmp_path / "tf1")
    assert _equal(convert_checkpoint(ck, variant).state_dict, state)
    h5 = write_keras_h5(state, variant, tmp_path / "w.h5")
    assert _equal(convert_checkpoint(h5, variant).state_dict, state)


def test_custom_class_count_hparams():
    assert hparams_for(get_config("d0"))[0] == ""
    assert hparams_for(get_config("lite0", num_classes=7))[0] == "num_classes=7"


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the key, nothing written, no overwrite without force
# ---------------------------------------------------------------------------------------------

def test_bad_state_dicts_are_named(d0_state, tmp_path):
    bad = dict(d0_state)
    bad.pop("box_net.predict.conv_pw.bias")
    with pytest.raises(ExportError, match=r"1 missing, e.g. \['box_net.predict.conv_pw.bias'\]"):
        write_tf1_checkpoint(bad, "d0", tmp_path / "a")
    bad = dict(d0_state)
    bad["fpn.resample.0.conv.weight"] = torch.zeros(88, 320, 1, 1)
    with pytest.raises(ExportError, match=r"first fpn.resample.0.conv.weight: checkpoint \(88, 320, 1, 1\) "
                                          r"vs model \(64, 320, 1, 1\)"):
        write_keras_h5(bad, "d0", tmp_path / "a.h5")
    bad = dict(d0_state)
    bad["class_net.predict.conv_pw.weight"] = bad["class_net.predict.conv_pw.weight"].clone()
    bad["class_net.predict.conv_pw.weight"][0, 0] = float("nan")
    with pytest.raises(ExportError, match="class_net.predict.conv_pw.weight holds 1 NaN"):
        write_tf1_checkpoint(bad, "d0", tmp_path / "a")
    with pytest.raises(ConversionError):  # a d0 state dict is not a d1 one
        convert_checkpoint(write_tf1_checkpoint(d0_state, "d0", tmp_path / "d0"), "d1")
    with pytest.raises(ExportError, match="does not fit efficientdet-d1"):
        write_tf1_checkpoint(d0_state, "d1", tmp_path / "d1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0"]  # nothing else, no temporaries


def test_no_overwrite_without_force(d0_state, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_tf1_checkpoint(d0_state, "d0", tmp_path / "ck")
    write_tf1_checkpoint(d0_state, "d0", tmp_path / "ck", force=True)
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"  # --force replaces only the checkpoint
    assert _equal(convert_checkpoint(tmp_path / "ck", "d0").state_dict, d0_state)
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--force"):
        write_keras_h5(d0_state, "d0", h5)
    assert h5.read_bytes() == b"old"
    write_keras_h5(d0_state, "d0", h5, force=True)
    assert _equal(convert_checkpoint(h5, "d0").state_dict, d0_state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "w.h5"]


# ---------------------------------------------------------------------------------------------
# effdet-export tf1 / h5 / torch-export command lines
# ---------------------------------------------------------------------------------------------

def test_cli_tf1_h5(tmp_path, capsys):
    from converters.convert import save_state_dict
    from effdet_cli.export import main as export_main

    state = _random_state("lite0", num_classes=7)
    pth = tmp_path / "l7.pth"
    save_state_dict(state, pth, get_config("lite0", num_classes=7))
    ck, h5 = tmp_path / "ck", tmp_path / "l7.h5"
    assert export_main(["tf1", "--variant", "lite0", "--weights", str(pth), "-o", str(ck), "--global-step", "5"]) == 0
    out = capsys.readouterr().out
    assert '--model_name=efficientdet-lite0 --hparams="num_classes=7"' in out
    assert int(TensorBundleReader(ck / "model").read("global_step")) == 5
    assert export_main(["h5", "--variant", "efficientdet-lite0", "--weights", str(pth), "-o", str(h5)]) == 0
    for p in (ck, h5):
        assert _equal(convert_checkpoint(p, "lite0").state_dict, state)
    capsys.readouterr()
    assert export_main(["tf1", "--variant", "lite0", "--weights", str(pth), "-o", str(ck)]) == 1
    assert capsys.readouterr().err.strip() == f"effdet-export: error: {ck} already exists; pass --force to overwrite"
    assert export_main(["h5", "--variant", "d0", "--weights", str(pth), "-o", str(tmp_path / "x.h5")]) == 1
    err = capsys.readouterr().err
    # the file records its variant: the error says whose weights they are
    assert err == f"effdet-export: error: {pth}: holds efficientdet-lite0 weights (its record), not efficientdet-d0\n"
    bare = tmp_path / "bare.pth"  # a state dict without a record (another tool's): the map says it does not fit
    torch.save(state, bare)
    assert export_main(["h5", "--variant", "d0", "--weights", str(bare), "-o", str(tmp_path / "x.h5")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"effdet-export: error: {bare}: does not fit efficientdet-d0") and err.count("\n") == 1
    assert export_main(["tf1", "--variant", "lite0", "--weights", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "y")]) == 1
    assert "nope.pth: no such file" in capsys.readouterr().err
    assert export_main(["h5", "--variant", "d9", "--weights", str(pth), "-o", str(tmp_path / "z.h5")]) == 2
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z.h5").exists()
    assert export_main(["onnx", "--help"]) == 0
    assert "NonMaxSuppression" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_torch_export(tmp_path, capsys):
    from converters.convert import save_state_dict
    from effdet_cli.export import main as export_main

    state = _random_state("lite0")
    save_state_dict(state, tmp_path / "l.pth", get_config("lite0"))
    out = tmp_path / "l.pt2"
    assert export_main(["torch-export", "--variant", "lite0", "--weights", str(tmp_path / "l.pth"), "--image-size",
                        "128", "-o", str(out)]) == 0
    assert "max rel. error" in capsys.readouterr().out
    m = create_model("lite0", image_size=128)
    m.load_state_dict(state)
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        got, (cls, box) = torch.export.load(out).module()(x), m(x)
    assert all(torch.equal(a, b) for a, b in zip(got, [*cls, *box]))  # measured bit-identical
