"""Do anchors that fit the data train better? The elongated-shapes project (poles and cables,
``fixtures/shapes.py --kind elongated``) trained twice from the same official-format d0 checkpoint with
the same seed, batches and steps: once with the official anchors (the project file's default triple),
once with what ``effdet-anchors`` suggests. Prints the coverage of both and the val AP (and AP per
class) after training. A measurement, not a test: ~30 min on 2 CPU cores with the defaults.

    python benchmarks/anchors_elongated.py --out /tmp/elong
    python benchmarks/anchors_elongated.py --out /tmp/elong --weights efficientdet-d0.tar.gz   # real weights

Without ``--weights`` the checkpoint is the synthetic d0 of the golden weights rule (random features:
the run learns from scratch, so the APs stay low; the comparison is what counts).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="working folder (created)")
    ap.add_argument("--weights", help="the official-format d0 checkpoint to start from (default: the synthetic one)")
    ap.add_argument("--images", type=int, default=64, help="training images (default 64; 16 val)")
    ap.add_argument("--size", type=int, default=256, help="image and network size (default 256)")
    ap.add_argument("--epochs", type=int, default=60, help="epochs of each run (default 60: 480 steps at batch 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    py = sys.executable
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run([py, "-m", "fixtures.shapes", str(out), "--kind", "elongated", "--train", str(a.images), "--val",
         str(max(4, a.images // 4)), "--size", str(a.size), "--seed", "1"], REPO)
    weights = a.weights
    if weights is None:
        weights = str(out / "d0-ckpt")
        run([py, "-m", "effdet_cli.parity", "synth-ckpt", "--variant", "d0", "--bn-stats", "auto", "-o", weights,
             "-q", "--force"], REPO)
    text = run([py, "-m", "effdet_cli.anchors", "-c", "0", "-p", "elongated", "--image-size", str(a.size),
                "--no-progress", "-o", str(out / "anchors.json"), "--force"], out)
    print(text)
    report = json.loads((out / "anchors.json").read_text())
    lines = text.split("paste into projects/NAME.yml):\n")[1].splitlines()
    base = (out / "projects" / "elongated.yml").read_text()
    kept = "".join(l + "\n" for l in base.splitlines() if not l.startswith("anchors_"))
    (out / "projects" / "elongated_official.yml").write_text(base)
    (out / "projects" / "elongated_suggested.yml").write_text(kept + "".join(
        l + "\n" for l in lines if l.startswith(("anchors_", "anchor_scale"))))
    results = {}
    for name in ("official", "suggested"):
        log = run([py, "-m", "effdet_cli.train", "-c", "0", "-p", f"elongated_{name}", "--image-size", str(a.size),
                   "--batch-size", str(a.batch_size), "--weights", weights, "--optim", "adamw", "--lr", "2e-3",
                   "--num-epochs", str(a.epochs), "--val-interval", str(a.epochs), "--seed", str(a.seed),
                   "--workers", "1", "-o", str(out / f"logs_{name}"), "--force"], out)
        last = [l for l in log.splitlines() if "val AP" in l][-1]
        results[name] = {"val_ap": float(re.search(r"val AP ([0-9.]+)", last).group(1)),
                         "val_ap50": float(re.search(r"AP50 ([0-9.]+)", last).group(1)), "line": last.strip()}
    print(f"{'anchors':<10} {'IoU>=0.5':>9} {'positives/box':>14} {'val AP':>8} {'val AP50':>9}")
    for name, key in (("official", "current"), ("suggested", "suggested")):
        c = report[key]
        print(f"{name:<10} {100 * c['share_iou_0_5']:>8.1f}% {c['positives_per_box']:>14.2f} "
              f"{results[name]['val_ap']:>8.4f} {results[name]['val_ap50']:>9.4f}")
    for name in results:
        print(f"{name}: {results[name]['line']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
