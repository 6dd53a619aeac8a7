"""effdet-eval without COCO: the synthetic dataset generator, ids/categories/results conversion,
the exact candidate reduction, and the whole command end to end on CPU."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.coco import (
    COCO_METRIC_NAMES,
    CocoEvalImages,
    ap_per_class,
    category_mapping,
    format_per_class,
    check_annotations,
    check_scorable,
    coco_results,
    evaluate_coco,
    load_annotations,
    rows_to_array,
)
from effdet_torch.config import get_config
from effdet_cli.evaluate import OFFICIAL_VAL_AP, check_official
from effdet_cli.evaluate import main as eval_main
from evaluation.evaluate import ShardedBatchSampler, postprocess_reduced, reduce_candidates
from effdet_torch.anchors import generate_anchors
from effdet_torch.postprocess import postprocess_per_class
from fixtures.synthetic_coco import make_synthetic_coco
from fixtures.synthetic_coco import main as synth_main

REPO = Path(__file__).resolve().parents[1]
# Synthetic weights overflow exp() in box decoding on some anchors: numpy and pycocotools warn about
# the resulting inf boxes (the official code would produce the same); that noise is not the subject.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_synthetic_coco(out, num_images=4, seed=3)
    return out


@pytest.fixture(scope="module")
def d0_pth(synth_ckpt_dir, tmp_path_factory) -> Path:
    """The regenerated official-format d0 checkpoint, converted once to a .pth."""
    from effdet_torch.model import create_model

    model = create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"))
    path = tmp_path_factory.mktemp("w") / "d0.pth"
    torch.save(model.state_dict(), path)
    return path


# ------------------------------------------------------------------ the generator


def test_generator_is_deterministic_and_valid(tmp_path, synth):
    again = tmp_path / "again"
    assert synth_main([str(again), "--num-images", "4", "--seed", "3"]) == 0
    assert _digest(again) == _digest(synth), "same arguments must give byte-identical files"
    other = tmp_path / "other"
    make_synthetic_coco(other, num_images=4, seed=4)
    assert _digest(other) != _digest(synth)

    doc = load_annotations(synth / "annotations" / "instances_synthetic.json")
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = doc
    coco.createIndex()
    ids = sorted(coco.getImgIds())
    assert ids == [1000 + 7 * i for i in range(4)]
    assert [im["id"] for im in doc["images"]] != ids, "images are listed out of id order on purpose"
    assert {c["id"] for c in doc["categories"]} == {1, 3, 18, 44, 62}
    assert not coco.getAnnIds(imgIds=[1007]), "image 1 has no object"
    modes = set()
    for im in doc["images"]:
        from PIL import Image

        with Image.open(synth / "images" / im["file_name"]) as pil:
            assert pil.size == (im["width"], im["height"])
            assert im["width"] != im["height"]
            modes.add(pil.mode)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]])):
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert 0 < a["area"] <= w * h + 1e-6
    assert modes == {"RGB", "L"}, "grayscale images exercise the RGB conversion"


def test_custom_categories(tmp_path):
    ann = make_synthetic_coco(tmp_path, num_images=2, seed=0, custom_categories=True)
    doc = load_annotations(ann)
    assert sorted(c["id"] for c in doc["categories"]) == [101, 205, 307]


# ------------------------------------------------------------------ ids, categories, rows


def _doc():
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0}]}


def _set(path, value):
    def edit(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        if value is KeyError:
            del doc[last]
        else:
            doc[last] = value
    return edit


@pytest.mark.parametrize("edit, fault", [
    (_set(("images",), {}), "no 'images' list"),
    (_set(("images", 0), "a.jpg"), "images[0]: not an object"),
    (_set(("images", 0, "id"), "1"), "images[0]: 'id' must be an integer, got '1'"),
    (_set(("images", 0, "id"), True), "images[0]: 'id' must be an integer, got True"),
    (_set(("images", 0, "file_name"), KeyError), "images[0]: 'file_name' must be a file name, got None"),
    (lambda d: d["images"].append(dict(d["images"][0])), "images[1]: duplicate image id 1"),
    (_set(("categories",), {"id": 3}), "categories: must be a list, got dict"),
    (_set(("categories", 0, "name"), KeyError), "categories[0]: needs an integer 'id' and a 'name'"),
    (_set(("annotations", 0, "image_id"), None), "annotations[0]: 'image_id' must be an integer, got None"),
    (_set(("annotations", 0, "category_id"), 3.0), "annotations[0]: 'category_id' must be an integer, got 3.0"),
    (_set(("annotations", 0, "bbox"), [1, 2, 3]), "annotations[0]: 'bbox' must be [x, y, width, height], got [1, 2, 3]"),
    (_set(("annotations", 0, "bbox"), [1, 2, "3", 4]), "annotations[0]: 'bbox' must be [x, y, width, height]"),
    (_set(("annotations", 0, "area"), [12]), "annotations[0]: 'area' must be a number, got [12]"),
    (_set(("annotations", 0, "iscrowd"), 2), "annotations[0]: 'iscrowd' must be 0 or 1, got 2"),
])
def test_annotation_structure_errors_name_the_entry(edit, fault):
    """Every malformed entry is one ValueError naming the file and the entry (a fuzz of effdet-eval's
    input found 40 kinds of KeyError/TypeError tracebacks before these checks)."""
    check_annotations(_doc(), "f.json")  # the well-formed document passes
    doc = _doc()
    edit(doc)
    with pytest.raises(ValueError) as e:
        check_annotations(doc, "f.json")
    assert str(e.value).startswith("f.json: ") and fault in str(e.value), str(e.value)


@pytest.mark.parametrize("key, fault", [("id", "lacks 'id'"), ("area", "lacks 'area'"), ("iscrowd", "lacks 'iscrowd'")])
def test_scoring_needs_what_pycocotools_reads(key, fault):
    check_scorable(_doc(), "f.json")
    doc = _doc()
    del doc["annotations"][0][key]
    check_annotations(doc, "f.json")  # fine for training, which does not read it
    with pytest.raises(ValueError, match=f"^f.json: annotations\\[0\\]: {fault}, which COCO scoring reads"):
        check_scorable(doc, "f.json")
    doc = _doc()
    doc["annotations"].append(dict(doc["annotations"][0]))
    with pytest.raises(ValueError, match="annotations\\[1\\]: duplicate annotation id 7"):
        check_scorable(doc, "f.json")
    doc = _doc()
    del doc["categories"]
    with pytest.raises(ValueError, match="no 'categories'"):
        check_scorable(doc, "f.json")


def test_category_mapping():
    coco_cats = [{"id": i} for i in (1, 3, 18, 90)]
    m = category_mapping(coco_cats, 90, "auto")
    assert m[1] == 1 and m[3] == 3 and m[90] == 90 and m[2] == 2, "COCO: the 1-based class is the id"
    custom = [{"id": 205}, {"id": 101}, {"id": 307}]
    m = category_mapping(custom, 5, "auto")
    assert list(m) == [-1, 101, 205, 307, -1, -1], "custom: class i -> i-th id sorted, extra classes dropped"
    assert list(category_mapping(coco_cats, 90, "sorted")[1:5]) == [1, 3, 18, 90]
    assert category_mapping(custom, 90, "auto")[1] == 101, "ids outside 1..90 are not COCO ids"
    with pytest.raises(ValueError):
        category_mapping(custom, 3, "nope")


def test_category_mapping_by_recorded_names():
    cats = [{"id": 7, "name": "line"}, {"id": 3, "name": "pole"}, {"id": 9, "name": "part"}]
    m = category_mapping(cats, 3, "auto", class_names=["pole", "line", "part"])
    assert list(m) == [-1, 3, 7, 9], "a model trained here maps by the names it records"
    assert list(category_mapping(cats, 3, "auto", class_names=["pole", "line", "bolt"])) == [-1, 3, 7, 9], \
        "a name the file lacks: the id order, as before"
    assert list(category_mapping(cats, 3, "names", class_names=["pole", "line", "bolt"])) == [-1, 3, 7, -1]
    with pytest.raises(ValueError, match="records no names"):
        category_mapping(cats, 3, "names")


def test_ap_per_class_equals_the_official_unit_test():
    """google/automl coco_metric_test.py::test_mAP, the official per-class AP with a label map: GT car,
    truck, bicycle; a perfect car and a perfect truck detection, no bicycle: AP 2/3, AP_/car 1.0,
    AP_/truck 1.0, AP_/bicycle 0.0 (expected values from the official test, not from this code)."""
    doc = {"images": [{"id": 1, "file_name": "x.png", "width": 100, "height": 100}],
           "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "truck"}, {"id": 3, "name": "bicycle"}],
           "annotations": [  # the official [y1, x1, y2, x2] boxes as COCO [x, y, w, h], area 100 each
               {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "area": 100.0, "iscrowd": 0},
               {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 10, 5, 20], "area": 100.0, "iscrowd": 0},
               {"id": 3, "image_id": 1, "category_id": 3, "bbox": [30, 30, 20, 10], "area": 100.0, "iscrowd": 0}]}
    rows = np.array([[1, 10, 10, 10, 10, 0.6, 1], [1, 10, 10, 5, 20, 0.5, 2]], np.float32)
    cat_map = category_mapping(doc["categories"], 3, "sorted")
    scores = evaluate_coco(doc, rows, cat_map, [1], verbose=False)
    assert scores.stats[0] == pytest.approx(2.0 / 3.0)
    per = ap_per_class(scores, cat_map, None, doc["categories"])
    assert per == pytest.approx({"AP_/car": 1.0, "AP_/truck": 1.0, "AP_/bicycle": 0.0})
    assert ap_per_class(scores, cat_map, ["c", "t", "b"], doc["categories"]) == pytest.approx(
        {"AP_/c": 1.0, "AP_/t": 1.0, "AP_/b": 0.0}), "the model's recorded names win"
    assert "bicycle" in format_per_class(per) and format_per_class(per).splitlines()[1].split() == ["car", "100.000"]


def test_rows_and_results():
    boxes = np.array([[10, 20, 50, 80], [-5.5, 1.25, 3.0, 4.0]], np.float32)  # ymin xmin ymax xmax
    rows = rows_to_array(1000, boxes, np.array([0.9, 0.2], np.float32), np.array([3, 7], np.float32))
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows[0], [1000, 20, 10, 60, 40, np.float32(0.9), 3])
    np.testing.assert_array_equal(rows[1, 1:5], [1.25, -5.5, 2.75, 8.5])  # not clipped
    cat_map = category_mapping([{"id": 101}, {"id": 205}, {"id": 307}], 5, "sorted")
    res = coco_results(rows, cat_map)
    assert [r["category_id"] for r in res] == [307], "class 7 has no category and is dropped"
    assert res[0]["bbox"] == [20.0, 10.0, 60.0, 40.0] and res[0]["score"] == float(np.float32(0.9))
    big = coco_results(rows[:1], category_mapping([{"id": 3}], 90), image_ids=np.array([2 ** 25 + 1]))
    assert big[0]["image_id"] == 2 ** 25 + 1


def test_evaluate_coco_handles_empty_and_perfect(synth):
    doc = load_annotations(synth / "annotations" / "instances_synthetic.json")
    cat_map = category_mapping(doc["categories"], 90)
    ids = [im["id"] for im in doc["images"]]
    stats, text, _ = evaluate_coco(doc, np.zeros((0, 7), np.float32), cat_map, ids, verbose=False)
    assert stats.shape == (12,) and stats[0] == 0.0
    rows = np.array([[a["image_id"], *a["bbox"], 1.0, a["category_id"]] for a in doc["annotations"]], np.float32)
    stats, text, _ = evaluate_coco(doc, rows, cat_map, ids, verbose=False)
    assert stats[0] == pytest.approx(1.0) and "Average Precision" in text


def test_official_ap_table_is_the_official_readme(automl_dir):
    """OFFICIAL_VAL_AP against its source (needs --automl-dir): google/automl efficientdet/README.md,
    the AP^val column of the checkpoint table and the "mAP (float)" column of the lite table."""
    found = {}
    for line in (automl_dir / "efficientdet" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"EfficientDet-(D\d+x?|lite\d+x?)\b", cells[0])
        if m and m.group(1).startswith("D") and "[h5]" in cells[0]:  # the checkpoint table (11 columns)
            assert len(cells) == 11, line
            found[f"efficientdet-{m.group(1).lower()}"] = float(cells[7])
        elif m and m.group(1).startswith("lite") and "[ckpt]" in cells[0]:
            found[f"efficientdet-{m.group(1)}"] = float(cells[1])
    assert len(found) == 15 and found == OFFICIAL_VAL_AP


def test_check_official():
    """The ±0.1 AP rule around the table's value (d0 34.3, lite0 26.41: checked against the README above)."""
    assert check_official("d0", 0.3439)[0] and check_official("D0", 0.3421)[0]
    ok, msg = check_official("d0", 0.3445)
    assert not ok and "+0.15" in msg
    assert check_official("lite0", 0.2650)[0] and not check_official("lite0", 0.2630)[0]


