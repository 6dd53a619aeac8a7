"""Recorded reference data, shipped as package data so that installed commands find it too:
``manifests/`` (the official variables of all 15 variants), ``bn_stats/`` (BN moving-statistics
side-cars of the synthetic checkpoints), ``efficientdet-d0/`` (the bundled d0 goldens) and the d5/d7x
recordings of the detection rule. See README.md.

:func:`find` is the one lookup: ``$EFFDET_GOLDEN_DIR`` when set, else this folder, else the shared
recordings beside a checkout (``<checkout>/../shared/golden``).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["GOLDEN_ENV", "HERE", "golden_dirs", "find"]

GOLDEN_ENV = "EFFDET_GOLDEN_DIR"
HERE = Path(__file__).resolve().parent


def golden_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched, in order: ``explicit``, else ``$EFFDET_GOLDEN_DIR``, else this package's
    folder and ``<checkout>/../shared/golden``."""
    if explicit is not None:
        return [Path(explicit)]
    env = os.environ.get(GOLDEN_ENV)
    if env:
        return [Path(env)]
    return [HERE, HERE.parent.parent / "shared" / "golden"]


def find(*relative: str, explicit: str | os.PathLike | None = None, what: str = "golden file") -> Path:
    """The first existing ``<dir>/<relative>`` over :func:`golden_dirs` (several ``relative`` spellings are
    tried in order in each folder); ``FileNotFoundError`` naming every path tried otherwise."""
    tried = []
    for d in golden_dirs(explicit):
        for rel in relative:
            p = d / rel
            tried.append(p)
            if p.exists():
                return p
    raise FileNotFoundError(f"no {what}; tried: " + ", ".join(map(str, tried))
                            + f" (set {GOLDEN_ENV} or pass the folder / the file)")
