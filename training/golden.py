"""``effdet-parity train-golden``: our training step against a recording of the official trainer.

Reads ``DIR/train_step.npz`` + ``DIR/meta.json`` (hparams) and, when present, ``DIR/augment.npz``;
runs our target assignment, training-mode forward, loss, clipped gradients and two optimizer steps
from the checkpoint's weights, and our augmentation with the recorded forced draws; compares EVERY
key of those files.

Tolerances (why each has its size) — see :func:`tolerance`:
- integer keys (``cls_targets``, ``match_results``, ``num_positives``, ``mean_num_positives``,
  augmentation ``classes``/``is_crowds``/``scaled_hw``/``crop_offset_yx``/``source_id``): equal;
- ``input/*``: the inputs themselves, fed to ours unchanged (reported, not compared);
- every float key: ``max(SAFETY · noise, FLOOR · (1 + max|official|))`` where ``noise`` is the
  measured fp32 rounding of OUR implementation on that key: ``max|ours_fp32 − ours_fp64|``, the
  same step re-run in float64 (``model.double()``, same fp32 start weights and inputs). The
  official fp32 run carries rounding of the same kind and size, so two correct fp32
  implementations differ by up to about twice one's deviation from exact arithmetic; SAFETY = 4
  doubles that again because the two implementations' rounding is not identical in size (op order,
  fused kernels). FLOOR = 2^-20 ≈ 9.5e-7 relative (8 float32 ulps at unit scale) covers keys that
  fp64 reproduces almost exactly (box coder, lr, resize), where a 1-ulp difference of ``log`` or of
  a sum order between TF and torch is still legitimate. The measured largest errors are printed and
  stated in the README; the deliberately broken variants the tests use (torch-style momentum,
  focal gamma 2.0, biased BN moving variance) exceed these tolerances by orders of magnitude.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from converters.name_map import build_name_map
from effdet_torch import files
from effdet_torch.anchors import generate_anchors
from effdet_torch.config import AnchorConfig
from effdet_torch.model import EfficientDet

from .augment import AugmentDraws, train_transform
from .loss import LossConfig
from .optim import CosineSchedule, KerasSGD
from .step import Trainer
from .targets import assign_targets, batch_targets, to_official_levels

__all__ = ["KeyResult", "TrainGoldenSpec", "compare", "family", "judge", "load_recording", "run_augment",
           "run_ours", "run_train_golden", "tolerances", "write_json"]

SAFETY = 2.0
FLOOR = 2.0 ** -20
LOSS_KEYS = ("cls_loss", "box_loss", "det_loss", "reg_l2_loss", "loss", "gradient_norm", "learning_rate")
INT_KEY_PARTS = ("cls_targets", "match_results", "num_positives", "classes", "is_crowds", "scaled_hw",
                 "crop_offset_yx", "source_id")


@dataclass(frozen=True)
class TrainGoldenSpec:
    """What a recording's ``meta.json`` says about the step (official hparams)."""

    batch: int
    image_hw: tuple[int, int]
    num_classes: int
    schedule: CosineSchedule
    loss: LossConfig
    clip_norm: float
    momentum: float
    bn_momentum: float
    steps: int  # recorded optimizer steps (1 or 2)

    @classmethod
    def from_meta(cls, meta: dict, n_steps: int) -> "TrainGoldenSpec":
        hp = meta["config"]["hparams"]
        lr = meta["config"]["lr_schedule_params"]
        if hp.get("optimizer", "sgd") != "sgd" or hp.get("lr_decay_method", "cosine") != "cosine":
            raise ValueError(f"meta.json: optimizer {hp.get('optimizer')!r} / lr_decay_method "
                             f"{hp.get('lr_decay_method')!r} not supported (sgd + cosine only)")
        if hp.get("iou_loss_type") or hp.get("label_smoothing", 0.0):
            raise ValueError("meta.json: iou_loss_type / label_smoothing are not supported")
        sched = CosineSchedule(lr["adjusted_learning_rate"], hp["lr_warmup_init"], int(lr["lr_warmup_step"]),
                               int(lr["total_steps"]))
        loss = LossConfig(hp["alpha"], hp["gamma"], hp["delta"], hp["box_loss_weight"], hp["weight_decay"])
        moms = meta.get("bn_layers", {}).get("momentum", [0.99])
        return cls(int(meta["batch"]), tuple(meta["image_hw"]), int(hp["num_classes"]), sched, loss,
                   float(hp["clip_gradients_norm"]), float(hp["momentum"]), float(moms[0]), n_steps)


