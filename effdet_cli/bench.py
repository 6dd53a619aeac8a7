"""``effdet-bench``: network and end-to-end time, images/s and peak memory per variant, input size
and batch, ours beside the ``effdet`` package (when installed), in one process, interleaved.

    effdet-bench --variant d0                       # batch 1 and 32 at the variant's size, CPU
    effdet-bench --variant d0 d1 --batch 1 8 --repeats 10 --json bench.json
    effdet-bench --variant d0 --device cuda         # the seed's FPS / "extreme FPS" columns

Rows per (variant, size, batch):
- ``network``: the model on a preprocessed batch (ours: ``EfficientDet`` with its heads flattened,
  through ``iter_network`` — image by image on the CPU; effdet: its ``tf_efficientdet_*`` model),
  ms per batch;
- ``end-to-end``: uint8 images → official preprocessing → network → post-processing → detections
  (ours: the official global soft-NMS; effdet: its ``DetBenchPredict`` with its own NMS, on the same
  preprocessed batch), ms per batch, and images/s;
- peak memory of one end-to-end batch: CUDA ``max_memory_allocated``; CPU the process's peak RSS
  (``VmHWM``, reset before the run; it includes the loaded models).
Every timed call runs once per repeat, rows interleaved (A, B, A, B, …), median reported; ratios
are ours ÷ effdet. Weights are random unless ``--weights`` is given: the network's speed does not
depend on them, the soft-NMS's does (random weights put every anchor above the 0.001 score
threshold with nearly equal scores, its slowest case; they are drawn from seed 0, so every run
measures the same load). Exit status: 0 done, 1 a run failed, 2 usage error.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from effdet_torch import Detector, create_model
from effdet_torch.model import compile_network, iter_network
from effdet_torch.config import resolve_variant_name
from effdet_torch.files import write_json

from .common import (
    EXIT_FAILED,
    EXIT_USAGE,
    VARIANT_HELP,
    add_compile,
    add_device,
    add_output,
    add_variant,
    add_weights,
    error,
    parse_args,
)

__all__ = ["main", "run_bench"]
PROG = "effdet-bench"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant(p, nargs="+", default=["efficientdet-d0"], help=VARIANT_HELP + "; several allowed")
    p.add_argument("--image-size", default=None, help="network input: N or 'WxH' (default: each variant's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row first")
    add_device(p)
    add_compile(p)
    add_weights(p, required=False, help="checkpoint for our model (.pth/.h5/TF dir); default random weights")
    p.add_argument("--no-effdet", action="store_true", help="skip the effdet package's rows")
    add_output(p, help="write the rows and the machine as JSON here")
    p.add_argument("--json", dest="output", help=argparse.SUPPRESS)  # the earlier spelling
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(fn: Callable[[], object], device) -> tuple[float | None, str]:
    """MiB: CUDA ``max_memory_allocated`` of one call, or the CPU process's peak RSS during it."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        fn()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process peak RSS"
    except OSError:
        pass
    import resource

    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (since start)"


def _effdet_bench(variant: str, hw: tuple[int, int], device):
    """The effdet package's ``tf_efficientdet_*`` as (network, DetBenchPredict) or None if absent."""
    try:
        from effdet import create_model as effdet_create_model
    except ImportError:
        return None
    name = "tf_" + variant.replace("-", "_")
    try:
        bench = effdet_create_model(name, bench_task="predict", pretrained=False, pretrained_backbone=False,
                                    image_size=hw)
    except Exception as e:  # an unknown name in this effdet release
        print(f"effdet-bench: note: effdet has no {name} ({type(e).__name__}: {e}); its rows are skipped",
              file=sys.stderr)
        return None
    bench = bench.eval().to(device)
    return bench.model, bench


