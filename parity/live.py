"""Live parity: run the official model (in a subprocess, from the user's google/automl checkout) and
ours on the same input, compare every tap, and report; or compare against recorded goldens.

The official side runs in :mod:`parity.official_worker` (one Keras model per process; TensorFlow never
enters this process). Its taps come back as an ``.npz`` in the golden key scheme, plus the detailed
taps, the official layer names and provenance.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from converters.convert import official_num_classes
from converters.sources import CheckpointError, open_checkpoint, safe_extract
from effdet_torch.config import AnchorConfig
from effdet_torch.files import sha256_file

from .compare import compare_reference
from .official_worker import OFFICIAL_FILES, PROGRESS_PREFIX
from .references import load_npz, sibling_heads  # noqa: F401  (re-exported: the live commands read goldens too)

__all__ = ["Case", "OfficialError", "OfficialRun", "case_name", "compare_against", "detect_num_classes",
           "load_npz", "official_run", "prepare_official_ckpt", "sibling_heads"]

REPO = Path(__file__).resolve().parents[1]


class OfficialError(RuntimeError):
    """The official side could not run (bad --automl-dir, missing TensorFlow, loader error, …)."""


@dataclass
class Case:
    name: str
    kind: str  # 'random' or 'image'
    seed: int = 1234
    path: str | None = None


@dataclass
class OfficialRun:
    tensors: dict[str, np.ndarray]
    meta: dict
    secs: float


def case_name(path: str | os.PathLike) -> str:
    """A case name from an image file name (``chelsea.png`` → ``chelsea``)."""
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(path).stem).strip("_") or "image"
    return stem if stem != "random" else "random_image"


def detect_num_classes(ckpt: str | os.PathLike, variant: str, anchors: AnchorConfig | None = None) -> int | None:
    """Classes of an official checkpoint (None if unreadable or without a class head)."""
    try:
        with open_checkpoint(ckpt) as src:
            return official_num_classes(src, variant, anchors)
    except (CheckpointError, OSError):
        return None


def official_anchor_fields(anchors: AnchorConfig) -> dict:
    """The official config's anchor fields for ``anchors`` (``ValueError`` for scales the official
    code cannot build: not the octaves of any ``num_scales``)."""
    if not anchors.official_scales:
        raise ValueError(f"anchor scales {list(anchors.scales)} are not official octaves: the official model cannot "
                         "be built with these anchors")
    a = anchors.anchor_scale
    return {"num_scales": anchors.num_scales, "anchor_scale": list(a) if isinstance(a, tuple) else a,
            "aspect_ratios": [list(r) if isinstance(r, tuple) else r for r in anchors.aspect_ratios]}


def prepare_official_ckpt(ckpt: str | os.PathLike, tmp: Path) -> str:
    """A path the official loader takes: TF1 dir/prefix or ``.h5`` as is; a release tarball is
    extracted (safely) into ``tmp``. A converted ``.pth``/``.safetensors`` is refused."""
    p = str(ckpt)
    low = p.lower()
    if low.endswith((".pth", ".pt", ".safetensors")):
        raise OfficialError(f"{p}: the official model needs an official checkpoint (TF1 dir/prefix, release "
                            "tarball or Keras .h5), not a converted torch file")
    if low.endswith((".tar.gz", ".tgz", ".tar")):

        safe_extract(p, tmp)
        dirs = sorted({q.parent for q in Path(tmp).rglob("*.index")})
        if len(dirs) != 1:
            raise OfficialError(f"{p}: expected one checkpoint (*.index) in the archive, found {len(dirs)}")
        return str(dirs[0])
    if not Path(p).exists() and not Path(p + ".index").exists():
        raise OfficialError(f"{p}: no such checkpoint")
    return str(Path(p).resolve()) if Path(p).exists() else str(Path(p).parent.resolve() / Path(p).name)


def official_run(automl_dir: str | os.PathLike, variant: str, ckpt: str | os.PathLike, cases: list[Case],
                 image_size: tuple[int, int], num_classes: int | None = None, eval_detections: bool = True,
                 on_progress: Callable[[dict], None] | None = None, python: str | None = None,
                 log_path: str | os.PathLike | None = None, anchors: AnchorConfig | None = None) -> OfficialRun:
    """Run the official model on ``cases`` in a subprocess; returns its taps and provenance. ``anchors``
    (other than the official ones) are handed to the official config as its ``num_scales``,
    ``anchor_scale`` and ``aspect_ratios`` (what ``--hparams`` would set there)."""
    automl = Path(automl_dir).expanduser().resolve()
    if not (automl / "efficientdet" / "tf2" / "efficientdet_keras.py").is_file():
        raise OfficialError(f"--automl-dir {automl}: no efficientdet/tf2/efficientdet_keras.py "
                            "(expected a google/automl checkout)")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="effdet-parity-") as td:
        tdir = Path(td)
        ck = prepare_official_ckpt(ckpt, tdir / "ckpt")
        if num_classes is None:
            num_classes = detect_num_classes(ck, variant, anchors)
        spec_cases = []
        for c in cases:
            if c.kind == "random":
                x = np.random.default_rng(c.seed).standard_normal((1, image_size[0], image_size[1], 3)).astype(np.float32)
                np.savez(tdir / f"{c.name}_input.npz", **{"input/random": x})
                spec_cases.append({"name": c.name, "kind": "random", "input_npz": str(tdir / f"{c.name}_input.npz")})
            else:
                if not c.path or not Path(c.path).is_file():
                    raise OfficialError(f"{c.path}: no such image")
                spec_cases.append({"name": c.name, "kind": "image", "path": str(Path(c.path).resolve())})
        h, w = image_size
        spec = {
            "automl_dir": str(automl), "variant": variant, "ckpt": ck,
            "image_size": h if h == w else f"{w}x{h}",
            "num_classes": num_classes if num_classes not in (None, 90) else None,
            "cases": spec_cases, "eval_detections": eval_detections,
            "anchors": None if anchors is None else official_anchor_fields(anchors),
            "out": str(tdir / "official.npz"), "out_meta": str(tdir / "official.json"),
        }
        (tdir / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        env["TF_USE_LEGACY_KERAS"] = "1"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        log = Path(log_path) if log_path else tdir / "official_worker.log"
        with open(log, "w") as errf:
            proc = subprocess.Popen([python or sys.executable, "-m", "parity.official_worker", str(tdir / "spec.json")],
                                    stdout=subprocess.PIPE, stderr=errf, text=True, env=env, cwd=str(tdir))
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX) and on_progress is not None:
                    try:
                        on_progress(json.loads(line[len(PROGRESS_PREFIX):]))
                    except json.JSONDecodeError:
                        pass
            rc = proc.wait()
        if rc != 0 or not (tdir / "official.npz").is_file():
            tail = _log_tail(log)
            raise OfficialError(f"the official model failed (exit {rc}); last lines of its log:\n{tail}")
        with np.load(tdir / "official.npz") as z:
            tensors = {k: z[k] for k in z.files}
        meta = json.loads((tdir / "official.json").read_text())
        edet = automl / "efficientdet"  # provenance: the official files the worker ran (hashed here, not in TF's process)
        meta["official_files_sha256"] = {f: sha256_file(edet / f) for f in OFFICIAL_FILES if (edet / f).is_file()}
    return OfficialRun(tensors, meta, time.time() - t0)


def _log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines()
                 if not l.startswith(("I0000", "W0000", "WARNING: All log"))]
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def compare_against(model, ref: Mapping[str, np.ndarray], image_size: tuple[int, int] | None = None,
                    device: str = "cpu", strict: bool = False, heads_ref: Mapping[str, np.ndarray] | None = None,
                    layer_paths: Mapping[str, str] | None = None, detailed: bool = True):
    """Run ours on the inputs of ``ref`` and compare every tap; returns ``(stats, ours)``
    (:func:`parity.compare.compare_reference`: the noise is measured unless ``strict``)."""
    return compare_reference(model, ref, image_size=image_size, device=device, strict=strict, heads_ref=heads_ref,
                             layer_paths=layer_paths, detailed=detailed)
