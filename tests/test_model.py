"""Model structure, sizes and anchors from first principles (non-square and odd sizes included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from effdet_torch.anchors import decode_boxes, generate_anchors
from effdet_torch.config import get_config, parse_image_size, resolve_variant_name
from effdet_torch.model import EfficientDet, create_model
from effdet_torch.postprocess import postprocess_global

torch.set_grad_enabled(False)


def test_parse_image_size():
    assert parse_image_size(512) == (512, 512)
    assert parse_image_size("320x224") == (224, 320)  # official 'WxH': H=224, W=320
    assert parse_image_size((224, 320)) == (224, 320)
    assert parse_image_size("640") == (640, 640)
    with pytest.raises(ValueError):
        parse_image_size(0)


def test_variant_names():
    assert resolve_variant_name("D7X") == "efficientdet-d7x"
    assert resolve_variant_name("efficientdet-lite3x") == "efficientdet-lite3x"
    with pytest.raises(ValueError, match="lite4"):
        resolve_variant_name("lite5")


@pytest.mark.parametrize("hw", [(224, 320), (255, 300), (97, 61)])
def test_level_sizes_and_anchor_count_any_size(hw):
    """Level sizes halve with ceil; the head outputs and the anchors count the same locations."""
    cfg = get_config("d0", image_size=hw)
    m = EfficientDet(cfg).eval()
    cls, box = m(torch.zeros(1, 3, *hw))
    h, w = hw
    expected = []
    for _ in range(7):
        h, w = -(-h // 2), -(-w // 2)
        expected.append((h, w))
    assert [tuple(c.shape[-2:]) for c in cls] == expected[2:7]
    assert [c.shape[1] for c in cls] == [9 * 90] * 5 and [b.shape[1] for b in box] == [36] * 5
    anchors = generate_anchors(cfg, hw)
    assert anchors.shape == (sum(a * b for a, b in expected[2:7]) * 9, 4)


def test_non_square_anchors_first_principles():
    """'320x224': strides 224/28 = 8 in y and 320/40 = 8 in x at level 3; level 7 is 2x3 with
    strides 224/2 = 112 and 320/3 = 106.67; anchor = centre ± anchor_scale·stride·2^(o/3)·sqrt(a)/2."""
    cfg = get_config("d0", image_size="320x224")
    a = generate_anchors(cfg)
    # level 3, location (0, 0), octave 0, aspect 1.0: centre (4, 4), half size 4·8/2 = 16
    np.testing.assert_allclose(a[0], [4 - 16, 4 - 16, 4 + 16, 4 + 16])
    # level 3, location (0, 1), octave 1, aspect 2.0 (x wider): half_x = 4·8·2^(1/3)·sqrt(2)/2
    hx, hy = 4 * 8 * 2 ** (1 / 3) * np.sqrt(2) / 2, 4 * 8 * 2 ** (1 / 3) / np.sqrt(2) / 2
    np.testing.assert_allclose(a[9 + 4], [4 - hy, 12 - hx, 4 + hy, 12 + hx], rtol=1e-6)
    n3, n4, n5, n6 = 28 * 40, 14 * 20, 7 * 10, 4 * 5
    first7 = 9 * (n3 + n4 + n5 + n6)
    sy, sx = 224 / 2, 320 / 3
    last = a[first7 + 9 * 5 + 8]  # level 7, location (1, 2), octave 2, aspect 0.5
    cy, cx = sy / 2 + sy, sx / 2 + 2 * sx
    hx, hy = 4 * sx * 2 ** (2 / 3) * np.sqrt(0.5) / 2, 4 * sy * 2 ** (2 / 3) / np.sqrt(0.5) / 2
    np.testing.assert_allclose(last, [cy - hy, cx - hx, cy + hy, cx + hx], rtol=1e-6)


def test_decode_boxes_first_principles():
    anchors = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # h 20, w 40, centre (20, 40)
    codes = torch.tensor([[0.5, -0.25, np.log(2.0), 0.0]], dtype=torch.float32)
    out = decode_boxes(codes, anchors)[0].numpy()
    # yc = 0.5·20 + 20 = 30, h = 40; xc = -0.25·40 + 40 = 30, w = 40
    np.testing.assert_allclose(out, [10, 10, 50, 50], rtol=1e-6)


def test_global_postprocess_clips_per_axis_and_scales():
    """Boxes are clipped to the padded input per axis (y to H, x to W) before × image_scale."""
    cfg = get_config("d0", image_size="320x224")
    n = 4
    anchors = torch.tensor([[-50.0, -50.0, 300.0, 400.0], [0, 0, 10, 10], [100, 100, 110, 110], [50, 250, 60, 260]])
    cls = torch.full((1, n, 90), -10.0)
    cls[0, 0, 4] = 3.0
    cls[0, 2, 0] = 2.0
    box = torch.zeros(1, n, 4)
    d = postprocess_global(cfg, cls, box, anchors, (224, 320), image_scale=2.0)
    assert int(d.valid_len[0]) == 2  # sigmoid(-10) = 4.5e-5 is below the 0.001 score threshold
    np.testing.assert_allclose(d.boxes[0, 0].numpy(), [0, 0, 224 * 2, 320 * 2])
    assert d.classes[0, 0] == 5 and d.classes[0, 1] == 1  # 1-based
    np.testing.assert_allclose(d.scores[0, 0].item(), 1 / (1 + np.exp(-3.0)), rtol=1e-6)


def test_create_model_defaults():
    m = create_model("lite0")
    assert not m.training and m.config.image_size == (320, 320) and m.config.act_type == "relu6"


@pytest.mark.parametrize("variant", ["d0", "d3", "d7x", "lite0", "lite3x"])
def test_trainable_parameter_count_is_official(variant):
    """The official trainable parameter count (manifest: tf1_release_ckpt.trainable_params)."""
    import gzip
    import json

    from .conftest import PROJECT_GOLDEN

    name = resolve_variant_name(variant)
    with gzip.open(PROJECT_GOLDEN / "manifests" / f"{name}.json.gz") as f:
        official = json.load(f)["tf1_release_ckpt"]["trainable_params"]
    with torch.device("meta"):
        m = EfficientDet(get_config(name))
    assert sum(p.numel() for p in m.parameters()) == official


@pytest.mark.parametrize("variant", ["d0", "lite0"])
def test_batch_norm_layers_follow_the_config(variant):
    """Every BN layer is built from ``config.bn_eps`` / ``config.bn_momentum``.

    The defaults are the official values (google/automl efficientdet: ``utils.batch_normalization``
    and ``tf2/util_keras.build_batch_norm`` momentum=0.99, epsilon=1e-3; the EfficientNet and lite
    builders ``batch_norm_momentum=0.99``, ``batch_norm_epsilon=1e-3``): TF momentum 0.99 is torch's
    0.01 (torch weighs the new batch statistic, TF the running one). Changed fields reach every layer.
    """
    from dataclasses import replace

    from effdet_torch.ops import BatchNorm2d

    cfg = get_config(variant)
    assert (cfg.bn_eps, cfg.bn_momentum) == (1e-3, 0.99)
    with torch.device("meta"):
        default = EfficientDet(cfg)
        changed = EfficientDet(replace(cfg, bn_eps=1e-5, bn_momentum=0.9))
    for model, eps, momentum in ((default, 1e-3, 0.01), (changed, 1e-5, 0.1)):
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        # backbone + BiFPN + both heads' per-level BNs; every one is the TF-variable BN class
        assert len(bns) > 100 and all(type(m) is BatchNorm2d for m in bns)
        assert {(m.eps, round(m.momentum, 12)) for m in bns} == {(eps, momentum)}


def test_run_network_on_cpu_is_image_by_image():
    """On the CPU a batch runs image by image: each image's flattened outputs are those of a batch of
    one (bit for bit: the batch does not change an image's detections), in the official anchor order
    (flatten_outputs of the whole-batch forward, up to fp32 rounding)."""
    from effdet_torch.model import run_network
    from effdet_torch.postprocess import flatten_outputs

    import copy

    torch.manual_seed(0)
    m = create_model("d0", image_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        cls, box = run_network(m, x)
        one_cls, one_box = run_network(m, x[1:2])
        whole = flatten_outputs(*m(x), m.config.num_classes)
        exact = flatten_outputs(*copy.deepcopy(m).double()(x.double()), m.config.num_classes)
    assert cls.shape == (3, one_cls.shape[1], 90) and box.shape == (3, one_cls.shape[1], 4)
    assert torch.equal(cls[1:2], one_cls) and torch.equal(box[1:2], one_box)
    # as close to the float64 forward as the whole-batch fp32 forward is (4x its measured distance;
    # a wrong level offset or layout is O(1))
    for got, fp32, fp64 in zip((cls, box), whole, exact):
        noise = float((fp32.double() - fp64).abs().max())
        assert float((got.double() - fp64).abs().max()) <= 4 * noise, noise


def test_detector_batch_equals_single_images():
    """The Detector finishes each image before the next on the CPU: a batch's detections are each
    image's own, bit for bit, on both post-processing paths."""
    from effdet_torch import Detector

    torch.manual_seed(0)
    det = Detector(create_model("d0", image_size=64).eval())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(3)]
    x, scales = det.preprocess(images)
    for per_class in (False, True):
        batches = (det(images, per_class=per_class), det.detect_tensor(x, scales, per_class=per_class))
        for i, img in enumerate(images):
            one = det([img], per_class=per_class)
            for batch in batches:  # from uint8 photos, and from a preprocessed batch
                for f in ("boxes", "scores", "classes", "valid_len"):
                    assert torch.equal(getattr(batch, f)[i:i + 1], getattr(one, f)), (per_class, i, f)


