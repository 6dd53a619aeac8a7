"""The eval pipeline against the official COCO-eval-path recordings (``eval_detections/chelsea/*``).

1. The detections that ``run_eval`` produces for the chelsea image (written as a lossless PNG,
   decoded, preprocessed, batched network, reduced candidates, per-class soft-NMS) equal the
   official ones with the core tolerance (``parity.golden.match_detections``: same class,
   ``|Δscore| <= 1e-5``, boxes within ``1e-4·(1 + max|box|)``), and the official ``[K, 7]``
   ``generate_detections`` rows within the same box tolerance.
2. They are bit-identical to ``postprocess_per_class`` on the full (unreduced) network outputs.
3. AP from our detections == AP from the official recorded detections, on the same image and a
   ground truth derived from the official detections (so AP is far from 0 and moves with any
   changed score, class or box): all 12 numbers equal to 3 decimals (ΔAP = 0.000).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.coco import CocoEvalImages, category_mapping, evaluate_coco, rows_to_array
from effdet_torch.detector import Detector
from evaluation.evaluate import run_eval
from fixtures.synthetic_coco import annotations_from_detections
from parity.golden import REL_TOL, match_detections

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "efficientdet-d0" / "tensors_chelsea.npz"
SIZE = 256  # the goldens were recorded at image_size 256
IMAGE_ID = 1  # the official source_id of the chelsea case (generate_detections column 0)


@pytest.fixture(scope="module")
def npz():
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN} is missing")
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def d0(synth_ckpt_dir):
    from effdet_torch.model import create_model

    return create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"), image_size=SIZE)


def _official(npz) -> dict[str, np.ndarray]:
    n = int(npz["eval_detections/chelsea/valid_len"])
    return {k: npz[f"eval_detections/chelsea/{k}"][:n] for k in ("boxes", "scores", "classes")}


def _official_rows(npz) -> np.ndarray:
    """The official eval rows: ``transform_detections`` of the recorded ``generate_detections``."""
    n = int(npz["eval_detections/chelsea/valid_len"])
    g = np.asarray(npz["eval_detections/chelsea/generate_detections"], np.float32)[:n]
    assert (g[:, 0] == IMAGE_ID).all()
    out = g.copy()
    out[:, 3] = g[:, 3] - g[:, 1]
    out[:, 4] = g[:, 4] - g[:, 2]
    return out


@pytest.fixture(scope="module")
def chelsea_set(npz, tmp_path_factory):
    """A one-image COCO set: chelsea as PNG (lossless, decodes exactly) + pseudo ground truth."""
    root = tmp_path_factory.mktemp("chelsea")
    raw = npz["input/chelsea_raw_uint8"]
    (root / "images").mkdir()
    Image.fromarray(raw).save(root / "images" / "chelsea.png")
    doc = {"images": [{"id": IMAGE_ID, "file_name": "chelsea.png", "width": int(raw.shape[1]),
                       "height": int(raw.shape[0])}], "annotations": [], "categories": []}
    cat_map = category_mapping([], 90, "coco")
    doc = annotations_from_detections(doc, {IMAGE_ID: _official_rows(npz)}, cat_map)
    assert len(doc["annotations"]) >= 5
    (root / "instances.json").write_text(json.dumps(doc))
    return root, doc, cat_map


@pytest.fixture(scope="module")
def ours(d0, chelsea_set):
    root, doc, _ = chelsea_set
    cfg = d0.config
    ds = CocoEvalImages(doc, root / "images", cfg.image_size, cfg.mean_rgb, cfg.stddev_rgb)
    return run_eval(d0, ds, batch_size=1, num_workers=0, post_workers=0, progress=False)


def test_eval_path_equals_official_detections(npz, ours):
    ref = _official(npz)
    rows = ours.per_image[IMAGE_ID]
    assert len(rows) == len(ref["scores"]) == int(npz["eval_detections/chelsea/valid_len"])
    mine = {"boxes": np.stack([rows[:, 2], rows[:, 1], rows[:, 2] + rows[:, 4], rows[:, 1] + rows[:, 3]], 1),
            "scores": rows[:, 5], "classes": rows[:, 6]}
    box_tol = REL_TOL * (1 + float(np.abs(ref["boxes"]).max()))
    m = match_detections(ref, mine, box_tol)
    assert not m["bad_ref"] and not m["bad_ours"], m
    assert len(m["pairs"]) >= len(ref["scores"]) - len(m["ties"])
    # the official [K, 7] rows, column by column, on the matched pairs
    off = _official_rows(npz)
    pi = np.array([p[0] for p in m["pairs"]])
    pj = np.array([p[1] for p in m["pairs"]])
    d = np.abs(off[pi].astype(np.float64) - rows[pj].astype(np.float64))
    assert d[:, 0].max() == 0 and d[:, 6].max() == 0, "image id and class"
    assert d[:, 5].max() <= 1e-5, "score"
    assert d[:, 1:5].max() <= REL_TOL * (1 + float(np.abs(off[:, 1:5]).max())), "x, y, w, h"
    # boxes are scaled to the original image and NOT clipped (they reach far outside it)
    assert rows[:, 1].min() < 0 and (rows[:, 1] + rows[:, 3]).max() > npz["input/chelsea_raw_uint8"].shape[1]


def test_reduced_pipeline_is_bit_identical_to_full_postprocess(npz, d0, ours):
    det = Detector(d0, (SIZE, SIZE))([npz["input/chelsea_raw_uint8"]], per_class=True)[0]
    full = rows_to_array(IMAGE_ID, det["boxes"], det["scores"], det["classes"])
    np.testing.assert_array_equal(ours.per_image[IMAGE_ID], full)


@pytest.mark.parametrize("clip", [True, False], ids=["gt-clipped-to-image", "gt-unclipped"])
def test_ap_from_ours_equals_ap_from_official(npz, ours, chelsea_set, capsys, clip):
    _, doc, cat_map = chelsea_set
    if not clip:  # boxes as detected (far outside the image): AP high, every IoU threshold in play
        doc = annotations_from_detections(doc, {IMAGE_ID: _official_rows(npz)}, cat_map, clip=False)
    official_stats, _, _ = evaluate_coco(doc, _official_rows(npz), cat_map, [IMAGE_ID], verbose=False)
    our_stats, _, _ = evaluate_coco(doc, ours.rows, cat_map, ours.image_ids, verbose=False)
    assert official_stats[0] > 0.05 and official_stats[1] > 0.1, "the pseudo ground truth must make AP informative"
    delta = np.abs(np.round(our_stats, 3) - np.round(official_stats, 3))
    with capsys.disabled():
        print(f"\n[eval ΔAP chelsea, {'clipped' if clip else 'unclipped'} GT] official AP {official_stats[0]:.6f}, "
              f"ours {our_stats[0]:.6f}, "
              f"max |Δ| over the 12 numbers {np.abs(our_stats - official_stats).max():.2e}"
              f"\n  official {np.round(official_stats, 4).tolist()}\n  ours     {np.round(our_stats, 4).tolist()}")
    assert delta.max() == 0.0, (official_stats, our_stats)
