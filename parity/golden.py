"""Golden check: run the converted model on the inputs of an official golden ``.npz`` and compare
every recorded key by the rules of :mod:`parity.rules` (one rule for every command and test).

- fp32 goldens (``shared/golden/<variant>/``): tensors within ``max(1e-4·(1 + max|official|),
  5·gap32)`` where ``gap32`` is our own fp32-vs-fp64 difference at the tap (a float64 copy of our
  model on the same input); ``pre_nms/classes0`` equal except argmax near-ties (official logit gap
  within the class-logit bound); detections matched one to one — our post-processing fed the
  OFFICIAL heads strictly (same class, ``|Δscore| <= 1e-5``, IoU ≥ 0.9999; it is bit-exact), and end
  to end by :mod:`parity.detections` (noise-aware gates, the official choice at near-ties, the rows
  our own fp32 run loses); both decide.
- float64 goldens (``shared/golden/fp64/``, recognised by the dtype of their inputs): our model runs
  in float64 on the recorded inputs; tensors within ``max(2**-50·(1 + max|official|), 10·noise64)``.

Every key of the file gets a result; inputs we are fed pass as *fed*. A deliberately broken model
(a BN epsilon, a flipped SAME pad, a fusion epsilon, an off-by-one nearest upsample) fails both rules
by orders of magnitude (``tests/test_fp64_parity.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from effdet_torch import files
from effdet_torch.model import EfficientDet

from .compare import compare_reference
from .detections import detection_summary
from .references import golden_cases, load_npz, sibling_heads
from .rules import REL_TOL, SCORE_TOL
from .verdicts import TapResult, box_iou, class_tie_result, match_detections, strict_fp32

# the verdict helpers are re-exported: ``parity.golden`` is where users and tests have found them
__all__ = ["REL_TOL", "SCORE_TOL", "TapResult", "box_iou", "class_tie_result", "format_results", "golden_cases",
           "load_npz", "match_detections", "run_golden", "strict_fp32", "write_json"]


def run_golden(model: EfficientDet, npz_path: str | os.PathLike, image_size: tuple[int, int] | None = None,
               seed: int = 1234, device: str | torch.device = "cpu",
               model64: EfficientDet | None = None) -> list[TapResult]:
    """Compare every key of the golden ``npz_path`` (fp32 or float64) by the rules of
    :mod:`parity.rules`, with our noise measured: the runner of ``effdet-parity compare``
    (:func:`parity.compare.compare_reference`) on the golden's own taps, in strict fp32 on CUDA.
    Cases whose official heads lie in a sibling ``.npz`` of the same folder get the
    post-processing-only check too. ``model64``: the float64 twin (see :func:`parity.compare.run_ours`).
    """

    ref = load_npz(npz_path)
    stats, _ = compare_reference(model, ref, image_size=image_size, device=device, detailed=False, seed=seed,
                                 heads_ref=sibling_heads(Path(npz_path), ref), model64=model64)
    return stats


def write_json(results: list[TapResult], path: str | os.PathLike) -> None:
    """One entry per compared npz key, keyed by that key."""
    data = {}
    for r in results:
        e = r.to_json()
        data[e.pop("key")] = e
    files.write_json(path, data)


def format_results(results: list[TapResult]) -> str:
    """A row per key: max abs error, relative error, the rule's tolerance, the measured noise and the
    allowance it gives (see :mod:`parity.rules`), verdict, note."""
    w = max([len(r.key) for r in results] + [10])
    f = lambda v: "—" if v is None else f"{v:.2e}"  # noqa: E731
    lines = [f"{'tap':<{w}}  {'max abs err':>11}  {'rel err':>9}  {'rule tol':>9}  {'noise':>9}  {'noise tol':>9}  "
             "verdict  note"]
    for r in results:
        lines.append(f"{r.key:<{w}}  {r.max_abs_err:>11.3e}  {r.max_rel_err:>9.2e}  {r.tolerance:>9.2e}  "
                     f"{f(r.noise):>9}  {f(r.noise_tol):>9}  {'pass' if r.passed else 'FAIL':<7}  {r.note}")
    n_fail = sum(not r.passed for r in results)
    lines += detection_summary(results)
    lines.append(f"{len(results)} keys compared, {len(results) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)