def test_sharded_batches_cover_everything_once():
    for n, bs, world in ((7, 2, 2), (6, 4, 3), (1, 8, 2), (10, 3, 1)):
        parts = [ShardedBatchSampler(n, bs, r, world) for r in range(world)]
        seen = sorted(i for p in parts for b in p for i in b)
        assert seen == list(range(n))
        single = ShardedBatchSampler(n, bs).batches
        assert sorted(b for p in parts for b in p) == sorted(single), "same batch members as one process"


# ------------------------------------------------------------------ exact candidate reduction


def test_reduced_candidates_give_identical_detections():
    """Quantised logits (many exact ties at the top-5000 cut) and huge box codes."""
    cfg = get_config("d0", image_size=128)
    anchors = generate_anchors(cfg)
    g = torch.Generator().manual_seed(0)
    n = anchors.shape[0]
    cls = torch.round(torch.randn(n, cfg.num_classes, generator=g) * 4) / 4 - 2.0
    box = torch.randn(n, 4, generator=g) * 0.5
    full = postprocess_per_class(cfg, cls[None], box[None], torch.from_numpy(anchors), 1.7)[0]
    idx, c_r, b_r = reduce_candidates(cls, box, cfg.eval_max_nms_inputs)
    assert len(idx) < n
    kth = torch.topk(cls.reshape(-1), cfg.eval_max_nms_inputs).values[-1]
    assert int((cls == kth).sum()) > 1, "the test needs ties at the cut"
    rows = postprocess_reduced(cfg, 5, 1.7, c_r.numpy(), b_r.numpy(), anchors[idx.numpy()])
    ref = rows_to_array(5, full["boxes"], full["scores"], full["classes"])
    np.testing.assert_array_equal(rows, ref)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), c=st.integers(1, 12), k=st.integers(1, 400),
       levels=st.sampled_from([2, 5, 1000]), nan=st.booleans())
