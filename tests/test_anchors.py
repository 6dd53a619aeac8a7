"""Custom anchors end to end: the configuration (official semantics), the anchors against an oracle
written from the documented formula and — with the official code — against ``anchors.Anchors`` and
``AnchorLabeler``, the record that makes them travel with the weights, the official ``--hparams`` in
and out, and the seed's project fields."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.hparams import hparams_for, parse_hparams
from effdet_torch.anchors import generate_anchors
from effdet_torch.checkpoint import CheckpointError, load_weights_file, weights_writer
from effdet_torch.config import AnchorConfig, get_config, octave_scales
from effdet_torch.files import atomic_write
from effdet_torch.model import EfficientDet, create_model, load_pretrained
from training.project import project_anchors
from training.targets import assign_targets

PAIRS = AnchorConfig(anchor_scale=3.0, scales=octave_scales(2), aspect_ratios=(1.0, (1.5, 0.7), 0.4, 3.0))


# ------------------------------------------------------------------------------ configuration
def test_octaves_are_the_official_float64_values():
    """``2**octave_scale`` with ``octave_scale = i / float(n)`` (official Anchors._generate_configs)."""
    for n in range(1, 6):
        assert octave_scales(n) == tuple(2 ** (i / float(n)) for i in range(n))
    assert get_config("d0").anchors.scales == (1.0, 2 ** (1 / 3), 2 ** (2 / 3))


def test_anchor_config_round_trip_and_checks():
    for a in (AnchorConfig(), PAIRS, AnchorConfig(anchor_scale=(4.0, 4.0, 5.0, 5.0, 6.0), scales=(1.0, 1.7))):
        assert AnchorConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert not AnchorConfig(scales=(1.0, 1.7)).official_scales and PAIRS.official_scales
    assert PAIRS.num_anchors == 8 and PAIRS.axis_factors()[1] == (1.5, 0.7)
    assert PAIRS.axis_factors()[2] == (math.sqrt(0.4), 1.0 / math.sqrt(0.4))
    assert AnchorConfig.from_dict({"num_scales": 2, "aspect_ratios": [1.0, [2, 1]]}).scales == octave_scales(2)
    for bad in ({"aspect_ratios": [1.0, [2.0]]}, {"aspect_ratios": [-1.0]}, {"scales": []}, {"anchor_scale": 0},
                {"num_scales": 2, "scales": [1.0]}, {"ratios": [1.0]}):
        with pytest.raises(ValueError):
            AnchorConfig.from_dict(bad)
    with pytest.raises(ValueError, match="anchor_scale has 2 values for 5 levels"):
        get_config("d0", anchors=AnchorConfig(anchor_scale=(4.0, 4.0)))


# ------------------------------------------------------------------------- anchors: an oracle
def _oracle(cfg, hw) -> np.ndarray:
    """The documented formula, one anchor at a time in Python floats (float64): at level l with
    feature size (fh, fw) = the official ceil halving, stride (H/fh, W/fw), centres stride/2 + i·stride,
    per (scale k, aspect): base = anchor_scale_l · stride · k, half = base · factor / 2 (factor √r,
    1/√r for a float r, the pair as given); level → location (row-major) → scale-major, aspect-minor."""
    a = cfg.anchors
    out = []
    h, w = hw
    sizes = [(h, w)]
    for _ in range(cfg.max_level):
        sizes.append(((sizes[-1][0] - 1) // 2 + 1, (sizes[-1][1] - 1) // 2 + 1))
    for li, lvl in enumerate(cfg.levels):
        fh, fw = sizes[lvl]
        sy, sx = h / float(fh), w / float(fw)
        scale_l = a.anchor_scale[li] if isinstance(a.anchor_scale, tuple) else a.anchor_scale
        for y in range(fh):
            for x in range(fw):
                cy, cx = sy / 2 + y * sy, sx / 2 + x * sx
                for k in a.scales:
                    for r in a.aspect_ratios:
                        fx, fy = r if isinstance(r, tuple) else (math.sqrt(r), 1.0 / math.sqrt(r))
                        hy, hx = scale_l * sy * k * fy / 2.0, scale_l * sx * k * fx / 2.0
                        out.append((cy - hy, cx - hx, cy + hy, cx + hx))
    return np.asarray(out, np.float64).astype(np.float32)


def _random_anchor_config(g: np.random.Generator, levels: int) -> AnchorConfig:
    n = int(g.integers(1, 6))
    scales = octave_scales(n) if g.random() < 0.5 else tuple(float(v) for v in np.sort(g.uniform(0.5, 3.0, n)))
    ratios = []
    for _ in range(int(g.integers(1, 6))):
        ratios.append(float(g.choice([0.25, 0.5, 1.0, 2.0, 3.0, 4.0, g.uniform(0.1, 8)])) if g.random() < 0.5
                      else (float(g.uniform(0.2, 3)), float(g.uniform(0.2, 3))))
    anchor_scale = float(g.choice([3.0, 4.0, 5.0, g.uniform(1, 8)])) if g.random() < 0.7 else \
        tuple(float(v) for v in g.uniform(1, 8, levels))
    return AnchorConfig(anchor_scale=anchor_scale, scales=scales, aspect_ratios=tuple(ratios))


@pytest.mark.parametrize("seed", range(12))
def test_anchors_equal_the_formula_bit_for_bit(seed):
    g = np.random.default_rng(seed)
    variant = ["d0", "lite0", "d7x"][seed % 3]
    base = get_config(variant)
    hw = [(64, 64), (96, 64), (64, 160), (77, 50)][seed % 4]  # non-square and odd sizes too
    cfg = get_config(variant, anchors=_random_anchor_config(g, len(base.levels)))
    ours = generate_anchors(cfg, hw)
    np.testing.assert_array_equal(ours, _oracle(cfg, hw))
    assert ours.shape[0] == sum(cfg.feature_sizes(hw)[l][0] * cfg.feature_sizes(hw)[l][1] for l in cfg.levels) * \
        cfg.num_anchors


def test_an_anchor_mistake_fails_the_oracle():
    """The oracle sees what matters: pairs read as (y, x), or octaves as i/n instead of 2^(i/n)."""
    cfg = get_config("d0", anchors=PAIRS)
    swapped = get_config("d0", anchors=AnchorConfig(3.0, PAIRS.scales, (1.0, (0.7, 1.5), 0.4, 3.0)))
    assert not np.array_equal(generate_anchors(swapped, (64, 64)), _oracle(cfg, (64, 64)))
    linear = get_config("d0", anchors=AnchorConfig(3.0, (0.0 + 1, 0.5 + 1), PAIRS.aspect_ratios))
    assert not np.array_equal(generate_anchors(linear, (64, 64)), _oracle(cfg, (64, 64)))


# ---------------------------------------------------------------- official Anchors / AnchorLabeler
OFFICIAL_SCRIPT = r"""
import json, sys
import numpy as np
spec = json.load(open(sys.argv[1]))
sys.path.insert(0, spec["edet"])
import tensorflow as tf
from tf2 import anchors
out = {}
for i, c in enumerate(spec["configs"]):
    a = anchors.Anchors(c["min_level"], c["max_level"], c["num_scales"], c["aspect_ratios"], c["anchor_scale"],
                        c["image_size"])
    out[f"{i}/anchors"] = a.boxes.numpy()
    lab = anchors.AnchorLabeler(a, c["num_classes"])
    cls, box, npos = lab.label_anchors(tf.constant(np.asarray(c["boxes"], np.float32)),
                                       tf.constant(np.asarray(c["classes"], np.float32)[:, None]))
    out[f"{i}/cls"] = np.concatenate([v.numpy().reshape(-1) for v in cls.values()])
    out[f"{i}/box"] = np.concatenate([v.numpy().reshape(-1, 4) for v in box.values()])
    out[f"{i}/npos"] = np.asarray(npos.numpy())
