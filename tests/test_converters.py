"""Converters: name map vs the official manifests, every input format, and every bad input."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from effdet_cli.convert import main as convert_main
from effdet_torch.config import get_config
from converters.convert import ConversionError, convert_checkpoint, load_state_dict_file, save_state_dict
from converters.name_map import Layout, format_map, name_map_for
from converters.sources import CheckpointError, H5Source, safe_extract
from converters.tensorbundle import TensorBundleReader, write_bundle
from effdet_torch.config import VARIANTS, bifpn_nodes
from effdet_torch.model import create_model

from .conftest import PROJECT_GOLDEN, REPO

VARIANT_NAMES = list(VARIANTS)


def _manifest(variant: str) -> dict:
    with gzip.open(PROJECT_GOLDEN / "manifests" / f"{variant}.json.gz") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# The declarative map and the config table against the official manifests (all 15 variants)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_name_map_equals_official_variables(variant):
    """Every official raw variable (name and TF shape) maps to exactly one torch key, and back."""
    official = {v["name"]: tuple(v["shape"]) for v in _manifest(variant)["tf1_release_ckpt"]["variables"]
                if v["kind"] in ("trainable", "non_trainable")}
    ours = {e.tf_name: e.tf_shape for e in name_map_for(variant)}
    assert ours == official


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_config_table_equals_official_config(variant):
    facts = _manifest(variant)["config_facts"]
    cfg = VARIANTS[variant]
    assert cfg.backbone.name == facts["backbone_name"]
    assert cfg.image_size == (facts["image_size"], facts["image_size"])
    assert (cfg.fpn_channels, cfg.fpn_repeats, cfg.head_repeats) == (
        facts["fpn_num_filters"], facts["fpn_cell_repeats"], facts["box_class_repeats"])
    assert (cfg.min_level, cfg.max_level, cfg.anchors.num_scales) == (facts["min_level"], facts["max_level"],
                                                                      facts["num_scales"])
    assert cfg.anchors.official_scales
    assert cfg.anchors.anchor_scale == facts["anchor_scale"]
    assert list(cfg.anchors.aspect_ratios) == facts["aspect_ratios"]
    assert cfg.fpn_weight_method == facts["fpn_weight_method_resolved"]
    assert cfg.act_type == facts["act_type"]
    assert cfg.num_classes == facts["num_classes"]
    mean = facts["mean_rgb"] if isinstance(facts["mean_rgb"], list) else [facts["mean_rgb"]] * 3
    std = facts["stddev_rgb"] if isinstance(facts["stddev_rgb"], list) else [facts["stddev_rgb"]] * 3
    np.testing.assert_allclose(cfg.mean_rgb, mean, rtol=1e-12)
    np.testing.assert_allclose(cfg.stddev_rgb, std, rtol=1e-12)
    nodes = [(n.level, list(n.inputs)) for n in bifpn_nodes(cfg.min_level, cfg.max_level)]
    assert nodes == [(n["feat_level"], n["inputs_offsets"]) for n in facts["fpn_nodes"]]


def test_layouts_invert():
    rng = np.random.default_rng(0)
    for layout, shape in ((Layout.CONV, (3, 5, 7, 11)), (Layout.DEPTHWISE, (3, 3, 8, 1)),
                          (Layout.VECTOR, (4,)), (Layout.SCALAR, ())):
        a = rng.standard_normal(shape).astype(np.float32)
        t = layout.to_torch(a)
        assert t.flags.c_contiguous
        np.testing.assert_array_equal(layout.to_tf(t), a)
    assert Layout.CONV.to_torch(np.zeros((3, 5, 7, 11))).shape == (11, 7, 3, 5)  # HWIO -> OIHW
    assert Layout.DEPTHWISE.to_torch(np.zeros((3, 5, 8, 1))).shape == (8, 1, 3, 5)
    assert Layout.SCALAR.to_torch(np.zeros(())).shape == ()


def test_print_map_cli(capsys):
    assert convert_main(["--print-map", "d3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + len(name_map_for("d3"))
    row = next(l for l in out if l.startswith("efficientnet-b3/stem/conv2d/kernel "))
    assert "[3, 3, 3, 40]" in row and "HWIO -> OIHW" in row and row.endswith("backbone.conv_stem.weight")
    assert any(l.startswith("fpn_cells/cell_5/fnode7/WSM_1 ") for l in out)
    assert format_map(name_map_for("lite0")).count("\n") == 588


# ---------------------------------------------------------------------------------------------
# Formats: TF1 directory / prefix / tarball, Keras h5 (by name, chunked attributes), outputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def d0_dir(synth_ckpt_dir) -> Path:
    return synth_ckpt_dir("efficientdet-d0")


@pytest.fixture(scope="module")
def d0_state(d0_dir):
    return convert_checkpoint(d0_dir, "d0").state_dict


def test_tf1_forms_agree(d0_dir, d0_state, tmp_path):
    for form in (d0_dir, d0_dir / "model", d0_dir / "model.index"):
        sd = convert_checkpoint(form, "efficientdet-d0").state_dict
        assert all(torch.equal(sd[k], d0_state[k]) for k in d0_state)
    tgz = tmp_path / "efficientdet-d0.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(d0_dir, arcname="efficientdet-d0")
    sd = convert_checkpoint(tgz, "d0").state_dict
    assert all(torch.equal(sd[k], d0_state[k]) for k in d0_state)


def test_ema_is_the_default_and_no_ema_takes_raw(d0_dir, d0_state):
    reader = TensorBundleReader(d0_dir / "model")
    k = "efficientnet-b0/stem/conv2d/kernel"
    ema = Layout.CONV.to_torch(reader.read(k + "/ExponentialMovingAverage"))
    raw = Layout.CONV.to_torch(reader.read(k))
    np.testing.assert_array_equal(d0_state["backbone.conv_stem.weight"].numpy(), ema)
    res = convert_checkpoint(d0_dir, "d0", ema=False)
    np.testing.assert_array_equal(res.state_dict["backbone.conv_stem.weight"].numpy(), raw)
    assert res.ema is False and not np.array_equal(ema, raw)


def test_official_h5_equals_tf1_checkpoint(shared_golden):
    """The official .h5 (saved from the EMA weights) converts to the same values as the TF1 ckpt."""
    a = convert_checkpoint(shared_golden / "efficientdet-d0" / "efficientdet-d0.h5", "d0").state_dict
    b = convert_checkpoint(shared_golden / "efficientdet-d0" / "ckpt", "d0").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_keras_h5(path: Path, variant: str, state: dict, chunk: int | None, reverse: bool) -> None:
    """An h5 in the tf_keras save_weights layout, weights listed in a non-forward order."""
    entries = name_map_for(variant)
    groups: dict[str, list] = {}
    for e in entries:
        groups.setdefault(e.tf_name.split("/")[0], []).append(e)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([g.encode() for g in groups])
        f.attrs["backend"] = b"tensorflow"
        for layer, es in groups.items():
            g = f.create_group(layer)
            es = es[::-1] if reverse else es
            names = [f"{e.tf_name}:0".encode() for e in es]
            if chunk:
                for i in range(0, len(names), chunk):
                    g.attrs[f"weight_names{i // chunk}"] = np.array(names[i:i + chunk])
            else:
                g.attrs["weight_names"] = np.array(names)
            for e in es:
                g.create_dataset(f"{e.tf_name}:0", data=e.layout.to_tf(state[e.torch_key].numpy()))


@pytest.mark.parametrize("chunk", [None, 97])
def test_h5_read_by_name_with_chunked_weight_names(tmp_path, d0_state, chunk):
    p = tmp_path / "efficientdet-d0.h5"
    _write_keras_h5(p, "efficientdet-d0", d0_state, chunk, reverse=True)
    res = convert_checkpoint(p, "d0")
    assert res.source_kind == "h5" and res.ema is None
    assert all(torch.equal(res.state_dict[k], d0_state[k]) for k in d0_state)


def test_damaged_h5_is_one_checkpoint_error(tmp_path):
    """A flipped bit anywhere in a Keras .h5 either still reads (HDF5 keeps no checksums of raw data) or
    is one CheckpointError naming the file, never h5py's own KeyError/OSError/RuntimeError (a fuzz of
    the official-format d0 .h5 found 13 such tracebacks in 200 flips of its first 64 KiB)."""
    import collections

    good, bad = tmp_path / "w.h5", tmp_path / "bad.h5"
    with h5py.File(good, "w") as f:  # the save_weights layout, small: every byte gets flipped
        f.attrs["layer_names"] = np.array([b"stem", b"head"])
        for layer in ("stem", "head"):
            g = f.create_group(layer)
            names = [f"{layer}/conv/kernel:0".encode(), f"{layer}/bn/gamma:0".encode()]
            g.attrs["weight_names"] = np.array(names)
            for n in names:
                g.create_dataset(n.decode(), data=np.arange(6, dtype=np.float32))
    orig = good.read_bytes()
    outcomes: collections.Counter = collections.Counter()
    for pos in range(0, len(orig), 2):  # every other byte: 6 400 files, ~7 s
        flipped = bytearray(orig)
        flipped[pos] ^= 0x24
        bad.write_bytes(bytes(flipped))
        try:
            src = H5Source(bad)
            try:
                for k in src.keys():
                    src.read(k)
            finally:
                src.close()
            outcomes["read"] += 1
        except CheckpointError as e:
            assert str(bad) in str(e)
            outcomes["CheckpointError"] += 1
        except Exception as e:  # noqa: BLE001 - what this test is looking for
            outcomes[f"{type(e).__name__}: {e}"] += 1
    assert set(outcomes) <= {"read", "CheckpointError"}, outcomes
    assert outcomes["CheckpointError"] > 100  # the structure was hit


def test_safetensors_and_pth_outputs_load(tmp_path, d0_state, d0_dir):
    for name in ("d0.pth", "d0.safetensors"):
        digest = save_state_dict(d0_state, tmp_path / name, get_config("d0"))
        assert len(digest) == 64
        m = create_model("d0", checkpoint=tmp_path / name)
        assert torch.equal(m.state_dict()["backbone.conv_stem.weight"], d0_state["backbone.conv_stem.weight"])


def test_cli_converts_release_file_found_in_cwd(tmp_path, d0_dir, monkeypatch, capsys):
    import shutil

    shutil.copytree(d0_dir, tmp_path / "efficientdet-d0")
    monkeypatch.chdir(tmp_path)
    assert convert_main(["d0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "efficientdet-d0.pth" in out and "3,880,067" in out and "EMA" in out
    assert (tmp_path / "efficientdet-d0.pth").is_file()
    before = (tmp_path / "efficientdet-d0.pth").read_bytes()
    assert convert_main(["d0", "-q"]) != 0  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "efficientdet-d0.pth").read_bytes() == before
    assert convert_main(["d0", "-q", "--force", "--format", "safetensors"]) == 0
    assert (tmp_path / "efficientdet-d0.safetensors").is_file()


def test_cli_says_what_to_download(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert_main(["d7x"]) == 1  # no checkpoint: bad input
    err = capsys.readouterr().err
    assert "efficientdet-d7x.tar.gz" in err and "https://" in err


def test_unknown_variant_suggests(capsys):
    assert convert_main(["d8"]) == 2
    assert "Did you mean d7" in capsys.readouterr().err


def test_conversion_does_not_import_tensorflow(d0_dir, tmp_path):
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "from converters.convert import convert_checkpoint\n"
        f"r = convert_checkpoint({str(d0_dir)!r}, 'd0'); assert r.n_mapped == 709\n"
        "assert 'tensorflow' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file/variable/shape, nothing written
# ---------------------------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, edit) -> Path:
    r = TensorBundleReader(src / "model")
    tensors = {k: r.read(k) for k in r.keys()}
    edit(tensors)
    write_bundle(dst / "model", tensors)
    return dst


def test_missing_variable_is_named(d0_dir, tmp_path):
    k = "class_net/class-predict/bias"
    bad = _rewrite(d0_dir, tmp_path, lambda t: (t.pop(k), t.pop(k + "/ExponentialMovingAverage")))
    with pytest.raises(ConversionError, match=r"1 variables missing: class_net/class-predict/bias"):
        convert_checkpoint(bad, "d0")


def test_unexpected_variable_is_named(d0_dir, tmp_path):
    bad = _rewrite(d0_dir, tmp_path, lambda t: t.update({"extra_head/kernel": np.zeros((1,), np.float32)}))
    with pytest.raises(ConversionError, match="unexpected variables: extra_head/kernel"):
        convert_checkpoint(bad, "d0")


def test_other_variant_names_first_mismatch(d0_dir):
    with pytest.raises(ConversionError) as e:
        convert_checkpoint(d0_dir, "d1")
    msg = str(e.value)
    assert "looks like efficientdet-d0" in msg
    assert "first shape mismatch: resample_p6/conv2d/kernel: checkpoint [1, 1, 320, 64] vs efficientdet-d1 [1, 1, 320, 88]" in msg


def test_nan_weights_refused(d0_dir, tmp_path):
    k = "box_net/box-predict/bias/ExponentialMovingAverage"

    def poison(t):
        t[k] = t[k].copy()
        t[k][3] = np.nan

    bad = _rewrite(d0_dir, tmp_path, poison)
    with pytest.raises(ConversionError, match=f"{k} holds 1 NaN/Inf"):
        convert_checkpoint(bad, "d0")


def test_no_ema_shadows_suggests_no_ema(d0_dir, tmp_path):
    bad = _rewrite(d0_dir, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.endswith("ExponentialMovingAverage")])
    with pytest.raises(ConversionError, match="--no-ema"):
        convert_checkpoint(bad, "d0")
    assert convert_checkpoint(bad, "d0", ema=False).n_mapped == 709


def test_missing_index_and_truncated_data(d0_dir, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(d0_dir, ck)
    data = ck / "model.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    out = tmp_path / "x.pth"
    assert convert_main(["d0", "--ckpt", str(ck), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "model.data-00000-of-00001" in err and not out.exists()
    (ck / "model.index").unlink()
    assert convert_main(["d0", "--ckpt", str(ck / "model"), "-o", str(out), "-q"]) == 1
    assert "model.index" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.glob(".x.pth*"))  # no temporary left behind


def test_damaged_tarball_is_one_checkpoint_error(d0_dir, tmp_path):
    """A release tarball cut short, or with a flipped byte, is one CheckpointError naming the archive
    (a fuzz found EOFError tracebacks from truncated .tar.gz files, and errors naming the deleted
    temporary copy): cut short, the archive cannot be read; a flipped byte inflates to other bytes,
    which the TensorBundle checksums catch, named inside the archive."""
    good = tmp_path / "efficientdet-d0.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(d0_dir, arcname="efficientdet-d0")
    data = good.read_bytes()
    middle = len(data) // 2
    cut = tmp_path / "cut" / good.name
    flipped = tmp_path / "flipped" / good.name
    cut.parent.mkdir(), flipped.parent.mkdir()
    cut.write_bytes(data[:middle])
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    with pytest.raises(CheckpointError, match=f"^{cut}: cannot read the archive .*; is it truncated or corrupt"):
        convert_checkpoint(cut, "d0")
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(flipped, "d0")
    msg = str(e.value)  # (which of the two depends on the deflate stream: either names the archive)
    assert msg.startswith(f"{flipped}: ") or f"{flipped}:efficientdet-d0/model.data-00000-of-00001" in msg, msg
    assert "effdet-ckpt-" not in msg


def test_tarball_escapes_refused(tmp_path):
    import io

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(CheckpointError, match="escapes"):
        safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("ckpt/model.index")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(CheckpointError, match="points outside"):
        convert_checkpoint(link, "d0")


def test_pth_that_is_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_state_dict_file(p)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    q = tmp_path / "pickle.pth"
    torch.save({"x": Evil()}, q, _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_state_dict_file(q)
    r = tmp_path / "garbage.pth"
    r.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        create_model("d0", checkpoint=r)


def test_create_model_resets_only_the_class_head(tmp_path, d0_state):
    p = tmp_path / "d0.pth"
    save_state_dict(d0_state, p, get_config("d0"))
    with pytest.warns(UserWarning, match="90 classes, asked for 7"):
        m = create_model("d0", checkpoint=p, num_classes=7)
    assert m.config.num_classes == 7
    assert m.class_net.predict.conv_pw.weight.shape[0] == 7 * 9
    sd = m.state_dict()
    assert torch.equal(sd["class_net.convs.0.conv_dw.weight"], d0_state["class_net.convs.0.conv_dw.weight"])
    assert torch.equal(sd["box_net.predict.conv_pw.weight"], d0_state["box_net.predict.conv_pw.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_model("d0", checkpoint=p, num_classes=90)


def test_momentum_slots_and_global_step_are_ignored(tmp_path):
    """A training checkpoint (with /Momentum slots) converts to the same weights as the release one."""
    from fixtures.synth_ckpt import write_synth_checkpoint

    bn = PROJECT_GOLDEN / "bn_stats" / "efficientdet-d0.npz"
    plain = write_synth_checkpoint("d0", tmp_path / "plain", bn_stats_path=bn, golden_dir=PROJECT_GOLDEN, progress=False)
    train = write_synth_checkpoint("d0", tmp_path / "train", bn_stats_path=bn, golden_dir=PROJECT_GOLDEN,
                                   momentum=True, progress=False)
    assert any(k.endswith("/Momentum") for k in TensorBundleReader(train / "model").keys())
    a = convert_checkpoint(plain, "d0")
    b = convert_checkpoint(train, "d0")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert "global_step" in b.ignored and len(b.ignored) == 1 + 493  # 493 trainable variables' slots


def test_killed_while_writing_leaves_no_output(tmp_path, d0_state):
    """SIGKILL in the middle of writing: nothing appears under the final name."""
    import signal

    src = tmp_path / "sd.pth"
    save_state_dict(d0_state, src, get_config("d0"))
    out = tmp_path / "out.pth"
    code = (
        "import os, signal, torch\n"
        "from converters.convert import save_state_dict, load_state_dict_file\n"
        "from effdet_torch.config import get_config\n"
        f"sd = load_state_dict_file({str(src)!r})\n"
        "real = torch.save\n"
        "def dying(obj, f, *a, **k):\n"
        "    f.write(b'PK' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying\n"
        f"save_state_dict(sd, {str(out)!r}, get_config('d0'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
