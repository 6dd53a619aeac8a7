"""The float64 proof: our model in float64 against the official model run in float64
(``shared/golden/fp64``: d0, lite0, d6), and the noise-aware rules of :mod:`parity.rules`.

Expected values are the official float64 recordings; the tolerances are the float64 rule
(``10 × noise64``, measured per tap) and the fp32 rule; each broken model below must fail both by
orders of magnitude.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from effdet_torch.model import create_model
from effdet_torch.taps import record_all_taps
from effdet_cli.parity import main as cli_main
from parity.compare import compare_reference
from parity.golden import write_json
from parity.live import load_npz
from parity.rules import FP64_NOISE_FACTOR, NOISE_FACTOR, REL_TOL, U32, U64, fp64_noise, is_float64_reference, \
    tensor_bounds

from .breakages import flip_same_padding
from .conftest import PROJECT_GOLDEN

torch.set_grad_enabled(False)
VARIANTS = ["efficientdet-d0", "efficientdet-lite0", "efficientdet-d6"]


def _fp64_golden(shared_golden, variant: str):
    path = shared_golden / "fp64" / variant / "tensors_fp64.npz"
    if not path.is_file():
        pytest.skip(f"no float64 recording at {path}")
    return path


# ------------------------------------------------------------------ the model runs in float64
@pytest.mark.parametrize("variant, size", [("efficientdet-d0", (96, 72)), ("efficientdet-lite0", (64, 64))])
def test_float64_model_computes_every_op_in_float64(variant, size, synth_ckpt_dir):
    """Every module output is float64, and the network is linear at a scale float32 cannot hold.

    A silent float32 round trip anywhere (an op casting down, a float32 constant tensor, a resize done
    in float32) would round a 1e-9 relative input perturbation to 0 or to a float32 step (~6e-8): the
    response to 2δ would then not be twice the response to δ. The non-square odd size exercises SAME
    padding on both sides, the max-pool and non-2x nearest resizes.
    """
    torch.manual_seed(0)
    model = create_model(variant, checkpoint=synth_ckpt_dir(variant), image_size=size).double().eval()
    seen: dict[str, torch.dtype] = {}

    def record(name, out):
        for i, t in enumerate(out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, (list, tuple)):
                record(f"{name}.{i}", t)
            else:
                seen[f"{name}.{i}"] = t.dtype

    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: record(n, out))
             for n, m in model.named_modules() if n]
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with record_all_taps(model) as taps:
        model(x)
    for h in hooks:
        h.remove()
    floats = {n: d for n, d in seen.items() if d.is_floating_point}
    assert len(floats) > 100 and set(floats.values()) == {torch.float64}, \
        {n: d for n, d in floats.items() if d != torch.float64}
    base = {k: v.clone() for k, v in taps.items()}
    assert all(v.dtype == torch.float64 for v in base.values())
    delta = torch.randn_like(x) * 1e-9
    resp = []
    for s in (1.0, 2.0):
        with record_all_taps(model) as t:
            model(x + s * delta)
        resp.append({k: (t[k] - base[k]) for k in base})
    for k in base:
        d1, d2 = resp[0][k], resp[1][k]
        scale = float(d1.abs().max())
        # the response stands far above float64 rounding of the tap (1e-16 relative)
        assert scale > 1e-13 * float(base[k].abs().max()), f"{k}: a 1e-9 input change vanished"
        # second-order terms are ~1e-9 relative; a float32 rounding step would be ~1e2 larger than δ itself
        assert float((d2 - 2 * d1).abs().max()) <= 1e-3 * scale, k


# ------------------------------------------------------------------------ the float64 proof
@pytest.mark.shared_golden
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp64_golden_command(shared_golden, synth_ckpt_dir, variant, tmp_path, capsys):
    """`effdet-parity golden` on the official float64 recording: exit 0, every key of the file in the
    JSON, every network tap within the float64 rule and ~1e-11 relative of the official float64 run."""
    golden = _fp64_golden(shared_golden, variant)
    out = tmp_path / "out.json"
    rc = cli_main(["golden", "--variant", variant, "--image-size", "256", "--ckpt", str(synth_ckpt_dir(variant)),
                   "--golden", str(golden), "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    keys = set(np.load(golden).files)
    assert set(data) == keys
    assert all(e["verdict"] == "pass" for e in data.values())
    net = {k: e for k, e in data.items() if "/" in k and k.split("/")[1] in
           ("backbone", "resample", "fpn", "class_net", "box_net")}
    assert len(net) >= 55
    for k, e in net.items():
        assert e["noise"] is not None and e["noise_tol"] == pytest.approx(FP64_NOISE_FACTOR * e["noise"])
        # float64 arithmetic: ours and the official agree to ~1e-11 relative (measured ≤ 1.7e-11, d6 random
        # box_net/level7); float32 would be ~1e-6. This bound comes from float64, not from our noise.
        assert e["max_rel_err"] <= 1e-10, k
    # the preprocessed chelsea was recomputed by our fp32 preprocessing from scikit-image's sample: bit-exact
    assert data["input/chelsea_preprocessed"]["max_abs_err"] == 0.0
    assert "fed" not in data["input/chelsea_preprocessed"]["note"]


# ------------------------------------------------------------------------ broken models fail
def _shifted_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest upsample whose source index is off by one: ``min(floor(dst·in/out) + 1, in - 1)``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    iy = torch.clamp(torch.arange(size[0]) * x.shape[-2] // size[0] + 1, max=x.shape[-2] - 1)
    ix = torch.clamp(torch.arange(size[1]) * x.shape[-1] // size[1] + 1, max=x.shape[-1] - 1)
    return x.index_select(-2, iy.to(x.device)).index_select(-1, ix.to(x.device))


BREAKAGES = {
    "bn_epsilon": lambda m, mp: setattr(m.backbone.blocks[5].bn_dw, "eps", 1e-5),
    "same_pad_flipped": lambda m, mp: flip_same_padding(m.backbone.blocks[3].conv_dw),
    "fusion_epsilon": lambda m, mp: mp.setattr("effdet_torch.bifpn._WEIGHT_EPSILON", 1e-3),
    "nearest_off_by_one": lambda m, mp: mp.setattr("effdet_torch.bifpn.resize_nearest_tf1", _shifted_nearest),
}


# ------------------------------------------------------------------ the fused inference model
_FP32_GOLDEN = {"efficientdet-d0": {"random": "tensors_random.npz", "chelsea": "tensors_chelsea.npz"},
                "efficientdet-lite0": {"random": "tensors.npz", "chelsea": "tensors_chelsea.npz"}}
FUSED_FACTOR = 2.0


def _fp64_distances(model, z64, case: str) -> dict[str, float]:
    """``max |ours_fp32 - official_fp64|`` per network tap of ``case`` (on the recorded input)."""
    from effdet_torch.taps import record_taps

    inp = z64["input/random"] if case == "random" else z64[f"input/{case}_preprocessed"]
    x = torch.from_numpy(np.asarray(inp, np.float32)).permute(0, 3, 1, 2).contiguous()
    with record_taps(model) as taps:
        model(x)
    out = {}
    for name, t in taps.items():
        key = f"{case}/{name}"
        if key in z64:
            out[key] = float(np.abs(t.permute(0, 2, 3, 1).double().numpy() - z64[key]).max())
    return out


@pytest.mark.shared_golden
@pytest.mark.parametrize("variant", list(_FP32_GOLDEN))
def test_fused_model_as_close_to_official_fp64_as_official_fp32(shared_golden, synth_ckpt_dir, variant):
    """The CLIs' inference model (``fuse_for_inference``: BNs folded, conv+act fused, SE gates in the
    project weights) in fp32 against the official float64 run, on the inputs both official runs
    recorded: at every network tap its distance from the exact official function is at most
    ``FUSED_FACTOR`` × the larger of the official fp32 run's distance (the fp32 golden: same weights,
    same input) and our unfused fp32 model's. Why this and not only the fp32 goldens' rule: fusing
    rounds differently from TF's conv-then-BN, so fused-vs-official-fp32 is the sum of two independent
    fp32 errors where the unfused model's partly cancel (lite0 chelsea ``pre_nms/boxes`` sits at
    1.0-1.5× the fp32 rule), while measured against the exact function the fused model is as accurate
    as the official one. 2×: the max over a tap of two differently rounded fp32 runs (measured:
    fused ÷ max(official fp32, unfused) 1.07-1.51 on d0 and lite0, both cases). A fold with torch's BN
    epsilon (1e-5 for the official 1e-3) fails it by orders of magnitude."""
    z64 = load_npz(_fp64_golden(shared_golden, variant))
    ckpt = synth_ckpt_dir(variant)
    unfused = create_model(variant, checkpoint=ckpt, image_size=256).eval()
    fused = copy.deepcopy(unfused).fuse_for_inference()
    broken = copy.deepcopy(unfused)
    for m in broken.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-5
    broken.fuse_for_inference()
    for case, name in _FP32_GOLDEN[variant].items():
        path = (PROJECT_GOLDEN if variant == "efficientdet-d0" else shared_golden) / variant / name
        z32 = load_npz(path)
        ours, base, bad = (_fp64_distances(m, z64, case) for m in (fused, unfused, broken))
        keys = [k for k in ours if k in z32]
        assert len(keys) >= 25, f"{case}: only {len(keys)} taps recorded at both precisions"
        ratios = {}
        for k in keys:
            official = float(np.abs(np.asarray(z32[k], np.float64) - z64[k]).max())
            ratios[k] = ours[k] / max(official, base[k])
            assert ours[k] <= FUSED_FACTOR * max(official, base[k]), (
                f"{variant} {k}: fused fp32 is {ours[k]:.3e} from the official fp64, official fp32 {official:.3e}, "
                f"unfused {base[k]:.3e}")
            assert bad[k] > 10 * FUSED_FACTOR * max(official, base[k]) or "backbone" not in k
        assert max(ratios.values()) > 0.5  # the comparison saw the fused model's own rounding

@pytest.mark.shared_golden
@pytest.mark.parametrize("name", list(BREAKAGES))
def test_broken_models_fail_both_rules(name, d0_model, shared_golden, monkeypatch):
    """Each deliberate mistake fails the float64 rule by >= 1e6 and the noise-aware fp32 rule (no
    --strict: the noise allowance is on) at the layer it sits in."""
    broken = copy.deepcopy(d0_model)
    BREAKAGES[name](broken, monkeypatch)
    ref64 = load_npz(_fp64_golden(shared_golden, "efficientdet-d0"))
    ref64 = {k: v for k, v in ref64.items() if k.startswith(("input/random", "random/"))}
    stats, _ = compare_reference(broken, ref64, detailed=False)
    worst = max(s.max_abs_err / s.bound for s in stats if s.bound > 0)
    assert worst > 1e6, f"{name}: worst err/bound {worst:.3g} under the float64 rule"
    stats32, _ = compare_reference(broken, load_npz(PROJECT_GOLDEN / "efficientdet-d0" / "tensors_random.npz"),
                                   detailed=False)
    failed = [s for s in stats32 if not s.passed]
    assert failed, f"{name}: passed the fp32 rule"
    assert max(s.max_abs_err / s.bound for s in failed if s.bound > 0) > 5


def test_fp64_reference_is_recognised_by_dtype():
    assert is_float64_reference({"input/random": np.zeros(2, np.float64)})
    assert is_float64_reference({"input/cat_preprocessed": np.zeros(2, np.float64)})
    assert not is_float64_reference({"input/random": np.zeros(2, np.float32)})
    assert not is_float64_reference({"anchors": np.zeros(2, np.float64)})


def test_rule_arithmetic():
    """The bounds of parity.rules from first principles (the documented formulas)."""
    assert tensor_bounds(9.0, None) == (REL_TOL * 10, None)
    assert tensor_bounds(9.0, 2e-3) == (REL_TOL * 10, NOISE_FACTOR * 2e-3)
    rule, noise = tensor_bounds(1.0, 1e-13, float64=True)
    assert rule == 2.0 ** -50 * 2 and noise == FP64_NOISE_FACTOR * 1e-13
    assert U64 / U32 == 2.0 ** -29
    assert fp64_noise(2.0 ** 29 * 1e-14, 0.0) == pytest.approx(1e-14)  # fp32 gap scaled by the roundoffs
    assert fp64_noise(0.0, 3e-9) == 3e-9  # the one-ulp response where the network is chaotic


@pytest.mark.shared_golden
def test_fp32_goldens_report_both_numbers(d0_golden_results, shared_golden, tmp_path):
    """Every fp32 tensor tap carries the rule's tolerance and the measured fp32-vs-fp64 noise, and the
    noise is real rounding: far below the rule on a real image for d0 (measured ≤ 2e-6 relative).
    The --json file holds both, one entry per key of the golden."""
    golden = PROJECT_GOLDEN / "efficientdet-d0" / "tensors_chelsea.npz"
    results = d0_golden_results[golden.name]  # run_golden of the session's d0 (conftest)
    write_json(results, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == set(np.load(golden).files)
    assert data["detections/chelsea/scores"]["passed"] is True and data["detections/chelsea/scores"]["noise"] > 0
    net = [r for r in results if r.key.split("/")[1:2] and r.key.split("/")[1] in ("backbone", "fpn", "box_net")]
    assert len(net) >= 20
    for r in net:
        assert r.noise is not None and 0 < r.noise < r.tolerance
        assert r.noise_tol == NOISE_FACTOR * r.noise