np.savez(spec["out"], **out)
"""


@pytest.mark.tf
def test_anchors_and_targets_equal_the_official_code(official, tmp_path):
    """Generated configurations (floats, pairs, 1-5 scales, per-level anchor_scale, non-square sizes),
    run by the official ``anchors.Anchors`` and ``AnchorLabeler`` in a subprocess: anchors bit for bit,
    class targets exactly, box targets within an ulp or two of the official coder's float32 log/div."""
    g = np.random.default_rng(2024)
    configs, ours = [], []
    for i in range(16):
        variant = ["d0", "lite0", "d7x", "d3"][i % 4]
        base = get_config(variant)
        a = _random_anchor_config(g, len(base.levels))
        if not a.official_scales:  # the official code takes num_scales: its octaves
            a = AnchorConfig(a.anchor_scale, octave_scales(a.num_scales), a.aspect_ratios)
        h, w = [(128, 128), (96, 160), (160, 96), (100, 70)][i % 4]
        cfg = get_config(variant, anchors=a)
        n_gt = int(g.integers(1, 8))
        y0, x0 = g.uniform(0, h * 0.8, n_gt), g.uniform(0, w * 0.8, n_gt)
        boxes = np.stack([y0, x0, np.minimum(h, y0 + g.uniform(4, h * 0.6, n_gt)),
                          np.minimum(w, x0 + g.uniform(4, w * 0.6, n_gt))], 1).astype(np.float32)
        classes = g.integers(1, 91, n_gt).astype(np.float32)
        d = a.to_dict()
        configs.append({"min_level": cfg.min_level, "max_level": cfg.max_level, "num_scales": a.num_scales,
                        "aspect_ratios": d["aspect_ratios"], "anchor_scale": d["anchor_scale"],
                        "image_size": f"{w}x{h}", "num_classes": 90, "boxes": boxes.tolist(),
                        "classes": classes.tolist()})
        ours.append((cfg, (h, w), boxes, classes))
    spec = {"edet": str(official / "efficientdet"), "configs": configs, "out": str(tmp_path / "official.npz")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "run.py").write_text(OFFICIAL_SCRIPT)
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "spec.json")], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    z = np.load(tmp_path / "official.npz")
    for i, (cfg, hw, boxes, classes) in enumerate(ours):
        anchors = generate_anchors(cfg, hw)
        np.testing.assert_array_equal(anchors, z[f"{i}/anchors"], err_msg=f"config {i}: {cfg.anchors.describe()}")
        t = assign_targets(torch.from_numpy(boxes), torch.from_numpy(classes), torch.from_numpy(anchors))
        np.testing.assert_array_equal(t.cls.numpy(), z[f"{i}/cls"], err_msg=f"config {i}")
        assert float(t.num_positives) == float(z[f"{i}/npos"])
        # box codes: log(h / ha) and (yc - yca) / ha in float32, where TF's log and ours may differ by an
        # ulp: measured at most 3e-8 (2 of 10912 codes of one config); 1e-6 is ~30 ulps of a code ~1
        np.testing.assert_allclose(t.box.numpy(), z[f"{i}/box"], rtol=0, atol=1e-6, err_msg=f"config {i}")


