"""Reading recorded references: the arrays of a golden ``.npz``, its input cases, and the official
heads that sibling files of the same folder hold."""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["GoldenError", "golden_cases", "load_npz", "sibling_heads"]


def golden_cases(keys: list[str]) -> list[str]:
    """Input cases of a golden file: 'random', every image with an ``input/<name>_raw_uint8`` and every
    preprocessed input without one (``input/<name>_preprocessed``, as the float64 recordings store it)."""
    cases = []
    if any(k == "input/random" or k.startswith(("random/", "detections/random/", "eval_detections/random/"))
           for k in keys):
        cases.append("random")
    images = {k[len("input/"):-len("_raw_uint8")] for k in keys if k.startswith("input/") and k.endswith("_raw_uint8")}
    images |= {k[len("input/"):-len("_preprocessed")] for k in keys
               if k.startswith("input/") and k.endswith("_preprocessed")}
    return cases + sorted(images)


class GoldenError(ValueError):
    """A golden recording cannot be read; the message names the file."""


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a recorded golden ``.npz`` (no pickled objects), or :class:`GoldenError`."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise GoldenError(f"{path}: not a readable .npz recording ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def sibling_heads(path: Path, ref: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Class/box outputs of the cases that ``ref`` records detections for but not heads, from the
    other ``.npz`` files of ``path``'s folder (``tensors_chelsea.npz`` records eval detections of the
    random case whose heads are in ``tensors*.npz``)."""
    cases = {k.split("/")[1] for k in ref if k.startswith(("detections/", "eval_detections/"))}
    missing = {c for c in cases if not any(k.startswith(f"{c}/class_net/level") for k in ref)}
    out: dict[str, np.ndarray] = {}
    if not missing:
        return out
    for p in sorted(path.parent.glob("*.npz")):
        if p.resolve() == path.resolve():
            continue
        try:
            z = np.load(p)
        except (OSError, ValueError):
            continue
        with z:
            for k in z.files:
                if k.split("/")[0] in missing and re.fullmatch(r"[^/]+/(class|box)_net/level\d+", k):
                    out.setdefault(k, z[k])
    return out