@dataclass
class KeyResult:
    key: str
    shape: tuple[int, ...]
    max_abs_err: float
    tolerance: float | None
    noise_fp32_vs_fp64: float | None
    passed: bool
    note: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("key")
        d["shape"] = list(self.shape)
        d["verdict"] = "pass" if self.passed else "FAIL"
        return d


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).cpu().numpy()


def run_ours(model: EfficientDet, ref: dict[str, np.ndarray], spec: TrainGoldenSpec,
             dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """Our step(s) on the recording's inputs, in ``dtype``; official keys → arrays (official layout).
    ``model`` is copied (the caller's weights are untouched)."""
    model = copy.deepcopy(model).to(dtype)
    entries = build_name_map(model)
    cfg = model.config
    hw = spec.image_hw
    images = torch.from_numpy(ref["input/images"]).permute(0, 3, 1, 2).to(dtype)
    anchors = torch.from_numpy(generate_anchors(cfg, hw))
    out: dict[str, np.ndarray] = {"anchors": anchors.numpy()}
    targets = batch_targets(torch.from_numpy(ref["input/boxes"]).to(dtype), torch.from_numpy(ref["input/classes"]),
                            anchors.to(dtype))
    sizes = model.level_sizes(hw)
    for lvl, c, b in zip(cfg.levels, to_official_levels(targets.cls, sizes, cfg.num_anchors),
                         to_official_levels(targets.box, sizes, cfg.num_anchors)):
        out[f"targets/cls_targets/level{lvl}"] = c.numpy()
        out[f"targets/box_targets/level{lvl}"] = b.numpy()
    out["targets/num_positives"] = targets.num_positives.numpy()
    out["targets/mean_num_positives"] = np.full((spec.batch, 1), targets.num_positives.mean().item(), np.float32)
    out["targets/match_results"] = targets.matches.numpy()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0 - spec.bn_momentum
    opt = KerasSGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=spec.momentum)
    trainer = Trainer(model, opt, spec.schedule, spec.loss, spec.clip_norm)
    names = dict(model.named_parameters())
    grad_index = {id(p): i for i, p in enumerate(trainer.params)}
    for step in range(spec.steps):
        res = trainer.step(images, targets)
        prefix = "loss" if step == 0 else f"loss{step + 1}"
        for k in LOSS_KEYS:
            out[f"{prefix}/{k}"] = np.asarray(res.losses[k])
        state = model.state_dict()
        for e in entries:
            out[f"step{step + 1}/{e.tf_name}:0"] = e.layout.to_tf(state[e.torch_key].detach().cpu().numpy())
        if step == 0:
            for lvl, c, b in zip(cfg.levels, res.class_outputs, res.box_outputs):
                out[f"train_forward/class_net/level{lvl}"] = _nhwc(c)
                out[f"train_forward/box_net/level{lvl}"] = _nhwc(b)
            for e in entries:
                p = names.get(e.torch_key)
                if p is not None and id(p) in grad_index:
                    out[f"grads/{e.tf_name}:0"] = e.layout.to_tf(res.grads[grad_index[id(p)]].cpu().numpy())
    return out