# -------------------------------------------------------------------------------- the record
def _save(state, cfg, path):
    atomic_write(path, weights_writer(state, cfg, path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_carry_anchors_names_and_size(tmp_path, suffix):
    cfg = get_config("lite0", image_size=(96, 128), anchors=PAIRS, class_names=["pole", "line", "part"])
    torch.manual_seed(0)
    model = EfficientDet(cfg)
    path = tmp_path / f"m{suffix}"
    _save(model.state_dict(), cfg, path)
    rec = load_weights_file(path).record
    assert rec["anchors"] == PAIRS and rec["class_names"] == ("pole", "line", "part") and rec["image_size"] == (96, 128)
    loaded = create_model("lite0", checkpoint=path)  # no anchor flag, no size, no class count
    assert loaded.config.anchors == PAIRS and loaded.config.image_size == (96, 128)
    assert loaded.config.class_names == ("pole", "line", "part") and loaded.config.num_classes == 3
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError) as e:
        create_model("lite0", checkpoint=path, anchors=AnchorConfig(anchor_scale=3.0))
    msg = str(e.value)
    assert str(path) in msg and "trained with anchors anchor_scale 3, scales [1, 1.414] (official octaves of 2), " \
        "aspect ratios [1, (1.5, 0.7), 0.4, 3]" in msg and "aspect ratios [1, 2, 0.5]" in msg
    with pytest.raises(CheckpointError, match="holds efficientdet-lite0 weights"):
        create_model("d0", checkpoint=path)


def test_a_plain_state_dict_loads_as_the_official_configuration(tmp_path):
    """Files without a record (earlier .pth, other tools) are official-configuration files."""
    torch.manual_seed(0)
    model = EfficientDet(get_config("d0", num_classes=5, image_size=64))
    torch.save(model.state_dict(), tmp_path / "old.pth")
    loaded = create_model("d0", checkpoint=tmp_path / "old.pth")
    assert loaded.config.anchors == get_config("d0").anchors and loaded.config.num_classes == 5
    assert load_weights_file(tmp_path / "old.pth").record is None


def test_a_damaged_record_is_one_error_naming_the_field(tmp_path):
    cfg = get_config("d0", num_classes=2, image_size=64)
    state = EfficientDet(cfg).state_dict()
    from effdet_torch.checkpoint import model_record

    for field, value, words in (("anchors", {"aspect_ratios": [[1.0]]}, "anchors: aspect ratios"),
                                ("num_classes", "two", "num_classes: expected"),
                                ("format", "other/1", "has format 'other/1'"),
                                ("image_size", "big", "image_size: expected")):
        rec = model_record(cfg)
        rec[field] = value
        torch.save({"state_dict": state, "effdet": rec}, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError) as e:
            create_model("d0", checkpoint=tmp_path / "bad.pth")
        assert str(tmp_path / "bad.pth") in str(e.value) and words in str(e.value)


def test_fine_tuning_from_other_anchors_resets_only_the_predictors(tmp_path):
    """An official-configuration checkpoint into a run with 8 anchors per location and 3 classes: both
    predictors change shape and keep their initialisation, with one message each; everything else loads."""
    torch.manual_seed(0)
    src = EfficientDet(get_config("d0", image_size=64))
    torch.save(src.state_dict(), tmp_path / "coco.pth")
    run = EfficientDet(get_config("d0", image_size=64, anchors=PAIRS, class_names=["a", "b", "c"]))
    init = {k: v.clone() for k, v in run.state_dict().items()}
    notes = load_pretrained(run, tmp_path / "coco.pth")
    assert len(notes) == 3, notes
    assert "class predictor (class_net.predict) is reset (checkpoint 9 anchors x 90 classes, this model 8 anchors " \
           "x 3 classes)" in notes[0]
    assert "box predictor (box_net.predict) is reset (checkpoint 9 anchors x 4 box codes, this model 8 anchors x 4" \
        in notes[1]
    assert "trained with anchors anchor_scale 4" in notes[2]
    for k, v in run.state_dict().items():
        if k.startswith(("class_net.predict.", "box_net.predict.")) and "depthwise" not in k:
            assert torch.equal(v, init[k]), k
        else:
            assert torch.equal(v, src.state_dict()[k]), k
    # same anchor count, other anchors: nothing reset, one message that the regressions start elsewhere
    same = EfficientDet(get_config("d0", image_size=64, anchors=AnchorConfig(anchor_scale=3.0)))
    notes = load_pretrained(same, tmp_path / "coco.pth")
    assert len(notes) == 1 and "this run uses anchor_scale 3" in notes[0]


# ------------------------------------------------------------------------- official --hparams
def test_hparams_string_and_yaml(tmp_path):
    hp = parse_hparams("aspect_ratios=1.0*2.0*0.5*4.0,num_scales=2,anchor_scale=3.0,num_classes=7", "d0")
    assert hp.anchors == AnchorConfig(3.0, octave_scales(2), (1.0, 2.0, 0.5, 4.0)) and hp.num_classes == 7
    assert hp.config("d0").num_anchors == 8
    y = tmp_path / "config.yaml"  # an official run's config.yaml: the whole config, tuples tagged
    y.write_text("name: efficientdet-d0\nimage_size: !!python/tuple\n- 320\n- 256\nnum_classes: 3\n"
                 "aspect_ratios:\n- 1.0\n- [1.5, 0.7]\nnum_scales: 3\nanchor_scale: 4.0\nmin_level: 3\nmax_level: 7\n"
                 "label_map: {1: pole, 2: line, 3: part}\nmoving_average_decay: 0.9998\n")
    hp = parse_hparams(str(y), "d0")
    assert hp.anchors.aspect_ratios == (1.0, (1.5, 0.7)) and hp.image_size == (320, 256)
    assert hp.class_names == ("pole", "line", "part") and hp.num_classes == 3
    for bad, words in (("max_level=8", "max_level 8 differs from efficientdet-d0's 7"),
                       ("num_classes=zero", "num_classes must be a whole number"),
                       ("aspect_ratios=-1.0*2.0", "aspect ratios must be positive"),
                       ("nonsense", "expected k=v")):
        with pytest.raises(ValueError, match=words):
            parse_hparams(bad, "d0")


def test_hparams_for_official_scripts():
    assert hparams_for(get_config("d0")) == ("", {})
    s, d = hparams_for(get_config("d0", num_classes=7, anchors=AnchorConfig(3.0, octave_scales(2), (1.0, 2.0, 4.0))))
    assert s == "num_classes=7,num_scales=2,anchor_scale=3.0,aspect_ratios=1.0*2.0*4.0"
    assert parse_hparams(s, "d0").config("d0") == get_config("d0", num_classes=7,
                                                              anchors=AnchorConfig(3.0, octave_scales(2), (1.0, 2.0, 4.0)))
    s, d = hparams_for(get_config("d0", anchors=PAIRS, image_size=(256, 320)))
    assert s is None and d["aspect_ratios"] == [1.0, [1.5, 0.7], 0.4, 3.0] and d["image_size"] == "320x256"
    with pytest.raises(ValueError, match="not the official octaves"):
        hparams_for(get_config("d0", anchors=AnchorConfig(scales=(1.0, 1.5, 2.5))))


# ----------------------------------------------------------------------- the seed's project file
def test_project_anchor_fields():
    official = get_config("d0").anchors
    seed_default = {"anchors_scales": [2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)],
                    "anchors_ratios": [[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]]}
    assert project_anchors(seed_default, "d0") == official == project_anchors({}, "d0")
    custom = {"anchors_scales": [1.0, 1.5, 2.5], "anchors_ratios": [[1.0, 1.0], [2.0, 1.0], [4.0, 0.5]]}
    a = project_anchors(custom, "d0")
    assert a.scales == (1.0, 1.5, 2.5) and not a.official_scales
    assert a.aspect_ratios == ((1.0, 1.0), (2.0, 1.0), (4.0, 0.5))  # (2, 1) has area 2: a pair, not ratio 2
    assert project_anchors({"anchors_scales": [1.0, 2 ** 0.5]}, "d0").scales == octave_scales(2)
    assert project_anchors({"anchor_scale": 3.0}, "d7").anchor_scale == 3.0
    assert project_anchors({}, "d7").anchor_scale == 5.0


