"""``effdet-infer`` on images, folders and videos; bad inputs; atomic, non-clobbering outputs.

The model is d0 with the regenerated synthetic weights at image size 256, so the end-to-end JSON
of the ``chelsea`` PNG can be compared with the official detections recorded in
``golden/efficientdet-d0/tensors_chelsea.npz``.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effdet_torch.config import get_config
from converters.convert import convert_checkpoint, save_state_dict
from effdet_torch.coco_names import COCO_CATEGORIES, COCO_UNUSED_IDS, coco_class_name, label_map
from effdet_cli.infer import atomic_write, main as infer_main
from parity.golden import SCORE_TOL, match_detections

from .conftest import PROJECT_GOLDEN, REPO

SIZE = "256"


@pytest.fixture(scope="module")
def d0_dir(synth_ckpt_dir) -> Path:
    return synth_ckpt_dir("efficientdet-d0")


@pytest.fixture(scope="module")
def weights(d0_dir, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("weights") / "efficientdet-d0.pth"
    save_state_dict(convert_checkpoint(d0_dir, "d0").state_dict, p, get_config("d0"))
    return p


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (pip install -e .[test])")
    return skimage_data.chelsea()


@pytest.fixture(scope="module")
def pictures(chelsea, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pictures")
    Image.fromarray(chelsea).save(d / "chelsea.png")
    Image.fromarray(chelsea).save(d / "chelsea_q90.jpg", quality=90)
    (d / "README.txt").write_text("not a picture: folders take image/video files by extension\n")
    return d


def _run(*argv) -> int:
    return infer_main([str(a) for a in argv])


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def test_png_equals_the_official_detections(pictures, weights, tmp_path, capsys):
    """threshold 0: every valid row, matched to the official TF detections of the same image."""
    out = tmp_path / "out"
    assert _run(pictures / "chelsea.png", "--weights", weights, "--image-size", SIZE, "--threshold", "0",
                "-o", out, "--device", "cpu") == 0
    assert "chelsea.png: 100 detection(s)" in capsys.readouterr().out
    doc = _load(out / "chelsea.detections.json")
    assert (doc["width"], doc["height"]) == (451, 300)
    assert doc["model"]["image_size"] == [256, 256] and doc["model"]["variant"] == "efficientdet-d0"
    rows = doc["detections"]
    npz = np.load(PROJECT_GOLDEN / "efficientdet-d0" / "tensors_chelsea.npz")
    n = int(npz["detections/chelsea/valid_len"])
    yx = npz["detections/chelsea/boxes"][:n].astype(np.float64)
    ref_boxes = np.stack([np.clip(yx[:, 1], 0, 451), np.clip(yx[:, 0], 0, 300),
                          np.clip(yx[:, 3], 0, 451), np.clip(yx[:, 2], 0, 300)], 1)
    ref = {"boxes": ref_boxes, "scores": npz["detections/chelsea/scores"][:n],
           "classes": npz["detections/chelsea/classes"][:n]}
    ours = {"boxes": np.array([r["box"] for r in rows]), "scores": np.array([r["score"] for r in rows]),
            "classes": np.array([r["class_id"] for r in rows])}
    assert len(rows) == n
    m = match_detections(ref, ours, box_tol=1e-4 * (1 + 451) + 1e-3)  # + the JSON's 3-decimal rounding
    assert not m["bad_ref"] and not m["bad_ours"], m
    assert np.all(np.diff(ours["scores"]) <= SCORE_TOL)  # official order: descending score
    for r in rows:
        assert r["class_name"] == coco_class_name(r["class_id"])
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 <= x1 <= 451 and 0 <= y0 <= y1 <= 300
    img = np.asarray(Image.open(out / "chelsea.annotated.png"))
    assert img.shape == (300, 451, 3)
    assert not list(out.glob(".*"))  # no temporaries left


def test_threshold_folder_jpeg_and_official_weights(pictures, d0_dir, tmp_path, capsys):
    """A folder (non-pictures skipped), a JPEG output, weights converted on the fly from the TF1 dir."""
    out = tmp_path / "out"
    assert _run(pictures, "--weights", d0_dir, "--image-size", SIZE, "--threshold", "0.06", "-o", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "chelsea.annotated.png", "chelsea.detections.json",
        "chelsea_q90.annotated.jpg", "chelsea_q90.detections.json"]
    assert (out / "chelsea_q90.annotated.jpg").read_bytes()[:2] == b"\xff\xd8"
    for name in ("chelsea", "chelsea_q90"):
        doc = _load(out / f"{name}.detections.json")
        assert doc["threshold"] == 0.06 and doc["detections"]
        assert all(r["score"] >= 0.06 for r in doc["detections"])
    png = _load(out / "chelsea.detections.json")["detections"]
    npz = np.load(PROJECT_GOLDEN / "efficientdet-d0" / "tensors_chelsea.npz")
    assert len(png) == int((npz["detections/chelsea/scores"] >= 0.06).sum())
    assert (png[0]["class_id"], png[0]["class_name"]) == (29, "29")  # an unused COCO id: named by its id


def _bad_inputs(d: Path) -> dict[str, tuple[Path, str]]:
    good = d / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    (d / "notes.txt").write_text("hello\n")
    (d / "fake.png").write_text("hello, I am not a PNG\n")
    (d / "empty.png").write_bytes(b"")
    trunc = d / "trunc.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(trunc, quality=95)
    trunc.write_bytes(trunc.read_bytes()[:600])
    return {
        "text file": (d / "notes.txt", "not an image"),
        "text named .png": (d / "fake.png", "not an image"),
        "empty image": (d / "empty.png", "empty file (0 bytes)"),
        "truncated jpeg": (trunc, "cannot decode the image"),
        "missing": (d / "missing.png", "no such file"),
    }


@pytest.mark.parametrize("case", ["text file", "text named .png", "empty image", "truncated jpeg", "missing"])
def test_bad_input_one_line_nothing_written(tmp_path, weights, capsys, case):
    path, fault = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    # the good picture comes first: nothing is written for it either, inputs are read before any output
    assert _run(tmp_path / "good.png", path, "--weights", weights, "-o", out) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and fault in err
    assert not out.exists()


def test_existing_outputs_need_force(pictures, weights, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "chelsea.detections.json").write_text("mine")
    args = (pictures / "chelsea.png", "--weights", weights, "--image-size", SIZE, "-o", out)
    assert _run(*args) == 1
    err = capsys.readouterr().err
    assert "chelsea.detections.json already exists" in err and "--force" in err
    assert (out / "chelsea.detections.json").read_text() == "mine"
    assert not (out / "chelsea.annotated.png").exists()
    assert _run(*args, "--force") == 0
    assert _load(out / "chelsea.detections.json")["source"].endswith("chelsea.png")


def test_usage_errors(pictures, weights, capsys):
    png = pictures / "chelsea.png"
    assert _run(png, "--weights", weights, "--device", "cpu", "--half") == 2
    assert "--half (float16) needs a CUDA device" in capsys.readouterr().err
    assert _run(png, "--weights", weights, "--variant", "d9") == 2
    assert "Did you mean" in capsys.readouterr().err
    assert _run(png, "--threshold", "1.5") == 2
    assert "must be within [0, 1]" in capsys.readouterr().err


def test_wrong_weights_are_one_clear_error(pictures, weights, tmp_path, capsys):
    assert _run(pictures / "chelsea.png", "--weights", weights, "--variant", "d1", "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "holds efficientdet-d0 weights (its record), not efficientdet-d1" in err
    assert not (tmp_path / "o").exists()


def test_atomic_write_failure_leaves_nothing(tmp_path):
    final = tmp_path / "x.json"

    def half_then_fail(tmp: str) -> None:
        assert Path(tmp).parent == tmp_path and Path(tmp).name != final.name
        Path(tmp).write_text('{"half": ')
        assert not final.exists()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(final, half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_killed_leaves_no_file_under_the_final_name(tmp_path):
    final = tmp_path / "x.annotated.png"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from effdet_cli.infer import atomic_write\n"
        "def w(tmp):\n"
        "    Path(tmp).write_bytes(b'\\x89PNG half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write(Path({str(final)!r}), w)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert r.returncode == -signal.SIGKILL
    assert not final.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".x.annotated.png.") and n.endswith(".tmp") for n in left)


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------

def _write_clip(path: Path, frame: np.ndarray, n: int) -> None:
    import av

    h, w = frame.shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(frame, 4 * i, axis=1)), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video(chelsea, weights, tmp_path, capsys):
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install effdet-parity[video])")
    frame = np.asarray(Image.fromarray(chelsea).resize((161, 105)))  # odd sizes: H.264 output pads to even
    clip = tmp_path / "clip.mp4"
    _write_clip(clip, frame, 3)
    out = tmp_path / "out"
    assert _run(clip, "--weights", weights, "--image-size", SIZE, "--threshold", "0.05", "-o", out) == 0
    assert "clip.mp4: 3 frame(s)" in capsys.readouterr().out
    doc = _load(out / "clip.detections.json")
    assert doc["num_frames"] == 3 and len(doc["frames"]) == 3 and doc["fps"] == 10.0
    assert (doc["width"], doc["height"]) == (161, 105)
    assert [f["frame"] for f in doc["frames"]] == list(range(3))
    assert all(r["score"] >= 0.05 for f in doc["frames"] for r in f["detections"])
    with av.open(str(out / "clip.annotated.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape[:2] == (106, 162)
    assert not list(out.glob(".*"))
    assert _run(clip, "--weights", weights, "-o", out) == 1  # outputs exist
    assert "--force" in capsys.readouterr().err


def test_video_without_pyav_says_how_to_install(tmp_path, weights, monkeypatch, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")  # not empty: the PyAV check comes first
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    assert _run(clip, "--weights", weights, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install effdet-parity[video]" in err
    assert not (tmp_path / "out").exists()


def test_bad_video_one_line(tmp_path, weights, capsys):
    pytest.importorskip("av", reason="PyAV is not installed (pip install effdet-parity[video])")
    for name, data, fault in (("empty.mp4", b"", "empty file (0 bytes)"),
                              ("notes.mp4", b"hello, not a video\n", "not a readable video")):
        p = tmp_path / name
        p.write_bytes(data)
        assert _run(p, "--weights", weights, "-o", tmp_path / "out") == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(p) in err and fault in err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_on_cuda_close_to_float32(pictures, weights, tmp_path):
    png = pictures / "chelsea.png"
    assert _run(png, "--weights", weights, "--image-size", SIZE, "--threshold", "0.06", "--device", "cuda",
                "-o", tmp_path / "f32") == 0
    assert _run(png, "--weights", weights, "--image-size", SIZE, "--threshold", "0.06", "--device", "cuda",
                "--half", "-o", tmp_path / "f16") == 0
    a = _load(tmp_path / "f32" / "chelsea.detections.json")
    b = _load(tmp_path / "f16" / "chelsea.detections.json")
    assert b["model"]["dtype"] == "float16" and a["model"]["dtype"] == "float32"
    assert b["detections"] and b["detections"][0]["class_id"] == a["detections"][0]["class_id"]
    assert abs(b["detections"][0]["score"] - a["detections"][0]["score"]) < 5e-3
    assert np.abs(np.array(b["detections"][0]["box"]) - np.array(a["detections"][0]["box"])).max() < 2.0


# ---------------------------------------------------------------------------------------------
# COCO names
# ---------------------------------------------------------------------------------------------

def test_coco_label_map():
    assert len(COCO_CATEGORIES) == 80
    assert COCO_UNUSED_IDS == (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
    assert (coco_class_name(1), coco_class_name(17), coco_class_name(90)) == ("person", "cat", "toothbrush")
    assert coco_class_name(12) == "12" and coco_class_name(91) == "91"
    lm = label_map()
    assert list(lm) == list(range(1, 91)) and lm[88] == "teddy bear"