def run_augment(aug: dict[str, np.ndarray], meta: dict, model_cfg, dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """Our pipeline on ``aug/input/*`` with each setting's recorded forced draws → official keys."""
    settings = meta.get("augment", {}).get("settings")
    if not settings:
        raise ValueError("meta.json: no augment.settings (the forced draws of augment.npz)")
    hp = meta["config"]["hparams"]
    hw = tuple(meta["image_hw"])
    max_inst = int(hp.get("max_instances_per_image", 100))
    img = aug["aug/input/image_raw_uint8"]
    boxes = aug["aug/input/boxes_normalized"].astype(np.float32)
    classes = aug["aug/input/classes"].astype(np.float32)
    crowd = aug.get("aug/input/is_crowd", np.zeros(len(classes), np.float32)).astype(np.float32)
    # The decoder's area field: the recording's tf.Example stores the box area in pixels.
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32) * np.float32(img.shape[0] * img.shape[1])
    anchors = torch.from_numpy(generate_anchors(model_cfg, hw)).to(dtype)
    sizes = [model_cfg.feature_sizes(hw)[lvl] for lvl in model_cfg.levels]
    out: dict[str, np.ndarray] = {}
    for name, st in settings.items():
        calls, p = st["random_calls"], st["params"]
        if len(calls) != 4:
            raise ValueError(f"meta.json: augment setting {name!r} has {len(calls)} random draws, expected 4 "
                             f"(flip, scale, offset_y, offset_x)")
        draws = AugmentDraws(*(float(c["returned"]) for c in calls))
        r = train_transform(img, boxes, classes, crowd, hw, hp["mean_rgb"], hp["stddev_rgb"], draws,
                            hflip=bool(p.get("input_rand_hflip", True)),
                            skip_crowd=bool(p.get("skip_crowd_during_training", True)), dtype=dtype)
        t = assign_targets(r.boxes.to(dtype), r.classes, anchors)
        k = f"aug/{name}/"
        pad = lambda a, v, cols=None: np.concatenate(  # noqa: E731
            [a, np.full((max_inst - len(a),) + a.shape[1:], v, np.float32)]).astype(np.float32)
        out[k + "image"] = r.image.permute(1, 2, 0).cpu().numpy()
        out[k + "boxes"] = pad((r.boxes.to(dtype) * float(np.float32(r.image_scale))).numpy(), -1.0)
        out[k + "classes"] = pad(r.classes.numpy(), -1.0)
        out[k + "is_crowds"] = pad(crowd, 0.0)
        out[k + "areas"] = pad(areas, -1.0)
        out[k + "image_scale"] = np.float32(r.image_scale)
        out[k + "num_positives"] = t.num_positives.numpy()
        for lvl, c, b in zip(model_cfg.levels, to_official_levels(t.cls[None], sizes, model_cfg.num_anchors),
                             to_official_levels(t.box[None], sizes, model_cfg.num_anchors)):
            out[k + f"cls_targets/level{lvl}"] = c[0].numpy()
            out[k + f"box_targets/level{lvl}"] = b[0].numpy()
        out[k + "labeler_input/boxes"] = r.boxes.numpy()
        out[k + "labeler_input/classes"] = r.classes.numpy()
        out[k + "image_scale_to_scaled"] = np.float32(r.image_scale_to_scaled)
        out[k + "scaled_hw"] = np.array(r.scaled_hw, np.int32)
        out[k + "crop_offset_yx"] = np.array(r.crop_offset_yx, np.int32)
    return out


def family(key: str) -> str:
    """Tolerance family of a key: ``grads``/``step1``/``step2`` split by variable kind (weights,
    BN moving_mean, BN moving_variance); the loss terms of one step (cls, box, det, L2, total: one
    forward, one set of weights) share a family, its ``learning_rate`` and ``gradient_norm`` are
    their own; per-level keys share a family; else the key itself.

    Why families: the official fp32 run's own rounding is of the same size as ours but not on the
    same element or scalar — measured, a single scalar's noise can be 3x smaller than the
    official's deviation on it (loss2/box_loss: ours 3.6e-6, official ≥ 7.8e-6), while the largest
    noise of the family bounds the official's deviation on every member."""
    parts = key.split("/")
    if parts[0] in ("grads",) or parts[0].startswith("step"):
        leaf = parts[-1].split(":")[0]
        return f"{parts[0]}/{leaf if leaf in ('moving_mean', 'moving_variance') else 'weights'}"
    if parts[0].startswith("loss") and len(parts) == 2:
        return key if parts[1] in ("learning_rate", "gradient_norm") else f"{parts[0]}/terms"
    if parts[-1].startswith("level"):
        parts = parts[:-1]
    return "/".join(parts)


def _is_input(key: str) -> bool:
    return key.startswith(("input/", "aug/input/"))


def _is_exact(key: str, ref: np.ndarray) -> bool:
    leaf = "/".join(key.split("/")[-2:])
    return np.issubdtype(ref.dtype, np.integer) or any(p in leaf for p in INT_KEY_PARTS)


PASS_THROUGH = {"source_id": "the tf.Example's image/source_id, passed through by the decoder; the "
                             "recording does not hold it as an input, so it is reported, not compared"}