def test_tf_formats_refuse_anchors_the_official_code_cannot_build(tmp_path, capsys):
    from effdet_cli.export import main as export_main

    cfg = get_config("d0", image_size=64, anchors=AnchorConfig(scales=(1.0, 1.5, 2.5)), num_classes=2)
    _save(EfficientDet(cfg).state_dict(), cfg, tmp_path / "c.pth")
    assert export_main(["tf1", "--variant", "d0", "--weights", str(tmp_path / "c.pth"), "-o", str(tmp_path / "tf1")]) == 1
    err = capsys.readouterr().err
    assert "not the official octaves" in err and err.count("\n") == 1
    assert not (tmp_path / "tf1").exists()


def test_tf_formats_write_the_yaml_form_for_pairs(tmp_path, capsys):
    from converters.convert import convert_checkpoint
    from effdet_cli.export import main as export_main

    cfg = get_config("d0", image_size=64, anchors=PAIRS, num_classes=2)
    torch.manual_seed(0)
    state = EfficientDet(cfg).state_dict()
    _save(state, cfg, tmp_path / "p.pth")
    assert export_main(["h5", "--variant", "d0", "--weights", str(tmp_path / "p.pth"), "-o", str(tmp_path / "p.h5")]) == 0
    out = capsys.readouterr().out
    yml = tmp_path / "p.yaml"
    assert f"--hparams={yml}" in out and yml.is_file()
    hp = parse_hparams(str(yml), "d0")
    assert hp.anchors == PAIRS and hp.num_classes == 2
    back = convert_checkpoint(tmp_path / "p.h5", "d0", anchors=hp.anchors).state_dict
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_convert_ckpt_hparams_records_the_head(tmp_path, capsys):
    """An official-format checkpoint trained with custom anchors: convert-ckpt --hparams reads it and
    records the configuration; the .pth then runs everywhere with no anchor flag."""
    from effdet_cli.convert import main as convert_main
    from effdet_cli.parity import main as parity_main

    y = tmp_path / "config.yaml"
    y.write_text("num_classes: 3\nnum_scales: 2\nanchor_scale: 3.0\naspect_ratios: [1.0, [1.5, 0.7], 0.4, 3.0]\n"
                 "label_map: {1: pole, 2: line, 3: part}\n")
    ck = tmp_path / "ck"
    assert parity_main(["synth-ckpt", "--variant", "d0", "--hparams", str(y), "--bn-stats", "auto", "-o", str(ck),
                        "-q"]) == 0
    assert convert_main(["--variant", "d0", "--weights", str(ck), "-o", str(tmp_path / "x.pth"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "box predictor has 8 anchors per location, this configuration 9" in err and "--hparams" in err
    assert convert_main(["--variant", "d0", "--weights", str(ck), "--hparams", str(y), "-o", str(tmp_path / "x.pth"),
                         "-q"]) == 0
    assert "scales [1, 1.414] (official octaves of 2)" in capsys.readouterr().out
    m = create_model("d0", checkpoint=tmp_path / "x.pth")
    assert m.config.anchors == PAIRS and m.config.class_names == ("pole", "line", "part")


# ------------------------------------------------------- an official recording with custom anchors
CUSTOM = Path(__file__).resolve().parents[1] / "golden" / "custom_anchors" / "efficientdet-d0"


@pytest.fixture(scope="module")
def custom_ckpt(tmp_path_factory) -> Path:
    """The weights of golden/custom_anchors/: the d0 rule, predictors shaped by its config.yaml."""
    from effdet_cli.parity import main as parity_main

    ck = tmp_path_factory.mktemp("custom") / "ck"
    assert parity_main(["synth-ckpt", "--variant", "d0", "--hparams", str(CUSTOM / "config.yaml"), "--bn-stats",
                        "auto", "-o", str(ck), "-q"]) == 0
    return ck


def test_official_recording_with_custom_anchors(custom_ckpt, tmp_path, capsys):
    """The official model run with ``--hparams config.yaml`` (num_scales 2, anchor_scale 3.0, aspect
    ratios with a pair, 7 classes; golden/custom_anchors/): every key passes ``effdet-parity golden``,
    the anchors bit for bit; the same weights under another anchor_scale (same count) fail at the
    anchors and downstream of them."""
    from effdet_cli.parity import main as parity_main

    ck = custom_ckpt
    report = tmp_path / "r.json"
    assert parity_main(["golden", "--variant", "d0", "--weights", str(ck), "--hparams", str(CUSTOM / "config.yaml"),
                        "--golden", str(CUSTOM / "tensors.npz"), "--json", str(report)]) == 0
    res = json.loads(report.read_text())
    assert len(res) == 89 and res["anchors"]["max_abs_err"] == 0.0 and res["anchors"]["shape"] == [10912, 4]
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text((CUSTOM / "config.yaml").read_text().replace("anchor_scale: 3.0", "anchor_scale: 4.0"))
    capsys.readouterr()
    assert parity_main(["golden", "--variant", "d0", "--weights", str(ck), "--hparams", str(wrong),
                        "--golden", str(CUSTOM / "tensors.npz"), "--json", str(report)]) == 1
    res = json.loads(report.read_text())
    failed = {k for k, v in res.items() if v["verdict"] == "FAIL"}
    assert {"anchors", "random/pre_nms/boxes", "detections/chelsea/boxes"} <= failed
    assert not any("/backbone/" in k or "/class_net/" in k for k in failed)  # the network itself is the same


def test_official_training_step_with_custom_anchors(custom_ckpt, tmp_path, capsys):
    """One official train_step with the same config (golden/custom_anchors/efficientdet-d0/train: targets
    by the official AnchorLabeler, losses, weights after the step): ``effdet-parity train-golden``
    passes every key; run under the official anchors it is refused before anything is compared."""
    from effdet_cli.parity import main as parity_main

    report = tmp_path / "t.json"
    args = ["train-golden", "--variant", "d0", "--weights", str(custom_ckpt), "--golden", str(CUSTOM / "train"),
            "--json", str(report), "--quiet"]
    assert parity_main(args + ["--hparams", str(CUSTOM / "config.yaml")]) == 0
    res = json.loads(report.read_text())
    assert res["anchors"]["max_abs_err"] == 0.0 and res["targets/cls_targets/level3"]["max_abs_err"] == 0.0
    assert all(v["verdict"] == "pass" for v in res.values()) and len(res) > 400
    wrong = tmp_path / "wrong.yaml"  # the same anchor count, another anchor_scale: the weights load, the run is refused
    wrong.write_text((CUSTOM / "config.yaml").read_text().replace("anchor_scale: 3.0", "anchor_scale: 4.0"))
    capsys.readouterr()
    assert parity_main(args + ["--hparams", str(wrong), "--force"]) == 1
    err = capsys.readouterr().err
    assert "recorded with anchors anchor_scale 3" in err and "the model has anchor_scale 4" in err


def test_live_compare_with_custom_anchors(official, custom_ckpt, tmp_path):
    """``effdet-parity compare --hparams`` with the official model built from the same config.yaml
    (needs --automl-dir): every tap passes, the anchors bit for bit."""
    from effdet_cli.parity import main as parity_main

    out = tmp_path / "report"
    assert parity_main(["compare", "--variant", "d0", "--weights", str(custom_ckpt), "--hparams",
                        str(CUSTOM / "config.yaml"), "--automl-dir", str(official), "--random", "--image-size",
                        "256", "--coarse", "--no-pictures", "--no-progress", "--quiet", "-o", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    anchors = next(t for t in rep["taps"] if t["name"] == "anchors")
    assert rep["passed"] and anchors["max_abs_err"] == 0.0 and anchors["shape"] == [10912, 4]
    assert rep["meta"]["config_overrides"]["aspect_ratios"] == [1.0, [1.5, 0.7], 0.4, 3.0]