def run_bench(variants: Sequence[str], batches: Sequence[int], image_size=None, repeats: int = 5, warmup: int = 1,
              device: str = "cpu", weights: str | None = None, with_effdet: bool = True,
              compile: bool = False, on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One dict per (implementation, variant, size, batch); see the module docstring. ``on_rows``
    gets each (variant, batch)'s new rows as soon as they are measured (the command prints them)."""
    import numpy as np
    import torch


    torch.set_grad_enabled(False)
    dev = torch.device(device)
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    for v in variants:
        name = resolve_variant_name(v)
        torch.manual_seed(0)  # random weights decide the soft-NMS's load: the same ones every run
        model = create_model(name, checkpoint=weights, image_size=image_size).fuse_for_inference().to(dev)
        if compile:
            compile_network(model)
        det = Detector(model)
        hw = tuple(det.image_size)
        torch.manual_seed(0)
        base = _effdet_bench(name, hw, dev) if with_effdet else None
        for b in batches:
            images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(b)]  # a VGA photo's size
            x, _ = det.preprocess(images)
            calls: dict[tuple[str, str], Callable[[], object]] = {
                ("ours", "network"): lambda: list(iter_network(model, x)),
                ("ours", "end-to-end"): lambda: det(images),
            }
            if base is not None:
                net, predict = base

                def effdet_e2e(net=net, predict=predict):
                    xb, _ = det.preprocess(images)  # the same official preprocessing
                    return predict(xb)

                calls[("effdet", "network")] = lambda: net(x)
                calls[("effdet", "end-to-end")] = effdet_e2e
            times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
            for fn in calls.values():
                for _ in range(warmup):
                    fn()
            _sync(dev)
            for _ in range(repeats):
                for key, fn in calls.items():
                    t = time.perf_counter()
                    fn()
                    _sync(dev)
                    times[key].append((time.perf_counter() - t) * 1000)
            for impl in ("ours", "effdet"):
                if (impl, "network") not in calls:
                    continue
                mem, mem_kind = _peak_memory(calls[(impl, "end-to-end")], dev)
                net_ms = statistics.median(times[(impl, "network")])
                e2e_ms = statistics.median(times[(impl, "end-to-end")])
                label = "ours+compile" if impl == "ours" and compile else impl
                rows.append({"impl": label, "variant": name, "image_size": list(hw), "batch": b,
                             "network_ms": net_ms, "end_to_end_ms": e2e_ms, "images_per_s": b * 1000 / e2e_ms,
                             "network_images_per_s": b * 1000 / net_ms, "peak_memory_mib": mem,
                             "memory": mem_kind, "repeats": repeats})
            if base is not None:
                ours, theirs = rows[-2], rows[-1]
                ours["network_ratio"] = ours["network_ms"] / theirs["network_ms"]
                ours["end_to_end_ratio"] = ours["end_to_end_ms"] / theirs["end_to_end_ms"]
            if on_rows is not None:
                on_rows(rows[-2:] if base is not None else rows[-1:])
    return rows


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        from importlib.metadata import PackageNotFoundError, version

        info["effdet"] = version("effdet")
    except PackageNotFoundError:
        info["effdet"] = None
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


_HEAD = (f"{'impl':<12} {'variant':<19} {'size':>9} {'batch':>5} {'network ms':>11} {'end-to-end ms':>14} "
         f"{'img/s':>8} {'peak MiB':>9} {'net ratio':>9} {'e2e ratio':>9}")


def format_row(r: dict) -> str:
    """One line of the table under :data:`_HEAD`."""
    size = "x".join(str(s) for s in r["image_size"][::-1])
    nr = f"{r['network_ratio']:.2f}x" if "network_ratio" in r else ""
    er = f"{r['end_to_end_ratio']:.2f}x" if "end_to_end_ratio" in r else ""
    mem = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "n/a"
    return (f"{r['impl']:<12} {r['variant']:<19} {size:>9} {r['batch']:>5} {r['network_ms']:>11.1f} "
            f"{r['end_to_end_ms']:>14.1f} {r['images_per_s']:>8.2f} {mem:>9} {nr:>9} {er:>9}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args

    def fail(msg: str, code: int = EXIT_FAILED) -> int:
        return error(PROG, msg, code)

    import torch

    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        return fail("--batch and --repeats must be >= 1, --warmup >= 0", EXIT_USAGE)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail("--device cuda but CUDA is not available")
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not args.force:
        return fail(f"{out} exists (use --force to overwrite)")
    if args.weights and not Path(args.weights).exists():
        return fail(f"--weights {args.weights}: no such file or folder")
    info = machine()
    print(f"{info['cpu_count']} CPUs, torch {info['torch']} ({info['torch_threads']} threads), device {args.device}"
          f"{', ' + info['cuda_device'] if 'cuda_device' in info else ''}; effdet {info['effdet'] or 'not installed'}; "
          f"median of {args.repeats} interleaved runs; ratio = ours / effdet")
    print(_HEAD, "-" * len(_HEAD), sep="\n", flush=True)
    try:  # each row printed as soon as it is measured: a long run shows its progress
        rows = run_bench(args.variant, args.batch, args.image_size, args.repeats, args.warmup, args.device,
                         args.weights, not args.no_effdet, compile=args.compile,
                         on_rows=lambda new: print(*map(format_row, new), sep="\n", flush=True))
    except (ValueError, OSError, RuntimeError) as e:
        return fail(f"{type(e).__name__}: {e}")
    if out is not None:
        write_json(out, {"machine": info, "device": args.device, "rows": rows})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
