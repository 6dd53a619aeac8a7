"""Tap-by-tap comparison of our model with a reference run (the live official model, a recorded
golden, or another run of ours), in the key scheme of ``shared/golden/README.md``.

A *run* is a flat ``{key: numpy array}`` mapping: NHWC tensors ``<case>/backbone/block{i}``,
``<case>/fpn/cell{i}/fnode{j}``, ``<case>/class_net/repeat{r}/level{l}``, the golden keys
(``<case>/backbone/level{l}`` … ``<case>/box_net/level{l}``, ``<case>/pre_nms/*``,
``detections/<case>/*``, ``eval_detections/<case>/*``, ``anchors``) and the inputs (``input/random``,
``input/<img>_raw_uint8``, ``input/<img>_preprocessed``, ``<img>/image_scale``).

Tolerances: :mod:`parity.rules` — the one rule of every command. fp32: a tensor passes within
``max(1e-4·(1 + max|ref|), 5·gap32)``, ``gap32`` our own fp32-vs-fp64 difference at that tap (a
float64 copy of our model on the same input; taps passing only by it are marked ``fp32 noise`` /
``pass*``; ``--strict`` skips the measurement); decoded boxes also through the box-code bound;
``pre_nms/classes0`` equal except argmax near-ties; detections by :mod:`parity.detections` (strict on
the official heads; end to end with noise-aware gates, the official choice at near-ties, and the
rows our own fp32 run loses). A float64 reference is judged by the float64 rule (``10·noise64``).

Reported per tap: shape, max abs error, max relative error (= max abs error / max|ref|), cosine
similarity (flattened, float64), the rule's tolerance, the measured noise and its allowance, pass/fail. The first failing tap in execution
order is the first divergence; the report names the module (ours) and the layer (official) behind it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import torch

from effdet_torch.anchors import decode_boxes
from effdet_torch.detector import Detector
from effdet_torch.model import EfficientDet
from effdet_torch.postprocess import flatten_outputs, postprocess_global, postprocess_per_class, pre_nms_global
from effdet_torch.preprocess import preprocess_image
from effdet_torch.taps import record_taps, tap_modules

from .references import golden_cases
from .detections import DetectionNoise, aligned_detections, compare_detections, measure_detection_noise
from .rules import NOISE_FACTOR, REL_TOL, class_logit_bound, fp64_noise, is_float64_reference, tensor_bounds
from .verdicts import TapResult, class_tie_result, strict_fp32

__all__ = ["CaseHeads", "DecodeBounds", "OurRun", "TapStat", "compare_reference", "compare_runs", "first_divergence", "official_layer_guess",
           "decode_bounds", "run_ours", "tap_family", "tensor_stat"]


@dataclass
class TapStat(TapResult):
    """A :class:`~parity.verdicts.TapResult` with what the report shows beside it."""

    cosine: float | None = None  # None where it means nothing (counts, matched detections)
    family: str = ""
    module: str = ""  # ours: qualified module / function name
    official: str = ""  # official layer path / function


def _annotated(r: TapResult, family: str, module: str, official: str) -> TapStat:
    return TapStat(**asdict(r), family=family, module=module, official=official)


_INDEXED = re.compile(r"(block|cell|fnode|repeat|level)\d+")


def _split_case(key: str) -> tuple[str | None, str]:
    """``'random/fpn/cell0/level3'`` → ``('random', 'fpn/cell0/level3')``;
    ``'detections/chelsea/boxes'`` → ``('chelsea', 'detections/boxes')``."""
    parts = key.split("/")
    if parts[0] in ("detections", "eval_detections") and len(parts) >= 3:
        return parts[1], "/".join([parts[0]] + parts[2:])
    if parts[0] == "input" and len(parts) == 2:
        m = re.fullmatch(r"(.+)_(preprocessed|raw_uint8)", parts[1])
        if m:
            return m.group(1), f"input/{m.group(2)}"
        return parts[1], "input"
    if parts[0] == "anchors":
        return None, key
    return parts[0], "/".join(parts[1:])


def tap_family(key: str) -> str:
    """The family of a tap key, e.g. ``'random/fpn/cell1/fnode3'`` → ``'fpn/cell*/fnode*'``."""
    return _INDEXED.sub(r"\1*", _split_case(key)[1])


_FUNCTIONS = {
    "pre_nms": ("effdet_torch.postprocess.pre_nms_global", "tf2/postprocess.py pre_nms"),
    "detections": ("effdet_torch.postprocess.postprocess_global", "tf2/postprocess.py postprocess_global"),
    "eval_detections": ("effdet_torch.postprocess.postprocess_per_class",
                        "tf2/postprocess.py postprocess_per_class / generate_detections"),
    "anchors": ("effdet_torch.anchors.generate_anchors", "tf2/anchors.py Anchors"),
    "input": ("effdet_torch.preprocess.preprocess_image", "EfficientDetModel._preprocessing (dataloader.py)"),
    "image_scale": ("effdet_torch.preprocess.preprocess_image", "DetectionInputProcessor.image_scale_to_original"),
}


def official_layer_guess(tap: str, backbone_name: str) -> str:
    """The official Keras layer behind a (case-less) tap name, by the official naming scheme."""
    m = re.fullmatch(r"backbone/block(\d+)", tap)
    if m:
        return f"{backbone_name}/blocks_{m.group(1)}"
    if tap == "backbone/stem":
        return f"{backbone_name}/stem"
    m = re.fullmatch(r"backbone/level(\d+)", tap)
    if m:
        return f"{backbone_name} reduction_{m.group(1)}"
    m = re.fullmatch(r"resample/level(\d+)", tap)
    if m:
        return f"resample_p{m.group(1)}"
    m = re.fullmatch(r"fpn/cell(\d+)/fnode(\d+)", tap)
    if m:
        return f"fpn_cells/cell_{m.group(1)}/fnode{m.group(2)}"
    m = re.fullmatch(r"fpn/cell(\d+)/level(\d+)", tap)
    if m:
        return f"fpn_cells/cell_{m.group(1)} → level {m.group(2)}"
    m = re.fullmatch(r"(class|box)_net/repeat(\d+)/level(\d+)", tap)
    if m:
        k, r, lvl = m.groups()
        return f"{k}_net/{k}-{r} + {k}-{r}-bn-{lvl}"
    m = re.fullmatch(r"(class|box)_net/level(\d+)", tap)
    if m:
        return f"{m.group(1)}_net/{m.group(1)}-predict"
    head = tap.split("/")[0]
    return _FUNCTIONS.get(head, ("", ""))[1]


def tensor_stat(name: str, ref: np.ndarray, ours: np.ndarray, note: str = "", noise: float | None = None,
                float64: bool = False, decode: DecodeBounds | None = None) -> TapStat:
    """Max abs / relative error, cosine similarity and the verdict of :mod:`parity.rules`:
    ``err <= max(rule, noise allowance)`` — fp32: ``1e-4·(1 + max|ref|)`` or ``5·gap32``; float64:
    ``2**-50·(1 + max|ref|)`` or ``10·noise64``. ``noise`` is our measured rounding noise at the tap
    (``None``: not measured, only the fixed part applies).

    Non-finite reference values (e.g. ``exp`` overflowing to ``inf`` in box decoding of a random
    input) must be matched exactly by ours; the statistics cover the elements finite on both sides.
    ``decode`` (decoded boxes: :func:`decode_bounds`) excuses an overflow on one side only where the
    box code lies within its bound of the overflow, and takes each coordinate within the box-code
    bound propagated through the decode (plus ``1e-4·(1 + |ref|)``) as within the rule.
    """
    ref = np.asarray(ref, np.float64)
    ours = np.asarray(ours, np.float64)
    if ref.shape != ours.shape:
        return TapStat(name, tuple(ref.shape), float("inf"), float("inf"), float("nan"), False,
                       f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    bad = ~np.isfinite(ref) | ~np.isfinite(ours)
    n_bad = int(bad.sum())
    r, o = (ref[~bad], ours[~bad]) if n_bad else (ref.ravel(), ours.ravel())
    scale = float(np.abs(r).max()) if r.size else 0.0
    tol, noise_tol = tensor_bounds(scale, noise, float64)
    if n_bad:
        differ = bad & ~((ref == ours) | (np.isnan(ref) & np.isnan(ours)))
        excused = differ & decode.overflow_ok if decode is not None else np.zeros_like(differ)
        if (differ & ~excused).any():
            return TapStat(name, tuple(ref.shape), float("inf"), float("inf"), tol, False,
                           f"non-finite values differ: {int((~np.isfinite(ours)).sum())} in ours, "
                           f"{int((~np.isfinite(ref)).sum())} in the reference, {int((differ & ~excused).sum())} "
                           "of them not at the same places nor at an overflow within the noise",
                           noise=noise, noise_tol=noise_tol)
        note = (note + "; " if note else "") + f"{n_bad - int(excused.sum())} non-finite values, equal on both sides"
        if excused.any():
            note += (f"; {int(excused.sum())} overflow on one side only, each where the official box code lies "
                     "within the box-head bound of exp's overflow")
    d = np.abs(r - o)
    err = float(d.max()) if r.size else 0.0
    na, nb = float(np.linalg.norm(r)), float(np.linalg.norm(o))
    cos = float(r @ o / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    bound = max(tol, noise_tol or 0.0)
    passed = err <= bound
    if not passed and decode is not None:
        dev = decode.deviation[~bad] if n_bad else decode.deviation.ravel()
        over = d > bound
        if (d[over] <= dev[over] + REL_TOL * (1 + np.abs(r[over]))).all():
            passed = True
            note = (note + "; " if note else "") + (
                f"{int(over.sum())} coordinate(s) over the tensor bound, each within the box-code bound propagated "
                "through the decode")
    if passed and tol < err <= bound and not float64:
        note = (note + "; " if note else "") + (f"fp32 noise: over the 1e-4 rule but within {NOISE_FACTOR:g}x our "
                                                f"own fp32-vs-fp64 difference ({noise:.2e})")
    return TapStat(name, tuple(ref.shape), err, err / scale if scale else err, tol, passed, note, cosine=cos,
                   noise=noise, noise_tol=noise_tol)


def reference_hw(ref: Mapping[str, np.ndarray], default: tuple[int, int]) -> tuple[int, int]:
    """The network input size of a reference run (from its random or preprocessed input)."""
    for k in ref:
        if k == "input/random" or k.endswith("_preprocessed"):
            return tuple(int(v) for v in ref[k].shape[1:3])
    return tuple(default)


@dataclass
class DecodeBounds:
    """What the box-code bound allows each decoded coordinate ``[N, 4]`` of ``pre_nms/boxes``."""

    overflow_ok: np.ndarray  # finite in one fp32 run, overflowing in another: exp's overflow lies within the bound
    deviation: np.ndarray  # the largest change of the coordinate while the codes move within the bound


def decode_bounds(codes: np.ndarray, anchors: np.ndarray, code_bound: np.ndarray) -> DecodeBounds:
    """The official box codes ``codes [N, 4]`` (ty, tx, th, tw) moved by their bound ``code_bound [N]``
    (the box-head tap's bound at the anchor's level), decoded with the anchors ``[N, 4]``: each
    coordinate is monotone in its translation and its log-size code, so its extremes lie at the four
    corners of the two signs. A coordinate whose finiteness changes among them may overflow (``exp(th)
    · ha``) in one fp32 run and not in another."""
    c = torch.from_numpy(np.asarray(codes, np.float32))
    a = torch.from_numpy(np.asarray(anchors, np.float32))
    delta = torch.from_numpy(np.asarray(code_bound, np.float32))[:, None]
    with torch.no_grad():
        centre = decode_boxes(c, a)
        finite = torch.isfinite(centre)
        overflow = torch.zeros_like(finite)
        deviation = torch.zeros_like(centre)
        for s_move, s_size in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            moved = decode_boxes(c + delta * torch.tensor([s_move, s_move, s_size, s_size], dtype=c.dtype), a)
            overflow |= torch.isfinite(moved) != finite
            dev = (moved - centre).abs()
            deviation = torch.maximum(deviation, torch.where(torch.isfinite(dev), dev, torch.zeros_like(dev)))
    return DecodeBounds(overflow.numpy(), deviation.numpy().astype(np.float64))


def _hw_of(ref: Mapping[str, np.ndarray], model: EfficientDet) -> tuple[int, int]:
    return reference_hw(ref, model.config.image_size)


def _forward(model: EfficientDet, x: torch.Tensor, case: str, detailed: bool, anchors: torch.Tensor,
             out: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Network taps and pre-NMS tensors of one case into ``out``; returns flattened heads."""
    cfg = model.config
    with torch.no_grad(), record_taps(model, detailed=detailed) as taps:
        cls_out, box_out = model(x)
    for name, t in taps.items():
        out[f"{case}/{name}"] = t.permute(0, 2, 3, 1).cpu().numpy()
    cls, box = flatten_outputs(cls_out, box_out, cfg.num_classes)
    boxes, scores, classes0 = pre_nms_global(cls, box, anchors.to(cls.dtype))
    out[f"{case}/pre_nms/boxes"] = boxes[0].cpu().numpy()
    out[f"{case}/pre_nms/scores"] = scores[0].cpu().numpy()
    out[f"{case}/pre_nms/classes0"] = classes0[0].cpu().numpy().astype(np.float32)
    return cls, box


