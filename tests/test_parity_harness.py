"""The parity harness without the official code: detailed taps, comparison and reports on the
bundled goldens, a deliberately broken model flagged at the right tap, the recording round trip
(record → golden check) and the side-by-side picture. The live tests are in test_parity_live.py."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from effdet_torch.taps import record_all_taps, record_taps, tap_modules
from effdet_cli.parity import main as cli_main
from parity.compare import first_divergence, official_layer_guess, run_ours, tap_family, tensor_stat
from parity.golden import run_golden
from parity.live import OfficialError, case_name, compare_against, load_npz, official_run, prepare_official_ckpt
from parity.record import is_golden_key, write_golden
from parity.report import Report, error_chart_png, format_summary, format_table, write_html, write_json
from parity.visualize import layout_size, pair_detections, render_comparison

from .breakages import flip_same_padding
from .conftest import PROJECT_GOLDEN

torch.set_grad_enabled(False)
D0 = PROJECT_GOLDEN / "efficientdet-d0"


@pytest.fixture(scope="module")
def d0_ckpt(synth_ckpt_dir) -> Path:
    return synth_ckpt_dir("efficientdet-d0")


@pytest.fixture(scope="module")
def d0(d0_model):
    """The session's d0 of the bundled goldens (conftest); tests that break it work on a copy."""
    return d0_model


@pytest.fixture(scope="module")
def golden_random() -> dict[str, np.ndarray]:
    return load_npz(D0 / "tensors_random.npz")


@pytest.fixture(scope="module")
def detailed_reference(d0, golden_random) -> dict[str, np.ndarray]:
    """A detailed run of the unbroken model on the golden's random input (every block/node/repeat)."""
    inputs = {"input/random": golden_random["input/random"]}
    ours = run_ours(d0, inputs, post=False).tensors  # the network taps are what is under test
    return {**inputs, **ours}


# ---------------------------------------------------------------------------------------- taps
def test_detailed_taps_names_order_and_modules(d0):
    x = torch.zeros(1, 3, 128, 128)
    with record_taps(d0) as coarse:
        d0(x)
    with record_all_taps(d0) as fine:
        d0(x)
    # The golden names are unchanged and still the default.
    assert all(re.fullmatch(r"(backbone|resample|fpn/cell\d|class_net|box_net)/level\d", k) for k in coarse)
    assert len(coarse) == 3 + 2 + 3 * 5 + 5 + 5
    assert set(coarse) <= set(fine)
    names = list(fine)
    assert names[0] == "backbone/stem" and names[1:17] == [f"backbone/block{i}" for i in range(16)]
    assert sum(k.startswith("fpn/cell0/fnode") for k in names) == 8
    assert sum("/repeat" in k for k in names) == 2 * 3 * 5
    # execution order: a cell's nodes before its outputs, level-major head repeats
    assert names.index("fpn/cell0/fnode7") < names.index("fpn/cell0/level3") < names.index("fpn/cell1/fnode0")
    assert names.index("class_net/repeat2/level3") < names.index("class_net/repeat0/level4")
    mods = tap_modules(d0)
    assert set(mods) == set(fine)
    assert mods["backbone/block5"] == "backbone.blocks.5"
    assert mods["fpn/cell1/fnode3"] == "fpn.cells.1.fnodes.3"
    for name, path in mods.items():  # every named module exists in the model
        head = path.split("+")[0]
        if head not in ("class_net.predict", "box_net.predict"):
            d0.get_submodule(head)
    # a head repeat tap is the activation of that repeat's BN output
    assert fine["class_net/repeat0/level3"].shape == (1, 64, 16, 16)


def test_tap_families_and_official_names():
    assert tap_family("random/fpn/cell1/fnode3") == "fpn/cell*/fnode*"
    assert tap_family("chelsea/class_net/repeat2/level7") == "class_net/repeat*/level*"
    assert tap_family("detections/chelsea/boxes") == "detections/boxes"
    assert tap_family("input/chelsea_preprocessed") == "input/preprocessed"
    assert official_layer_guess("backbone/block3", "efficientnet-b0") == "efficientnet-b0/blocks_3"
    assert official_layer_guess("fpn/cell2/fnode7", "efficientnet-b0") == "fpn_cells/cell_2/fnode7"
    assert official_layer_guess("box_net/repeat1/level5", "x") == "box_net/box-1 + box-1-bn-5"