def tolerances(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray],
               ours64: dict[str, np.ndarray]) -> dict[str, tuple[float, float, str]]:
    """``key → (tolerance, our fp32 noise on the key, note)`` for every float key of ``ref`` that
    ours produced (see the module docstring): ``max(SAFETY · family noise, FLOOR) · (1 + max|ref|)``."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    noise_rel: dict[str, float] = {}
    own: dict[str, float] = {}
    for k, r in ref.items():
        if k in ours and k in ours64 and not _is_input(k) and not _is_exact(k, r) and np.shape(ours[k]) == r.shape and r.size:
            own[k] = float(np.abs(f64(ours[k]) - f64(ours64[k])).max())
            n = own[k] / (1.0 + float(np.abs(f64(r)).max()))
            noise_rel[family(k)] = max(noise_rel.get(family(k), 0.0), n)
    out = {}
    for k in own:
        fam = noise_rel[family(k)]
        tol = max(SAFETY * fam, FLOOR) * (1.0 + float(np.abs(f64(ref[k])).max()))
        note = f"family {family(k)}: noise {fam:.2e} rel" + (" (floor)" if SAFETY * fam < FLOOR else "")
        out[k] = (tol, own[k], note)
    return out


def judge(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray],
          tols: dict[str, tuple[float, float, str]]) -> list[KeyResult]:
    """One :class:`KeyResult` per key of ``ref``: inputs reported, integer keys equal, float keys
    within ``tols`` (from :func:`tolerances`)."""
    results = []
    for k, r in ref.items():
        shape = tuple(r.shape)
        leaf = k.rsplit("/", 1)[-1]
        if _is_input(k):
            results.append(KeyResult(k, shape, 0.0, None, None, True, "input: fed to ours as recorded"))
            continue
        if leaf in PASS_THROUGH:
            results.append(KeyResult(k, shape, 0.0, None, None, True, PASS_THROUGH[leaf]))
            continue
        if k not in ours:
            results.append(KeyResult(k, shape, float("inf"), None, None, False, "not produced by ours"))
            continue
        o = np.asarray(ours[k])
        if o.shape != r.shape:
            results.append(KeyResult(k, shape, float("inf"), None, None, False, f"shape: ours {o.shape}"))
            continue
        err = float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()) if r.size else 0.0
        if _is_exact(k, r):
            results.append(KeyResult(k, shape, err, 0.0, None, err == 0.0, "exact"))
        elif k in tols:
            tol, own, note = tols[k]
            results.append(KeyResult(k, shape, err, tol, own, bool(err <= tol), note))
        else:
            results.append(KeyResult(k, shape, err, None, None, False, "no fp64 run to measure the tolerance"))
    return results


def compare(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray], ours64: dict[str, np.ndarray]) -> list[KeyResult]:
    """Every key of ``ref`` judged with the tolerances measured on ``ours`` vs ``ours64``."""
    return judge(ref, ours, tolerances(ref, ours, ours64))


def load_recording(golden_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """``(meta, train_step arrays, augment arrays or None)``; one clear error naming the bad file."""
    d = Path(golden_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such folder")
    paths = {n: d / n for n in ("meta.json", "train_step.npz")}
    for n, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (a train golden folder holds meta.json and train_step.npz)")
    try:
        meta = json.loads(paths["meta.json"].read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{paths['meta.json']}: not valid JSON ({e})") from None
    def load(p: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - zip/npy errors have many types
            raise ValueError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
    ref = load(paths["train_step.npz"])
    for k in ("input/images", "input/boxes", "input/classes"):
        if k not in ref:
            raise ValueError(f"{paths['train_step.npz']}: no {k!r}")
    aug = load(d / "augment.npz") if (d / "augment.npz").is_file() else None
    return meta, ref, aug


def run_train_golden(model: EfficientDet, golden_dir: str | os.PathLike, log=print) -> list[KeyResult]:
    """Every key of the recording compared (our run in fp32, and in fp64 for the noise)."""
    meta, ref, aug = load_recording(golden_dir)
    n_steps = 2 if any(k.startswith(("step2/", "loss2/")) for k in ref) else 1
    spec = TrainGoldenSpec.from_meta(meta, n_steps)
    if tuple(spec.image_hw) != tuple(model.config.image_size):
        raise ValueError(f"{golden_dir}: recorded at image size {spec.image_hw}, the model is built for "
                         f"{model.config.image_size} (pass --image-size)")
    if spec.num_classes != model.config.num_classes:
        raise ValueError(f"{golden_dir}: recorded with {spec.num_classes} classes, the model has {model.config.num_classes}")
    hp = meta["config"]["hparams"]
    if any(k in hp for k in ("num_scales", "anchor_scale", "aspect_ratios")):
        recorded = AnchorConfig.from_dict({k: hp[k] for k in ("num_scales", "anchor_scale", "aspect_ratios") if k in hp})
        if recorded != model.config.anchors:
            raise ValueError(f"{golden_dir}: recorded with anchors {recorded.describe()}, the model has "
                             f"{model.config.anchors.describe()} (pass the recording's --hparams)")
    if tuple(ref["input/images"].shape[1:3]) != tuple(spec.image_hw) or ref["input/images"].shape[0] != spec.batch:
        raise ValueError(f"{golden_dir}/train_step.npz: input/images {ref['input/images'].shape} does not fit "
                         f"meta.json (batch {spec.batch}, image {spec.image_hw})")
    t0 = time.time()
    ours = run_ours(model, ref, spec, torch.float32)
    log(f"our fp32 step(s): {time.time() - t0:.1f} s")
    t0 = time.time()
    ours64 = run_ours(model, ref, spec, torch.float64)
    log(f"our fp64 step(s) (noise measurement): {time.time() - t0:.1f} s")
    results = compare(ref, ours, ours64)
    if aug is not None:
        a32 = run_augment(aug, meta, model.config, torch.float32)
        a64 = run_augment(aug, meta, model.config, torch.float64)
        results += compare(aug, a32, a64)
    return results


def family_summary(results: list[KeyResult]) -> list[tuple[str, int, float, float | None, float | None, bool]]:
    """Per family: (family, n keys, largest error, tolerance at that key, largest relative error, all pass)."""
    fams: dict[str, list[KeyResult]] = {}
    for r in results:
        if r.tolerance is not None:
            fams.setdefault(family(r.key), []).append(r)
    out = []
    for f, rs in fams.items():
        worst = max(rs, key=lambda r: r.max_abs_err / r.tolerance if r.tolerance else (np.inf if r.max_abs_err else 0))
        out.append((f, len(rs), max(r.max_abs_err for r in rs), worst.tolerance,
                    worst.max_abs_err / worst.tolerance if worst.tolerance else None, all(r.passed for r in rs)))
    return out


def format_results(results: list[KeyResult], quiet: bool = False) -> str:
    w = max([len(r.key) for r in results] + [10])
    lines = [f"{'key':<{w}}  {'max abs err':>11}  {'tolerance':>9}  {'fp32 noise':>10}  verdict  note"]
    fmt = lambda v: "-" if v is None else f"{v:.3e}"  # noqa: E731
    for r in results:
        if quiet and r.passed:
            continue
        lines.append(f"{r.key:<{w}}  {r.max_abs_err:>11.3e}  {fmt(r.tolerance):>9}  {fmt(r.noise_fp32_vs_fp64):>10}  "
                     f"{'pass' if r.passed else 'FAIL':<7}  {r.note}")
    lines.append("")
    summary = family_summary(results)
    fw = max([len(f) for f, *_ in summary] + [6])
    lines.append(f"{'family':<{fw}} {'keys':>5}  {'largest err':>11}  {'worst err/tol':>13}  verdict")
    for f, n, e, _tol, ratio, ok in summary:
        lines.append(f"{f:<{fw}} {n:>5}  {e:>11.3e}  {('-' if ratio is None else f'{ratio:.3f}'):>13}  {'pass' if ok else 'FAIL'}")
    n_fail = sum(not r.passed for r in results)
    n_cmp = sum(r.tolerance is not None for r in results)
    lines.append(f"{len(results)} keys: {n_cmp} compared, {len(results) - n_cmp} inputs/pass-through reported, "
                 f"{len(results) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def write_json(results: list[KeyResult], path: str | os.PathLike, force: bool = False) -> None:
    """One entry per npz key, keyed by that exact key; atomic (temp file in the folder + rename)."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (pass --force to overwrite)")
    data = {r.key: r.to_json() for r in results}
    for e in data.values():
        for k, v in e.items():
            if isinstance(v, float) and not np.isfinite(v):
                e[k] = None
    files.write_json(path, data)