@dataclass
class CaseHeads:
    """The flattened head outputs of one input case (``[1, N, C]`` logits, ``[1, N, 4]`` box codes):
    ours in fp32, ours in float64 (when the noise is measured), the official ones (when recorded),
    and the image scales of the two detection paths."""

    ours: tuple[torch.Tensor, torch.Tensor]
    ours64: tuple[torch.Tensor, torch.Tensor] | None
    official: tuple[torch.Tensor, torch.Tensor] | None
    scale: float | None  # inference path (None: the random input, no rescaling)
    eval_scale: float  # COCO-eval path


@dataclass
class OurRun:
    """Our run on a reference's inputs (:func:`run_ours`)."""

    tensors: dict[str, np.ndarray]  # the reference's key scheme
    heads: dict[str, CaseHeads]  # per case
    noise: dict[str, float]  # measured noise per tensor key (parity.rules)
    detection_noise: dict[str, DetectionNoise]  # per ``<prefix>/<case>`` (parity.detections)


def run_ours(model: EfficientDet, ref: Mapping[str, np.ndarray], image_size: tuple[int, int] | None = None,
             device: str | torch.device = "cpu", detailed: bool = True, seed: int = 1234,
             heads_ref: Mapping[str, np.ndarray] | None = None, noise: bool = False,
             post: bool | None = None, model64: EfficientDet | None = None) -> OurRun:
    """Run our model on the inputs of ``ref`` (``input/random``, ``input/<img>_raw_uint8`` or, without
    a raw image, the recorded ``input/<img>_preprocessed``).

    Returns our run in the same key scheme (post-processing, the slow part on a CPU: ``post=None``
    the detection paths ``ref`` records, ``True`` both, ``False`` none); per case our flattened heads
    and the OFFICIAL ones of ``ref`` (or of ``heads_ref`` when ``ref`` lacks them) for the
    post-processing-only check; and the measured noise (:mod:`parity.rules`).

    A float64 reference (:func:`parity.rules.is_float64_reference`) is run by a float64 copy of our
    model on the recorded inputs, and its noise ``noise64`` is always measured (an fp32 run and a
    float64 run on the input moved by one ulp). Otherwise, with ``noise``, the fp32 noise
    ``gap32 = max|ours_fp32 - ours_fp64|`` of every tensor, and the detections' own noise
    (:func:`parity.detections.measure_detection_noise`: our post-processing on our fp32 heads against
    the same on our float64 heads rounded to fp32).

    ``model64``, the float64 twin those runs use, is by default a float64 copy of ``model``. A model
    fused for inference (``EfficientDet.fuse_for_inference``) needs the same fusion done in float64
    from the unfused weights (``unfused.double().fuse_for_inference()``): its own float64 copy
    would take its fp32-rounded folded weights as exact and leave the fold's rounding out of the
    noise, while a mistake in the fusion is in both twins, so the noise never hides it.
    """
    with strict_fp32():  # CUDA: no TF32 (it alone moves taps by ~1e-3)
        return _run_ours(model, ref, image_size, device, detailed, seed, heads_ref, noise, post, model64)