def test_reduce_candidates_is_the_definition(seed, n, c, k, levels, nan):
    """Oracle: the definition — the anchors holding a pair ``>=`` the k-th largest of all ``n·c``
    logits (one top-k over all of them), in anchor order. ``levels`` quantises the logits into
    few values (ties at the cut, many anchors sharing the k-th best logit); ``nan`` plants NaNs
    (a broken network: the minimum of the top k is then NaN, and no anchor is selected)."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.floor(torch.rand(n, c, generator=g) * levels)
    if nan:
        cls[torch.rand(n, c, generator=g) < 0.01] = float("nan")
    box = torch.randn(n, 4, generator=g)
    if n * c <= k:
        want = torch.arange(n)
    else:
        kth = torch.topk(cls.reshape(-1), k).values.min()
        want = torch.nonzero((cls >= kth).any(dim=1)).reshape(-1)
    idx, c_r, b_r = reduce_candidates(cls, box, k)
    assert torch.equal(idx, want)
    torch.testing.assert_close(c_r, cls[want], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(b_r, box[want])


def test_auto_process_counts_use_the_cpus_the_network_leaves(monkeypatch):
    """The documented rule (README "COCO evaluation"): a CPU network's threads take their cores;
    loader processes get up to 4 of the rest, the NMS pool half of the rest from 32 images on."""
    import evaluation.evaluate as ev

    monkeypatch.setattr(ev.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(ev.torch, "get_num_threads", lambda: 8)
    assert (ev.resolve_workers("auto", cpu), ev.resolve_post_workers("auto", 5000, cpu)) == (0, 0)
    monkeypatch.setattr(ev.torch, "get_num_threads", lambda: 4)
    assert (ev.resolve_workers("auto", cpu), ev.resolve_post_workers("auto", 5000, cpu)) == (4, 2)
    assert ev.resolve_post_workers("auto", 31, cpu) == 0  # too little work to pay for spawning
    assert (ev.resolve_workers("auto", gpu), ev.resolve_post_workers("auto", 5000, gpu)) == (4, 4)
    assert (ev.resolve_workers(3, cpu), ev.resolve_post_workers(5, 10, cpu)) == (3, 5)  # given: as given


# ------------------------------------------------------------------ the command, end to end


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "effdet_cli.evaluate", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300, **kw)


def test_effdet_eval_end_to_end(synth, d0_pth, tmp_path):
    ann = synth / "annotations" / "instances_synthetic.json"
    out = tmp_path / "results.json"
    metrics = tmp_path / "metrics.json"
    p = _run_cli(["--variant", "d0", "--weights", str(d0_pth), "--images", str(synth / "images"),
                  "--annotations", str(ann), "--image-size", "128", "--batch-size", "2", "--workers", "2",
                  "--out", str(out), "--metrics-out", str(metrics)])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [l for l in p.stdout.splitlines() if l.strip().startswith(("Average Precision", "Average Recall"))]
    assert len(lines) == 12, p.stdout
    assert all(n in p.stdout for n in COCO_METRIC_NAMES)
    assert "images/s" in p.stderr, "progress bar with images/s"
    res = json.loads(out.read_text())
    doc = load_annotations(ann)
    assert res and {r["image_id"] for r in res} <= {im["id"] for im in doc["images"]}
    per_image = {}
    for r in res:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
        assert 1 <= r["category_id"] <= 90 and 0.001 < r["score"] <= 1 and len(r["bbox"]) == 4
    assert len(per_image) == 4 and max(per_image.values()) <= 100
    m = json.loads(metrics.read_text())
    assert m["images"] == 4 and m["detections"] == len(res) and set(m["metrics"]) == set(COCO_METRIC_NAMES)
    names = {c["name"] for c in doc["categories"]}
    assert set(m["per_class"]) == {f"AP_/{n}" for n in names}
    out_lines = p.stdout.splitlines()
    head = next(i for i, l in enumerate(out_lines) if l.split() == ["class", "AP"])  # the per-class table
    assert {l.split()[0] for l in out_lines[head + 1:head + 1 + len(names)]} == names, p.stdout
    assert all(-1 <= v <= 1 for v in m["per_class"].values())

    # the written JSON scores the same as the in-memory float32 rows
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(ann))
    ev = COCOeval(gt, gt.loadRes(str(out)), "bbox")
    ev.evaluate(); ev.accumulate(); ev.summarize()
    np.testing.assert_allclose(ev.stats, [m["metrics"][k] for k in COCO_METRIC_NAMES], atol=1e-12)

    # the same run in-process with batch 1 and no workers: batch-size independent up to fp32 noise
    from evaluation.evaluate import detection_agreement

    out1 = tmp_path / "results1.json"
    assert eval_main(["--variant", "d0", "--weights", str(d0_pth), "--images", str(synth / "images"),
                      "--annotations", str(ann), "--image-size", "128", "--batch-size", "1", "--workers", "0",
                      "--max-images", "1", "--no-progress", "--out", str(out1)]) == 0
    res1 = json.loads(out1.read_text())
    assert {r["image_id"] for r in res1} == {1000}

    def rows_of(rs, ids):
        by = {}
        for r in rs:
            if r["image_id"] in ids:
                by.setdefault(r["image_id"], []).append([r["image_id"], *r["bbox"], r["score"], r["category_id"]])
        return {k: np.array(v) for k, v in by.items()}

    # measured (torch 2.14.1, 2 cores): 100 of 100 rows pair, 0 bad, max |Δscore| 6.6e-6 (core rule 1e-5),
    # max |Δbox| 6.0e-3 px. Margin: one row per side, as first measured elsewhere (99 of 100 paired;
    # the other decayed score moved by 1.0e-5, just over the core 1e-5: soft-NMS amplifies the ~5e-6
    # logit change another batch composition brings). A real difference moves many rows.
    agree = detection_agreement(rows_of(res, {1000}), rows_of(res1, {1000}))
    assert agree["rows_ref"] == agree["rows_ours"] == 100, agree
    assert agree["pairs"] >= 99 and agree["bad"] <= 2, agree


def test_effdet_eval_custom_ids_and_usage_errors(tmp_path, capsys):
    from effdet_torch.model import create_model

    ann = make_synthetic_coco(tmp_path / "c", num_images=2, seed=1, max_size=96, custom_categories=True)
    torch.manual_seed(0)
    model = create_model("d0", num_classes=3, image_size=64)
    with torch.no_grad():  # scores just above the 0.001 threshold: every class scores, NMS stays quick
        model.class_net.predict.conv_pw.bias.fill_(-6.0)
    w = tmp_path / "d0c3.pth"
    torch.save(model.state_dict(), w)
    out = tmp_path / "r.json"
    common = ["--variant", "d0", "--weights", str(w), "--images", str(tmp_path / "c" / "images"),
              "--image-size", "64", "--workers", "0", "--no-progress"]
    base = common + ["--annotations", str(ann)]
    assert eval_main(base + ["--out", str(out)]) == 0
    cats = {r["category_id"] for r in json.loads(out.read_text())}
    assert cats and cats <= {101, 205, 307}
    printed = capsys.readouterr().out
    assert "Average Precision" in printed
    # --expect-official refuses anything but full val2017 at the variant's size
    assert eval_main(base + ["--expect-official"]) == 2
    err = capsys.readouterr().err
    assert "full val2017" in err and "image size" in err and "90-class" in err
    # an image-info file (no annotations): detections are written, nothing is scored
    info = load_annotations(ann)
    info.pop("annotations")
    info_path = tmp_path / "image_info.json"
    info_path.write_text(json.dumps(info))
    out2 = tmp_path / "r2.json"
    assert eval_main(common + ["--annotations", str(info_path), "--out", str(out2)]) == 0
    assert json.loads(out2.read_text()) == json.loads(out.read_text())
    assert "nothing scored" in capsys.readouterr().out
    # a ground truth that cannot be scored fails before the network runs, in one line
    unscorable = load_annotations(ann)
    del unscorable["annotations"][0]["area"]
    bad_ann = tmp_path / "no_area.json"
    bad_ann.write_text(json.dumps(unscorable))
    assert eval_main(common + ["--annotations", str(bad_ann)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"effdet-eval: error: {bad_ann}: annotations[0]: lacks 'area', which COCO scoring reads (pycocotools)\n"
    assert "images" not in captured.out  # no evaluation started
    # a truncated image is one error line naming it, read in this process or in a loader worker (whose
    # exceptions come back with the worker's traceback in their message)
    damaged = tmp_path / "c" / "images" / sorted(os.listdir(tmp_path / "c" / "images"))[1]
    damaged.write_bytes(damaged.read_bytes()[:200])
    for workers in ("0", "2"):
        assert eval_main(base + ["--workers", workers]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"effdet-eval: error: {damaged}: cannot decode the image") and err.count("\n") == 1, err
    # missing image files are named
    (tmp_path / "c" / "images" / sorted(os.listdir(tmp_path / "c" / "images"))[0]).unlink()
    assert eval_main(base) == 1  # bad input
    assert "missing" in capsys.readouterr().err


def test_dataset_pads_like_official(synth):
    cfg = get_config("d0", image_size=(96, 128))
    ds = CocoEvalImages(load_annotations(synth / "annotations" / "instances_synthetic.json"), synth / "images",
                        cfg.image_size, cfg.mean_rgb, cfg.stddev_rgb, max_images=3)
    assert ds.image_ids == [1000, 1007, 1014]
    k, image_id, x, scale = ds[1]
    assert (k, image_id) == (1, 1007) and x.shape == (3, 96, 128) and x.dtype == torch.float32
    doc = load_annotations(synth / "annotations" / "instances_synthetic.json")
    im = next(i for i in doc["images"] if i["id"] == 1007)
    s = float(scale)
    assert s == pytest.approx(max(im["height"] / 96, im["width"] / 128), rel=1e-6)
