"""CPU speed of the d0 network beside a baseline, in the same run, as ratios.

    python benchmarks/bench_cpu.py [--variant d0] [--size 512] [--repeats 30]

Baseline: the `effdet` package's ``tf_efficientdet_<variant>`` (the best-known public port;
``pip install effdet`` — not a project dependency) when it is installed; otherwise our own eager
NCHW model is the baseline of the other rows. Runs are interleaved (A, B, A, B, …) and the median
is reported, so load that drifts during the run hits every row alike. The network's speed does not
depend on its weights; post-processing does (the number of boxes above the score threshold), so our
model gets the regenerated golden weights (the synthetic d0 release checkpoint) when the variant
has a BN side-car in golden/, random weights otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _timer(fn, warmup: int = 3):
    for _ in range(warmup):
        fn()

    def once() -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000

    return once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="d0")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="add a torch.compile row (slow to build)")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    from effdet_torch import Detector, create_model
    from effdet_torch.postprocess import postprocess_global

    x = torch.randn(1, 3, args.size, args.size)
    ours = create_model(args.variant, image_size=args.size)
    bn = Path(__file__).resolve().parents[1] / "golden" / "bn_stats" / f"{ours.config.name}.npz"
    if bn.exists():
        from fixtures.synth_ckpt import write_synth_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = write_synth_checkpoint(ours.config.name, tmp, bn_stats_path=bn, progress=False)
            ours = create_model(args.variant, checkpoint=ckpt, image_size=args.size)
        import skimage.data

        x = Detector(ours).preprocess([skimage.data.chelsea()])[0]  # a real image through the official path
    rows: dict[str, object] = {}
    try:
        from effdet import create_model as effdet_create

        base = effdet_create(f"tf_efficientdet_{args.variant}", pretrained=False, pretrained_backbone=False,
                             bench_task="", image_size=(args.size, args.size)).eval()
        rows["baseline: effdet eager (NCHW)"] = _timer(lambda: base(x))
    except ImportError:
        pass
    rows["ours eager (NCHW)"] = _timer(lambda: ours(x))
    cl = create_model(args.variant, image_size=args.size)
    cl.load_state_dict(ours.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    rows["ours eager (channels_last)"] = _timer(lambda: cl(xc))
    if args.compile:
        comp = torch.compile(cl)
        rows["ours channels_last + torch.compile"] = _timer(lambda: comp(xc))
    det = Detector(ours)
    cls, box = det.heads(x)
    anchors = det.anchors((args.size, args.size))
    rows["ours post-processing (official soft-NMS)"] = _timer(
        lambda: postprocess_global(ours.config, cls, box, anchors, (args.size, args.size)))

    samples: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for k, once in rows.items():
            samples[k].append(once())
    med = {k: statistics.median(v) for k, v in samples.items()}
    ref_key = next(iter(rows))
    print(f"{args.variant} at {args.size}x{args.size}, batch 1, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.repeats} interleaved runs")
    for k, v in med.items():
        print(f"  {k:<42} {v:8.1f} ms   {v / med[ref_key]:5.2f}x of {ref_key.split(':')[0]}")


if __name__ == "__main__":
    main()