@pytest.mark.parametrize("fold", [False, True])
def test_recording_taps_leaves_outputs_bit_identical(fold):
    """Activations work in place at inference; the tap hooks must never write into the network's
    tensors (the head-repeat taps activate a copy of BN's output)."""
    from effdet_torch.taps import record_all_taps

    torch.manual_seed(0)
    m = create_model("d0", image_size=64).eval()
    if fold:
        m.fuse_for_inference()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = m(x)
        with record_all_taps(m) as taps:
            tapped = m(x)
    assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], tapped[0] + tapped[1]))
    assert torch.equal(taps["class_net/level3"], plain[0][0])
    # the repeat-2 tap is what the next layer consumed: predict(tap) gives the head output
    pred = m.class_net.predict(taps["class_net/repeat2/level3"])
    torch.testing.assert_close(pred, plain[0][0], rtol=0, atol=0)


def test_weights_of_another_variant_are_a_checkpoint_error(tmp_path):
    """create_model refuses a state dict that does not fit with the one checkpoint error (every command
    reports it as one line), naming the file, the count and the first mismatching shape."""
    from effdet_torch.checkpoint import CheckpointError

    path = tmp_path / "d0.pth"
    state = create_model("d0").state_dict()
    state.pop("backbone.conv_stem.weight")
    torch.save(state, path)
    expected = (rf"{path}: does not fit efficientdet-d1: \d+ shape mismatch\(es\), first \S+: checkpoint "
                r"\(96, 1, 3, 3\) vs model \(16, 1, 3, 3\); \d+ missing, e.g. \['backbone.conv_stem.weight'")
    with pytest.raises(CheckpointError, match=expected):
        create_model("d1", checkpoint=path)
