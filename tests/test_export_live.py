"""Exported official formats loaded by the official code itself (needs --automl-dir and TensorFlow).

    pytest tests/test_export_live.py --automl-dir=$HOME/src/automl

The official loader (``util_keras.restore_ckpt(..., skip_mismatch=False)``) restores our TF1 export,
the official Keras model ``load_weights`` our ``.h5`` (by position: the weight order must be the
official one), and ``effdet-parity compare`` passes on both, also for a custom class count (the
official config then gets ``num_classes``, as ``--hparams num_classes=N`` would set it).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effdet_torch.config import get_config
from converters.convert import convert_checkpoint, load_state_dict_file, save_state_dict
from effdet_cli.export import main as export_main
from effdet_cli.parity import main as parity_main

pytestmark = [pytest.mark.tf, pytest.mark.slow]


@pytest.fixture(scope="module")
def d0_pth(synth_ckpt_dir, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("pth") / "d0.pth"
    save_state_dict(convert_checkpoint(synth_ckpt_dir("efficientdet-d0"), "d0").state_dict, p, get_config("d0"))
    return p


@pytest.fixture(scope="module")
def d0_7cls_pth(d0_pth, tmp_path_factory) -> Path:
    """d0 with a 7-class head (seeded N(0, 0.01) weights, bias -4.6 as the official prior init)."""
    state = load_state_dict_file(d0_pth)
    g = torch.Generator().manual_seed(7)
    w = state["class_net.predict.conv_pw.weight"]
    state["class_net.predict.conv_pw.weight"] = torch.randn((9 * 7, *w.shape[1:]), generator=g) * 0.01
    state["class_net.predict.conv_pw.bias"] = torch.full((9 * 7,), -4.6)
    p = tmp_path_factory.mktemp("pth7") / "d0_7.pth"
    save_state_dict(state, p, get_config("d0", num_classes=7))
    return p


def _compare(official: Path, ckpt: Path, image: Path, out: Path) -> dict:
    rc = parity_main(["compare", "--variant", "d0", "--ckpt", str(ckpt), "--automl-dir", str(official), "--image",
                      str(image), "--random", "--image-size", "256", "--out", str(out), "--no-progress", "--quiet",
                      "--no-pictures"])
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and rep["passed"], f"compare failed on {ckpt}: see {out / 'report.json'}"
    return rep


@pytest.mark.parametrize("which", ["90 classes", "7 classes"])
def test_official_loader_restores_tf1_export(official, d0_pth, d0_7cls_pth, chelsea_png, tmp_path, capsys, which):
    pth = d0_pth if which == "90 classes" else d0_7cls_pth
    out = tmp_path / "tf1"
    assert export_main(["tf1", "--variant", "d0", "--weights", str(pth), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ('--hparams="num_classes=7"' in printed) == (which == "7 classes")
    rep = _compare(official, out, chelsea_png, tmp_path / "rep")
    lr = rep["meta"]["load_report"]
    assert lr["loader"].endswith("skip_mismatch=False)")
    assert lr["n_weights_equal_to_their_EMA_key"] == lr["n_keras_weights"] == 709
    assert not lr["weights_not_from_ema"] and lr["ckpt_vars_not_used_by_loader"] == ["global_step"]
    assert rep["meta"]["num_classes"] == (90 if which == "90 classes" else 7)


def test_official_keras_loads_h5_export(official, d0_7cls_pth, chelsea_png, tmp_path):
    """Keras loads an .h5 by position: any weight out of the official order breaks this comparison."""
    out = tmp_path / "d0_7.h5"
    assert export_main(["h5", "--variant", "d0", "--weights", str(d0_7cls_pth), "-o", str(out)]) == 0
    rep = _compare(official, out, chelsea_png, tmp_path / "rep")
    assert rep["meta"]["load_report"]["n_keras_weights"] == 709