def _raw_image(ref: Mapping[str, np.ndarray], case: str) -> tuple[np.ndarray | None, str]:
    """The raw uint8 image of an image case: recorded in ``ref``, or scikit-image's bundled sample of
    that name (the float64 recordings store only the preprocessed ``chelsea``)."""
    if f"input/{case}_raw_uint8" in ref:
        return ref[f"input/{case}_raw_uint8"], "recorded"
    try:
        import skimage.data

        loader = getattr(skimage.data, case, None)
        return (np.asarray(loader()), f"skimage.data.{case}()") if callable(loader) else (None, "")
    except Exception:  # noqa: BLE001 - no scikit-image, no such sample, no cached sample file
        return None, ""


def _ulp_perturbed(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` moved by one float64 ulp per element, random sign (measures the network's amplification)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, x.shape, generator=g, dtype=torch.int64).to(x.device) * 2 - 1
    return torch.where(sign > 0, torch.nextafter(x, torch.full_like(x, float("inf"))),
                       torch.nextafter(x, torch.full_like(x, float("-inf"))))


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    d = d[np.isfinite(d)]
    return float(d.max()) if d.size else 0.0


def _run_ours(model, ref, image_size, device, detailed, seed, heads_ref, noise, post, twin64):
    model = model.to(device).eval()
    cfg = model.config
    hw = tuple(image_size) if image_size else _hw_of(ref, model)
    float64 = is_float64_reference(ref)
    det = Detector(model, hw)
    anchors = det.anchors(hw)
    ours: dict[str, np.ndarray] = {"anchors": anchors.cpu().numpy()}
    heads: dict[str, CaseHeads] = {}
    noise_floor: dict[str, float] = {}
    det_noise: dict[str, DetectionNoise] = {}
    model64 = anchors64 = None
    if noise or float64:
        import copy

        model64 = (copy.deepcopy(model) if twin64 is None else twin64).double().to(device).eval()
        anchors64 = torch.from_numpy(ours["anchors"]).double().to(device)
    for case in golden_cases(list(ref.keys())):
        x64 = None
        if case == "random":
            x_nhwc = ref["input/random"] if "input/random" in ref else \
                np.random.default_rng(seed).standard_normal((1, hw[0], hw[1], 3)).astype(np.float32)
            x = torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2).contiguous().to(device)
            scale, eval_scale = None, 1.0
        else:
            raw, _ = _raw_image(ref, case)
            if raw is not None:
                x, s = preprocess_image(raw, hw, cfg.mean_rgb, cfg.stddev_rgb, device)
                scale = eval_scale = float(s)
                ours[f"input/{case}_preprocessed"] = x.permute(0, 2, 3, 1).cpu().numpy()
                ours[f"{case}/image_scale"] = np.array([s], np.float32)
            else:  # only the preprocessed input is recorded: fed as it is
                pre = ref[f"input/{case}_preprocessed"]
                x = torch.from_numpy(np.ascontiguousarray(pre)).permute(0, 3, 1, 2).contiguous().to(device)
                s = ref.get(f"{case}/image_scale")
                scale = eval_scale = float(np.asarray(s).ravel()[0]) if s is not None else 1.0
        if float64:
            # the recorded float64 input (official fp32 preprocessing or draw, widened exactly)
            key = "input/random" if case == "random" else f"input/{case}_preprocessed"
            x64 = torch.from_numpy(np.ascontiguousarray(ref[key], np.float64)).permute(0, 3, 1, 2).contiguous()
            x64 = x64.to(device)
            cls, box = _forward(model64, x64, case, detailed, anchors64, ours)
            f32: dict[str, np.ndarray] = {}
            _forward(model, x64.float(), case, detailed, anchors, f32)
            moved: dict[str, np.ndarray] = {}
            _forward(model64, _ulp_perturbed(x64), case, detailed, anchors64, moved)
            for k, v in ours.items():
                if k.startswith(f"{case}/") and k in f32 and not k.endswith("classes0"):
                    noise_floor[k] = fp64_noise(_gap(f32[k], v), _gap(moved[k], v))
            continue  # float64 recordings hold network taps; post-processing is an fp32 affair
        cls, box = _forward(model, x, case, detailed, anchors, ours)
        cls64 = box64 = None
        if model64 is not None:
            exact: dict[str, np.ndarray] = {}
            cls64, box64 = _forward(model64, x.double(), case, detailed, anchors64, exact)
            for k, v in exact.items():
                if not k.endswith("classes0") and v.size:
                    noise_floor[k] = _gap(v, ours[k])
        for prefix in ("detections", "eval_detections"):
            # Post-processing the reference has (both when it holds only inputs): soft-NMS is the
            # slow part of a run on a CPU.
            if not (post or (post is None and f"{prefix}/{case}/scores" in ref)):
                continue
            fn = ((lambda c, b: postprocess_global(cfg, c, b, anchors, hw, scale)) if prefix == "detections"
                  else (lambda c, b: postprocess_per_class(cfg, c, b, anchors, eval_scale)))
            d = fn(cls, box)
            ours[f"{prefix}/{case}/boxes"] = d.boxes[0].cpu().numpy()
            ours[f"{prefix}/{case}/scores"] = d.scores[0].cpu().numpy()
            ours[f"{prefix}/{case}/classes"] = d.classes[0].cpu().numpy()
            ours[f"{prefix}/{case}/valid_len"] = np.asarray(int(d.valid_len[0]), np.float32)
            if cls64 is not None:  # the detections' own fp32 noise: same post-processing, exact heads
                det_noise[f"{prefix}/{case}"] = measure_detection_noise(_np(d), _np(fn(cls64.float(), box64.float())))
        src = ref if f"{case}/class_net/level{cfg.min_level}" in ref else (heads_ref or {})
        official = None
        if all(f"{case}/{k}_net/level{l}" in src for k in ("class", "box") for l in cfg.levels):
            c = np.concatenate([src[f"{case}/class_net/level{l}"].reshape(1, -1, cfg.num_classes) for l in cfg.levels], 1)
            b = np.concatenate([src[f"{case}/box_net/level{l}"].reshape(1, -1, 4) for l in cfg.levels], 1)
            official = (torch.from_numpy(c).to(device), torch.from_numpy(b).to(device))
        heads[case] = CaseHeads((cls, box), None if cls64 is None else (cls64, box64), official, scale, eval_scale)
    return OurRun(ours, heads, noise_floor, det_noise)


def _np(d) -> dict[str, np.ndarray]:
    """The valid rows of image 0 of :class:`~effdet_torch.postprocess.Detections` as numpy arrays."""
    n = int(d.valid_len[0])
    return {"boxes": d.boxes[0, :n].cpu().numpy(), "scores": d.scores[0, :n].cpu().numpy(),
            "classes": d.classes[0, :n].cpu().numpy()}


def _official_logits(run: OurRun, case: str) -> np.ndarray | None:
    """The official class logits ``[N, C]`` of a case (recorded or from a sibling file), or None."""
    h = run.heads.get(case)
    return None if h is None or h.official is None else h.official[0][0].cpu().numpy()


def _class_noise(cfg, run: OurRun, case: str) -> float | None:
    """Our largest measured noise over a case's class-head taps (None: not measured)."""
    gaps = [run.noise[k] for k in (f"{case}/class_net/level{l}" for l in cfg.levels) if k in run.noise]
    return max(gaps) if gaps else None


def _logit_bound(cfg, run: OurRun, case: str, logits: np.ndarray) -> float:
    """The class-logit near-tie bound of a case: from the official logits and our class-head noise."""
    return class_logit_bound(float(np.abs(logits).max()), _class_noise(cfg, run, case))


def _decode_bounds(cfg, ref: Mapping[str, np.ndarray], run: OurRun, case: str) -> DecodeBounds | None:
    """:func:`decode_bounds` of a case's ``pre_nms/boxes``, each anchor's code bound being its level's
    ``box_net`` tap bound (None without the official box codes per level)."""
    h = run.heads.get(case)
    keys = [f"{case}/box_net/level{l}" for l in cfg.levels]
    if h is None or h.official is None or "anchors" not in run.tensors or not all(k in ref for k in keys):
        return None
    bounds = []
    for k in keys:
        tol, noise_tol = tensor_bounds(float(np.abs(ref[k]).max()), run.noise.get(k))
        bounds.append(np.full(ref[k].size // 4, max(tol, noise_tol or 0.0)))
    return decode_bounds(h.official[1][0].cpu().numpy(), run.tensors["anchors"], np.concatenate(bounds))


def _realign(cfg, ref: Mapping[str, np.ndarray], run: OurRun, head: str, case: str, hw: tuple[int, int]):
    """``realign(score_gate, box_gate)`` of :func:`parity.detections.compare_detections` for our rows of
    ``<head>/<case>``: our post-processing re-run with the official choices at near-ties (None
    without our heads). The inference path's class near-ties need the official logits."""
    h = run.heads.get(case)
    if h is None:
        return None
    prefix = f"{head}/{case}"
    n = int(ref[f"{prefix}/valid_len"])
    rows = {k: np.asarray(ref[f"{prefix}/{k}"])[:n] for k in ("boxes", "scores", "classes")}
    logits = _official_logits(run, case)
    ref_cls0 = bound = None
    if head == "detections" and logits is not None:
        ref_cls0 = np.asarray(ref[f"{case}/pre_nms/classes0"]) if f"{case}/pre_nms/classes0" in ref else logits.argmax(-1)
        bound = _logit_bound(cfg, run, case, logits)
    anchors = torch.from_numpy(run.tensors["anchors"]).to(h.ours[0].device)
    scale = h.scale if head == "detections" else h.eval_scale

    def realign(score_gate: float, box_gate: float):
        mine, class_ties, order_ties = aligned_detections(cfg, head, h.ours[0], h.ours[1], anchors, hw, scale, rows,
                                                          score_gate, box_gate, ref_cls0, logits, bound)
        return mine, class_ties, order_ties, bound
    return realign


def compare_runs(model: EfficientDet, ref: Mapping[str, np.ndarray], run: OurRun, order: list[str] | None = None,
                 layer_paths: Mapping[str, str] | None = None) -> list[TapStat]:
    """Compare every reference key with our ``run`` (:func:`run_ours`), in ``order`` (default: the
    reference's key order).

    Every key of ``ref`` gets a result: inputs we were fed (``input/random``, ``input/*_raw_uint8``, a
    preprocessed input recorded without its raw image) pass as *fed*; keys only we have (detailed taps
    missing from a coarse golden) are skipped; reference keys we lack FAIL. Tensors are judged by
    :func:`tensor_stat` with the run's measured noise (``pre_nms/boxes`` also through the box-code
    bound propagated through the decode: :func:`decode_bounds`);
    ``pre_nms/classes0`` by its argmax near-ties; detections by :mod:`parity.detections` (near-tie
    alignment, rows our own fp32 run loses, strict on the official heads). A float64 ``ref`` is
    judged by the float64 rule.
    """
    cfg = model.config
    ours = run.tensors
    layer_paths = layer_paths or {}
    float64 = is_float64_reference(ref)
    modules = tap_modules(model, detailed=True)
    keys = list(order) if order else list(ref.keys())
    keys += [k for k in ref.keys() if k not in keys]
    hw = _hw_of(ref, model)
    stats: list[TapStat] = []
    done: set[str] = set()
    for key in keys:
        if key in done or key not in ref:
            continue
        case, tap = _split_case(key)
        fam = tap_family(key)
        head = tap.split("/")[0]
        module = modules.get(tap) or _FUNCTIONS.get(head, ("", ""))[0]
        official = layer_paths.get(tap) or official_layer_guess(tap, cfg.backbone.name)
        fed = key == "input/random" or key.endswith("_raw_uint8") or (
            key.endswith("_preprocessed") and key not in ours)
        if fed or (tap == "image_scale" and key not in ours):
            done.add(key)
            note = ("input fed to our model as recorded" if fed else
                    "recorded preprocessing output, not recomputed: the file holds no raw image of this case")
            stats.append(TapStat(key, tuple(np.shape(ref[key])), 0.0, 0.0, 0.0, True, note, family=fam,
                                 module=module, official=official))
            continue
        if head in ("detections", "eval_detections"):
            prefix = f"{head}/{case}"
            done.update(k for k in ref if k.startswith(prefix + "/"))
            if f"{prefix}/valid_len" not in ours:
                stats.append(TapStat(key, tuple(np.shape(ref[key])), float("nan"), float("nan"), 0.0, False,
                                     "not compared: no such output of ours", family=fam, module=module,
                                     official=official))
                continue
            mine = {k: ours[f"{prefix}/{k}"] for k in ("boxes", "scores", "classes")}
            on_heads = None
            h = run.heads.get(case)
            if h is not None and h.official is not None and "anchors" in ours:
                c, b = h.official
                a = torch.from_numpy(ours["anchors"]).to(c.device)
                d = (postprocess_global(cfg, c, b, a, hw, h.scale) if head == "detections"
                     else postprocess_per_class(cfg, c, b, a, h.eval_scale))
                on_heads = _np(d)
            for r in compare_detections(prefix, ref, mine, int(ours[f"{prefix}/valid_len"]), on_heads,
                                        noise=run.detection_noise.get(prefix),
                                        realign=_realign(cfg, ref, run, head, case, hw)):
                stats.append(_annotated(r, tap_family(r.key), module, official))
            continue
        done.add(key)
        if key not in ours:
            stats.append(TapStat(key, tuple(np.shape(ref[key])), float("nan"), float("nan"), 0.0, False,
                                 "not compared: no matching tap in our model", family=fam, module=module,
                                 official=official))
            continue
        if tap == "pre_nms/classes0":
            r = class_tie_result(key, np.asarray(ref[key]), np.asarray(ours[key]), _official_logits(run, case),
                                 _class_noise(cfg, run, case))
            stats.append(_annotated(r, fam, module, official))
            continue
        decode = _decode_bounds(cfg, ref, run, case) if tap == "pre_nms/boxes" and not float64 else None
        s = tensor_stat(key, ref[key], ours[key], noise=run.noise.get(key), float64=float64, decode=decode)
        s.family, s.module, s.official = fam, module, official
        stats.append(s)
    return stats


def compare_reference(model: EfficientDet, ref: Mapping[str, np.ndarray], image_size: tuple[int, int] | None = None,
                      device: str | torch.device = "cpu", strict: bool = False,
                      heads_ref: Mapping[str, np.ndarray] | None = None, layer_paths: Mapping[str, str] | None = None,
                      detailed: bool = True, seed: int = 1234,
                      model64: EfficientDet | None = None) -> tuple[list[TapStat], dict[str, np.ndarray]]:
    """THE comparison (``golden``, ``compare``, ``record``'s check, ``--verify``, the demo, the tests):
    run ours on the inputs of ``ref`` with its noise measured, judge every key by :mod:`parity.rules`.

    ``strict`` (fp32 references only) skips the noise measurement: only the fixed ``1e-4`` part applies.
    ``model64``: the float64 twin of the noise measurement (:func:`run_ours`). Returns ``(stats, ours)``.
    """
    # random inputs can overflow box decoding to inf
    with strict_fp32(), np.errstate(over="ignore", invalid="ignore"):
        run = run_ours(model, ref, image_size=image_size, device=device, detailed=detailed, heads_ref=heads_ref,
                       noise=not strict, seed=seed, model64=model64)
        stats = compare_runs(model, ref, run, order=list(run.tensors.keys()), layer_paths=layer_paths)
    return stats, run.tensors


def first_divergence(stats: list[TapStat]) -> TapStat | None:
    """The first failing tap in execution order (None when all pass)."""
    return next((s for s in stats if not s.passed), None)


@dataclass
class FamilySummary:
    family: str
    n: int
    n_failed: int
    max_abs_err: float
    worst_tap: str
    max_ratio: float  # max over taps of err / tolerance
    min_cosine: float | None
    passed: bool = field(default=True)


def family_summary(stats: list[TapStat]) -> list[FamilySummary]:
    """Per tap family: count, failures, the largest error (and its tap), max err/tol, min cosine."""
    out: dict[str, FamilySummary] = {}
    for s in stats:
        f = out.get(s.family)
        err = s.max_abs_err if np.isfinite(s.max_abs_err) else float("inf")
        if s.bound > 0:
            ratio = err / s.bound
        else:  # counts (valid_len, argmax flips judged as near-ties): the verdict is the measure
            ratio = 0.0 if s.passed else float("inf")
        if f is None:
            f = out[s.family] = FamilySummary(s.family, 0, 0, -1.0, s.key, 0.0, None)
        f.n += 1
        f.n_failed += not s.passed
        f.passed = f.passed and s.passed
        if err > f.max_abs_err:
            f.max_abs_err, f.worst_tap = err, s.key
        f.max_ratio = max(f.max_ratio, ratio)
        if s.cosine is not None:
            f.min_cosine = s.cosine if f.min_cosine is None else min(f.min_cosine, s.cosine)
    return list(out.values())