def test_tensor_stat_rules():
    ref = np.array([[1.0, -2.0], [np.inf, 0.5]], np.float32)
    s = tensor_stat("t", ref, ref + np.float32(1e-4))
    assert s.passed and s.max_abs_err == pytest.approx(1e-4, rel=1e-2) and "non-finite" in s.note
    assert s.tolerance == pytest.approx(1e-4 * 3)
    assert not tensor_stat("t", ref, ref + np.float32(1e-3)).passed
    other = ref.copy()
    other[1, 0] = 5.0
    assert not tensor_stat("t", ref, other).passed
    assert not tensor_stat("t", ref, ref[:1]).passed  # shape
    assert tensor_stat("t", np.ones(4), np.ones(4)).cosine == pytest.approx(1.0)


# ------------------------------------------------------------------- comparison on goldens
def test_compare_and_report_on_golden(d0, golden_random, tmp_path):
    stats, ours = compare_against(d0, golden_random)
    assert stats and all(s.passed for s in stats), format_table(stats, only_failures=True)
    names = [s.key for s in stats]
    assert names.index("random/backbone/level3") < names.index("random/fpn/cell0/level3") < names.index(
        "random/class_net/level3") < names.index("random/pre_nms/boxes") < names.index("detections/random/boxes")
    assert all(s.cosine is None or s.cosine > 0.999999 for s in stats)
    rep = Report("efficientdet-d0", "golden", str(D0 / "tensors_random.npz"), "synthetic", stats, (256, 256),
                 ["random"], timings={"run": 1.0})
    write_json(rep, tmp_path / "report.json")
    write_html(rep, tmp_path / "report.html")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passed"] and data["first_divergence"] is None and data["n_failed"] == 0
    assert {f["family"] for f in data["families"]} >= {"backbone/level*", "fpn/cell*/level*", "detections/scores"}
    tap = data["taps"][0]
    assert set(tap) >= {"name", "shape", "max_abs_err", "max_rel_err", "cosine", "tolerance", "verdict"}
    page = (tmp_path / "report.html").read_text()
    assert "PASS" in page and "data:image/png;base64," in page and "random/box_net/level7" in page
    assert "PASS: " in format_summary(rep)
    assert error_chart_png(stats)[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_on_golden(d0_ckpt, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = cli_main(["compare", "--variant", "d0", "--ckpt", str(d0_ckpt), "--golden", str(D0 / "tensors_chelsea.npz"),
                   "--out", str(out), "--no-progress", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "PASS" in text and "family" in text
    assert (out / "report.json").is_file() and (out / "report.html").is_file()
    assert (out / "detections_chelsea.png").is_file()  # image cases get the side-by-side picture
    data = json.loads((out / "report.json").read_text())
    # eval detections of the random case are checked on the heads of the sibling golden file
    assert any(t["name"] == "eval_detections/random/scores" and t["verdict"] == "pass" for t in data["taps"])
    assert cli_main(["compare", "--variant", "d0", "--ckpt", str(d0_ckpt), "--no-progress"]) == 2  # no reference


def test_damaged_golden_is_one_error_line(d0_ckpt, tmp_path, capsys):
    """A truncated recording, or one holding pickled objects (never loaded: allow_pickle stays off),
    is one error line naming it from every command that reads goldens."""
    cut = tmp_path / "cut.npz"
    cut.write_bytes((D0 / "tensors_chelsea.npz").read_bytes()[:100_000])
    pickled = tmp_path / "pickled.npz"
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled.write_bytes((tmp_path / "obj.npy").read_bytes())
    for bad in (cut, pickled):
        for argv, cmd in ((["golden", "--variant", "d0", "--weights", str(d0_ckpt), "--golden", str(bad)], "golden"),
                          (["compare", "--variant", "d0", "--weights", str(d0_ckpt), "--golden", str(bad),
                            "-o", str(tmp_path / "rep"), "--no-progress"], "compare")):
            assert cli_main(argv) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"effdet-parity {cmd}: error: {bad}: not a readable .npz recording (")
            assert err.count("\n") == 1, err


# ------------------------------------------------------------------------ a broken model
BREAKAGES = {
    # name: (break, first tap vs the detailed reference, its module, first tap vs the coarse golden)
    "bn_eps_backbone": (lambda m: setattr(m.backbone.blocks[5].bn_dw, "eps", 1e-5),
                        "random/backbone/block5", "backbone.blocks.5", "random/backbone/level4"),
    "padding_flipped": (lambda m: flip_same_padding(m.backbone.blocks[3].conv_dw),
                        "random/backbone/block3", "backbone.blocks.3", "random/backbone/level3"),
    "bn_eps_bifpn_node": (lambda m: setattr(m.fpn.cells[1].fnodes[3].bn, "eps", 1e-5),
                          "random/fpn/cell1/fnode3", "fpn.cells.1.fnodes.3", "random/fpn/cell1/level3"),
    "bn_eps_head_repeat": (lambda m: setattr(m.class_net.bns[2][1], "eps", 1e-5),
                           "random/class_net/repeat2/level4", "class_net.convs.2+bns.2.1+act", "random/class_net/level4"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_broken_model_flagged_at_the_right_tap(name, d0, detailed_reference, golden_random, tmp_path):
    brk, want, module, want_coarse = BREAKAGES[name]
    broken = copy.deepcopy(d0)
    brk(broken)
    stats, _ = compare_against(broken, detailed_reference, strict=True)
    first = first_divergence(stats)
    assert first is not None and first.key == want and first.module == module
    assert first.max_abs_err > 5 * first.tolerance  # flagged by a wide margin, not by noise
    # everything before it passes: the harness localises, it does not just fail
    assert all(s.passed for s in stats[: stats.index(first)])
    # against the official golden (coarse taps only) the first divergence is the enclosing output
    stats_g, _ = compare_against(broken, golden_random, strict=True)
    assert first_divergence(stats_g).key == want_coarse
    if name == "padding_flipped":  # the report names and highlights it
        rep = Report("efficientdet-d0", "golden", "detailed reference", "synthetic", stats, (256, 256), ["random"])
        text = format_summary(rep)
        assert f"first divergence: {want}" in text and module in text and "FAIL" in text
        write_html(rep, tmp_path / "r.html")
        page = (tmp_path / "r.html").read_text()
        assert "class='first'" in page and "First divergence" in page
        assert "first divergence" in format_table(stats)


# --------------------------------------------------------------------- recording round trip
def test_record_round_trip(d0, d0_ckpt, detailed_reference, tmp_path, capsys):
    """The recorder, fed an official run, writes a golden that ``effdet-parity golden`` checks.

    The run handed to ``write_golden`` is the official one: both bundled official d0 recordings, in the
    key scheme the official worker returns. So the written arrays must be the official ones bit for
    bit, and the golden check of the written file compares our model with the official outputs (the
    COCO-eval path of the random case is left out: the same code as chelsea's, slow on a CPU).
    Detailed taps (per block / node / repeat) have no official recording here: ours stand in, with
    one of them shifted by 1.0, so what is asserted for them is that they are written apart and
    compared (the shifted one fails, the rest pass), not agreement with the official model.
    """
    official = {}
    for npz in ("tensors_random.npz", "tensors_chelsea.npz"):
        official.update({k: v for k, v in load_npz(D0 / npz).items() if not k.startswith("eval_detections/random/")})
    detailed = {k: v for k, v in detailed_reference.items() if not is_golden_key(k)}
    detailed["random/backbone/block7"] = detailed["random/backbone/block7"] + np.float32(1.0)
    meta = {"variant": "efficientdet-d0", "official_commit": "test", "image_size": [256, 256],
            "versions": {"tensorflow": "n/a"}, "load_report": {"loader": "test"}, "ckpt": str(d0_ckpt)}
    paths = write_golden(tmp_path / "rec", {**official, **detailed}, meta, detailed=True)
    z = np.load(paths["tensors"])
    assert set(z.files) == set(official)
    assert all(np.array_equal(z[k], official[k]) and z[k].dtype == official[k].dtype for k in z.files)
    zd = np.load(paths["detailed"])
    assert set(zd.files) == set(detailed)
    assert {"random/backbone/block15", "random/fpn/cell0/fnode0", "random/class_net/repeat2/level7"} <= set(zd.files)
    m = json.loads(paths["meta"].read_text())
    assert m["variant"] == "efficientdet-d0" and m["cases"] == ["chelsea", "random"]
    # 256 / 8 = 32 cells at level 3, 9 anchors x 90 classes
    assert m["tensors"]["random/class_net/level3"] == [[1, 32, 32, 810], "float32"]
    assert set(m["sha256_of_input_arrays"]) == {"input/random", "input/chelsea_raw_uint8", "input/chelsea_preprocessed"}
    assert "conventions" in m
    results = run_golden(d0, paths["tensors"])  # what `effdet-parity golden` runs: ours vs the official values
    assert {r.key for r in results} == set(official)
    assert all(r.passed for r in results), [r.key for r in results if not r.passed]
    assert not any("not compared" in r.note for r in results)
    # the detailed file adds the per-block/node/repeat taps to a golden comparison
    rc = cli_main(["compare", "--variant", "d0", "--ckpt", str(d0_ckpt), "--golden", str(paths["tensors"]),
                   "--golden", str(paths["detailed"]), "--out", str(tmp_path / "rep"), "--no-progress", "--quiet",
                   "--no-pictures"])
    assert rc == 1  # the shifted detailed tap
    verdicts = {t["name"]: t["verdict"] for t in json.loads((tmp_path / "rep" / "report.json").read_text())["taps"]}
    assert verdicts["random/backbone/block7"] != "pass"
    assert verdicts["random/backbone/block6"] == verdicts["random/fpn/cell1/fnode3"] == "pass"
    assert verdicts["random/backbone/level3"] == verdicts["chelsea/class_net/level3"] == "pass"
    capsys.readouterr()


# --------------------------------------------------------------------------- the picture
def test_visualize_from_golden(d0_ckpt, tmp_path, capsys):
    from PIL import Image
    from skimage import data

    img = data.chelsea()
    png = tmp_path / "chelsea.png"
    Image.fromarray(img).save(png)
    out = tmp_path / "vis.png"
    rc = cli_main(["visualize", str(png), "--variant", "d0", "--ckpt", str(d0_ckpt), "--golden",
                   str(D0 / "tensors_chelsea.npz"), "-o", str(out), "--top", "12"])
    assert rc == 0 and out.is_file()
    assert "100 matched within tolerance" in capsys.readouterr().out
    pic = Image.open(out)
    info = json.loads(pic.info["effdet-parity"])
    assert [p["name"] for p in info["panels"]] == ["official", "ours", "overlay"]
    assert tuple(pic.size) == tuple(info["size"]) == layout_size(img.shape[:2], info["table"]["rows"])
    assert info["table"]["rows"] == 12 and info["counts"]["matched"] == info["counts"]["official"] == 100
    rgb = np.asarray(pic.convert("RGB")).astype(int)
    for p in info["panels"]:  # each panel shows the image (thin boxes drawn over it)
        x0, y0, x1, y1 = p["box"]
        assert (x1 - x0, y1 - y0) == (img.shape[1], img.shape[0])
        assert np.median(np.abs(rgb[y0:y1, x0:x1] - img)) == 0
    x0, y0, x1, y1 = info["table"]["box"]
    assert (rgb[y0:y1, x0:x1] < 100).any()  # the table has text
    assert cli_main(["visualize", str(png), "--variant", "d0", "--ckpt", str(d0_ckpt), "--golden",
                     str(D0 / "tensors_random.npz")]) == 1  # bad input: the image is not in that golden


def test_pairing_and_unmatched_boxes_stand_out(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    boxes = np.array([[10, 10, 60, 80], [100, 120, 180, 200], [30, 150, 90, 230]], np.float32)
    off = {"boxes": boxes, "scores": np.array([0.9, 0.8, 0.7], np.float32),
           "classes": np.array([1, 17, 18], np.float32), "valid_len": np.array(3.0)}
    mine = {"boxes": boxes.copy(), "scores": off["scores"].copy(), "classes": off["classes"].copy(),
            "valid_len": np.array(3.0)}
    mine["boxes"][1] += 3.0  # same object, out of tolerance → near
    mine["classes"][2] = 3  # a different class → unmatched on both sides
    p = pair_detections(off, mine)
    assert [i for i, _, _ in p.matched] == [0] and [i for i, _, _ in p.near] == [1]
    assert p.official_only == [2] and p.ours_only == [2]
    img = (rng.random((240, 320, 3)) * 60).astype(np.uint8)
    info = render_comparison(img, off, mine, tmp_path / "p.png", title="synthetic")
    assert info["counts"] == {"matched": 1, "near": 1, "official_only": 1, "ours_only": 1, "official": 3, "ours": 3}
    rgb = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).astype(int)
    x0, y0, x1, y1 = info["panels"][2]["box"]
    overlay = rgb[y0:y1, x0:x1]
    red = (overlay[..., 0] > 200) & (overlay[..., 1] < 60) & (overlay[..., 2] < 80)
    magenta = (overlay[..., 0] > 200) & (overlay[..., 1] < 40) & (overlay[..., 2] > 200)
    assert red.sum() > 100 and magenta.sum() > 100  # thick boxes for the unmatched rows


# ----------------------------------------------------------- the official side, without it
def test_official_side_errors_are_clear(tmp_path, d0_ckpt):
    from parity.live import Case

    with pytest.raises(OfficialError, match="google/automl checkout"):
        official_run(tmp_path, "efficientdet-d0", d0_ckpt, [Case("random", "random")], (64, 64))
    with pytest.raises(OfficialError, match="not a converted torch file"):
        prepare_official_ckpt(tmp_path / "model.pth", tmp_path)
    assert case_name("/x/My Cat.v2.jpg") == "My_Cat_v2" and case_name("random.png") == "random_image"
    assert cli_main(["compare", "--variant", "d0", "--ckpt", str(d0_ckpt), "--automl-dir", str(tmp_path),
                     "--no-progress", "--out", str(tmp_path / "o")]) == 1  # bad input: not an automl checkout
