"""``effdet-train`` (minimal): the seed's project/dataset layout, a few steps, save, resume, load."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fixtures.synthetic_coco import COCO_CATEGORIES, make_synthetic_coco
from effdet_cli.train import main
from training.project import parse_number_list


def test_parse_number_list_is_safe():
    assert parse_number_list("[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]") == [1, 2 ** (1 / 3), 2 ** (2 / 3)]
    assert parse_number_list("[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]") == [[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]]
    for bad in ("__import__('os').system('true')", "[x]", "[1, len('a')]"):
        with pytest.raises(ValueError):
            parse_number_list(bad)


def make_seed_layout(root, num_images=5, val_images=0, seed=3):
    """The seed's layout under ``root``: ``projects/shape.yml``, ``datasets/shape/{train,val}/`` and
    ``datasets/shape/annotations/instances_{train,val}.json`` (synthetic shapes, 64-128 px)."""
    for name, n, s in (("train", num_images, seed), ("val", val_images, seed + 100)):
        if not n:
            continue
        src = root / f"synth_{name}"
        make_synthetic_coco(src, num_images=n, seed=s, min_size=64, max_size=128)
        ds = root / "datasets" / "shape"
        (ds / "annotations").mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "images", ds / name)
        shutil.copy(next((src / "annotations").glob("*.json")), ds / "annotations" / f"instances_{name}.json")
    (root / "projects").mkdir(exist_ok=True)
    names = [c[1] for c in COCO_CATEGORIES]
    (root / "projects" / "shape.yml").write_text(
        "project_name: shape\ntrain_set: train\nval_set: val\nnum_gpus: 1\n"
        "mean: [0.485, 0.456, 0.406]\nstd: [0.229, 0.224, 0.225]\n"
        "anchors_scales: '[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]'\n"
        "anchors_ratios: '[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]'\n"
        f"obj_list: {json.dumps(names)}\n")
    return root, len(names)


@pytest.fixture(scope="module")
def seed_layout(tmp_path_factory):
    return make_seed_layout(tmp_path_factory.mktemp("seed"))


def _args(root, *extra):
    return ["-c", "0", "-p", "shape", "--projects-dir", str(root / "projects"), "--data-path",
            str(root / "datasets"), "--image-size", "64", "--batch_size", "2", "--workers", "0",
            "--saved-path", str(root / "logs"), *extra]


def test_train_saves_resumes_and_loads(seed_layout):
    from effdet_torch.config import get_config
    from effdet_torch.model import EfficientDet, create_model

    root, k = seed_layout
    torch.set_grad_enabled(False)  # e.g. left so by an in-process CLI; training must not care
    try:
        assert main(_args(root, "--max-steps", "2", "--head_only", "True")) == 0
    finally:
        torch.set_grad_enabled(True)
    out = root / "logs" / "shape"
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    # head-only: backbone/BiFPN weights untouched (BN statistics still move, as officially)
    torch.manual_seed(0)  # effdet-train --seed 0 initialises the same way
    init = EfficientDet(get_config("d0", image_size=64, num_classes=k))
    assert torch.equal(ckpt["model"]["backbone.conv_stem.weight"], init.state_dict()["backbone.conv_stem.weight"])
    assert ckpt["step"] == 2 and ckpt["variant"] == "efficientdet-d0"
    # 5 images, batch 2: 2 steps per epoch, so step 2 ends epoch 0 (the file is named after the epoch it ran in)
    assert ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 0
    model = create_model("d0", checkpoint=out / "efficientdet-d0_0_2.pth", image_size=64)
    assert model.config.num_classes == k
    # the EMA weights are saved, not the raw ones: after 2 steps (decay 0.1, then 2/11) they differ
    raw = ckpt["model"]["class_net.predict.conv_pw.bias"]
    assert not torch.equal(model.state_dict()["class_net.predict.conv_pw.bias"], raw)
    assert main(_args(root, "--load_weights", "last", "--max-steps", "3", "--head-only")) == 0
    assert torch.load(out / "last.ckpt", weights_only=True)["step"] == 3
    assert (out / "efficientdet-d0_1_3.pth").is_file()


def test_unknown_category_is_one_line_error(seed_layout, tmp_path, capsys):
    root, _ = seed_layout
    bad = tmp_path / "bad"
    shutil.copytree(root, bad, ignore=shutil.ignore_patterns("logs"))
    yml = bad / "projects" / "shape.yml"
    yml.write_text(yml.read_text().replace('"person", ', ""))
    assert main(_args(bad, "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("effdet-train: error:") and "not in obj_list" in err and err.count("\n") == 1


def test_finetune_official_checkpoint_resume_infer_eval(tmp_path, synth_ckpt_dir, capsys):
    """The issue's path: an official-format TF1 checkpoint (the regenerated d0 release) fine-tuned on a
    generated project in the seed's layout, resumed with ``last``; the weights load in effdet-infer
    and effdet-eval."""
    from effdet_cli.evaluate import main as eval_main
    from effdet_cli.infer import main as infer_main
    from effdet_torch.model import create_model
    from fixtures.shapes import make_shapes_project

    root = make_shapes_project(tmp_path, num_train=4, num_val=2, size=64, seed=5)
    ckpt = synth_ckpt_dir("efficientdet-d0")
    args = ["-c", "0", "-p", "shapes", "--projects-dir", str(root / "projects"), "--data-path", str(root / "datasets"),
            "--image-size", "64", "--batch-size", "2", "--workers", "0", "-o", str(tmp_path / "logs")]
    assert main(args + ["--weights", str(ckpt), "--max-steps", "2"]) == 0
    out = capsys.readouterr()
    assert "class predictor" in out.err and "val AP" in out.out  # 90 COCO classes -> 4 shapes, said once
    assert main(args + ["--weights", "last", "--max-steps", "3"]) == 0
    run = tmp_path / "logs" / "shapes"
    state = torch.load(run / "last.ckpt", weights_only=True)
    assert state["step"] == 3
    # started from the checkpoint's weights, not from a fresh initialisation: 3 warm-up steps move them little
    official = create_model("d0", checkpoint=ckpt, image_size=64).state_dict()["backbone.conv_stem.weight"]
    moved = (state["model"]["backbone.conv_stem.weight"] - official).abs().max() / official.abs().max()
    assert moved < 1e-2, moved

    pth = run / "efficientdet-d0_1_3.pth"
    assert infer_main([str(root / "datasets" / "shapes" / "val"), "--variant", "d0", "--weights", str(pth),
                       "--image-size", "64", "--device", "cpu", "-o", str(tmp_path / "infer"), "-q"]) == 0
    assert len(list((tmp_path / "infer").glob("*.detections.json"))) == 2
    data = root / "datasets" / "shapes"
    metrics = tmp_path / "m.json"
    assert eval_main(["--variant", "d0", "--weights", str(pth), "--image-size", "64", "--images", str(data / "val"),
                      "--annotations", str(data / "annotations" / "instances_val.json"), "--workers", "0",
                      "--no-progress", "--out", str(tmp_path / "dets.json"), "--metrics-out", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["images"] == 2
