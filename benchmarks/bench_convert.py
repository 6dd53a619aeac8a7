"""``convert-ckpt`` cost: wall time and peak RSS of one conversion, beside the checkpoint's size.

    python benchmarks/bench_convert.py CKPT VARIANT [--repeats 3]

Each conversion runs in a fresh subprocess (``python -m effdet_cli.convert``), so the peak RSS
(``ru_maxrss`` of the child) is the conversion's own, including the interpreter and torch import;
a subprocess that only imports them gives the baseline in the same run. Reported: median wall time,
peak RSS, the checkpoint's bytes on disk and peak RSS ÷ checkpoint size.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
    if peak < before:
        peak = before
    return dt, peak / 1024


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path)
    p.add_argument("variant")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    # baseline first: ru_maxrss of children is a running maximum, so the smaller job must come first
    base = [_run([sys.executable, "-c", "import torch, numpy, converters.convert"], env) for _ in range(args.repeats)]
    conv = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"out{i}.pth"
            conv.append(_run([sys.executable, "-m", "effdet_cli.convert", "--variant", args.variant, "--weights", str(args.ckpt),
                              "-o", str(out)], env))
    size = _size(args.ckpt) / 2**20
    bt, bm = statistics.median(t for t, _ in base), max(m for _, m in base)
    ct, cm = statistics.median(t for t, _ in conv), max(m for _, m in conv)
    print(f"checkpoint {args.ckpt} ({size:.1f} MiB), variant {args.variant}, median of {args.repeats}")
    print(f"  import only (baseline): {bt:6.2f} s  peak RSS {bm:7.1f} MiB")
    print(f"  convert-ckpt:           {ct:6.2f} s  peak RSS {cm:7.1f} MiB  "
          f"(+{cm - bm:.1f} MiB over the baseline = {(cm - bm) / size:.2f}x the checkpoint)")


if __name__ == "__main__":
    main()
