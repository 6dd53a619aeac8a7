"""Live parity against Google's official EfficientDet, imported from a google/automl checkout.

    pytest --automl-dir=$HOME/src/automl                          # synthetic d0 / lite0 checkpoints
    pytest --automl-dir=$HOME/src/automl --ckpt-dir=$HOME/ckpts   # + every release checkpoint found there

(with ``=``: a separate existing path would be taken for a test path, and pytest would root itself
above the checkout, where it knows neither option)

Every test here needs the official code (``--automl-dir``, with TensorFlow and tf-keras installed)
and skips with the reason otherwise — as in CI, where the official code is absent and the suite
runs on the goldens only. Release checkpoints are found in ``--ckpt-dir`` by their release names:
``efficientdet-d0/`` (extracted), ``efficientdet-d0.tar.gz`` / ``.tgz`` / ``.tar`` or
``efficientdet-d0.h5``; they are compared at the variant's own image size (override with
``EFFDET_PARITY_IMAGE_SIZE``) on a seeded random input and scikit-image's ``chelsea``.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from effdet_torch.config import VARIANTS, get_config
from effdet_torch.model import create_model
from effdet_cli.parity import main as cli_main
from parity.compare import first_divergence, official_layer_guess, tensor_stat
from parity.golden import class_tie_result
from converters.sources import find_release_file
from parity.live import Case, compare_against, official_run
from parity.report import format_table

from .conftest import PROJECT_GOLDEN, SHARED_GOLDEN

torch.set_grad_enabled(False)
pytestmark = pytest.mark.tf


def _assert_parity(stats, what: str) -> None:
    first = first_divergence(stats)
    assert first is None, (f"{what}: first divergence {first.key} ({first.module} / {first.official})\n"
                           + format_table(stats, only_failures=True))


@pytest.mark.parametrize("variant", ["efficientdet-d0", "efficientdet-lite0"])
def test_live_synthetic_checkpoint(official, synth_ckpt_dir, chelsea_png, variant):
    ckpt = synth_ckpt_dir(variant)
    cases = [Case("random", "random", seed=1234), Case("chelsea", "image", path=str(chelsea_png))]
    run = official_run(official, variant, ckpt, cases, (256, 256))
    meta = run.meta
    lr = meta["load_report"]
    assert lr["n_weights_equal_to_their_EMA_key"] == lr["n_keras_weights"] > 0 and not lr["weights_not_from_ema"]
    # The worker's taps are the official computation the goldens recorded (same code, weights, inputs).
    goldens = [p for d in (PROJECT_GOLDEN / variant, SHARED_GOLDEN / variant) if d.is_dir() for p in d.glob("tensors*.npz")]
    n_checked = 0
    for g in goldens:
        with np.load(g) as z:
            for k in z.files:
                # tensors; the detections are compared with ours below (soft-NMS turns the official
                # graph's own run-to-run rounding into row order changes, so rows are not comparable 1:1)
                if (k in run.tensors and not k.startswith(("input/", "detections/", "eval_detections/"))
                        and "img1" not in k):
                    if k.endswith("pre_nms/classes0"):  # argmax: equal but for near-ties of the logits
                        case = k.split("/")[0]
                        nc = get_config(variant).num_classes
                        logits = np.concatenate([z[f"{case}/class_net/level{l}"].reshape(-1, nc)
                                                 for l in get_config(variant).levels])
                        s = class_tie_result(k, z[k], run.tensors[k], logits)
                    else:
                        s = tensor_stat(k, z[k], run.tensors[k])
                    assert s.passed, f"{g.name}:{k} official run now vs recorded: {s}"
                    n_checked += 1
    if goldens:
        assert n_checked > 20
    # The layer names the worker reports follow the scheme the golden mode names them by.
    backbone = get_config(variant).backbone.name
    for tap, path in meta["layer_paths"].items():
        if re.fullmatch(r"backbone/(block\d+|stem)|fpn/cell\d+/fnode\d+|resample/level\d+", tap):
            assert official_layer_guess(tap, backbone) == path
    model = create_model(variant, checkpoint=ckpt, image_size=256)
    stats, _ = compare_against(model, run.tensors, layer_paths=meta["layer_paths"])
    _assert_parity(stats, variant)
    names = {s.key for s in stats}
    assert {"random/backbone/block15", "chelsea/fpn/cell2/fnode7", "chelsea/class_net/repeat2/level7",
            "detections/chelsea/boxes", "eval_detections/random/generate_detections"} <= names


def test_live_cli_compare_record_visualize(official, synth_ckpt_dir, chelsea_png, tmp_path, capsys):
    ckpt = str(synth_ckpt_dir("efficientdet-d0"))
    out = tmp_path / "rep"
    rc = cli_main(["compare", "--variant", "d0", "--ckpt", ckpt, "--automl-dir", str(official), "--image",
                   str(chelsea_png), "--image-size", "256", "--out", str(out), "--no-progress", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    rep = json.loads((out / "report.json").read_text())
    assert rep["mode"] == "live" and rep["passed"] and rep["meta"]["versions"]["tensorflow"]
    assert (out / "report.html").is_file() and (out / "detections_chelsea.png").is_file()
    rec = tmp_path / "rec"
    rc = cli_main(["record", "--variant", "d0", "--ckpt", ckpt, "--automl-dir", str(official), "--random",
                   "--image", str(chelsea_png), "--image-size", "256", "-o", str(rec), "--detailed", "--no-progress"])
    assert rc == 0, capsys.readouterr().out  # includes the golden check of our model on the recording
    assert (rec / "tensors.npz").is_file() and (rec / "tensors_detailed.npz").is_file()
    assert cli_main(["golden", "--variant", "d0", "--ckpt", ckpt, "--golden", str(rec / "tensors.npz")]) == 0
    png = tmp_path / "vis.png"
    assert cli_main(["visualize", str(chelsea_png), "--variant", "d0", "--ckpt", ckpt, "--automl-dir", str(official),
                     "--image-size", "256", "-o", str(png), "--no-progress"]) == 0
    assert png.is_file()
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_live_release_checkpoint(official, ckpt_dir, chelsea_png, variant):
    if ckpt_dir is None:
        pytest.skip("pass --ckpt-dir=DIR holding official release checkpoints (efficientdet-d0/, "
                    "efficientdet-d0.tar.gz, efficientdet-lite0.tgz, efficientdet-d0.h5, ...)")
    ckpt = find_release_file(variant, ckpt_dir)
    if ckpt is None:
        pytest.skip(f"no {variant} checkpoint in {ckpt_dir} ({variant}/, .tar.gz, .tgz, .tar or .h5)")
    size = os.environ.get("EFFDET_PARITY_IMAGE_SIZE")
    cfg = get_config(variant, image_size=size) if size else get_config(variant)
    hw = tuple(cfg.image_size)
    cases = [Case("random", "random", seed=1234), Case("chelsea", "image", path=str(chelsea_png))]
    run = official_run(official, variant, ckpt, cases, hw)
    model = create_model(variant, checkpoint=ckpt, image_size=hw)
    stats, _ = compare_against(model, run.tensors, layer_paths=run.meta["layer_paths"])
    _assert_parity(stats, f"{variant} ({ckpt.name}) at {hw[0]}x{hw[1]}")
