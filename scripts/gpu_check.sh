#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent CUDA machine (CI has none), most important
# first, each step under its own time limit and all within BUDGET seconds (default 540; a step that
# no longer fits is skipped and reported). Not yet run on a GPU: the limits are estimates.
#   1. effdet-bench d0 on CUDA, batch 1 8 32, beside the effdet package (issue 11: d0 batch 32 >= 2x
#      the seed's 163 FPS)
#   2. batching on CUDA: batch 8 vs single images, interleaved (batch-8 time per image <= batch 1)
#   3. the COCO-eval path on CUDA vs the CPU, 256 synthetic images (same detections and AP; >= 100
#      images/s with the exact soft-NMS)
#   4. the CUDA tests (pytest -m gpu)
#   5. golden checks on CUDA: d0 (bundled goldens), lite0 and d1 (GOLDEN_DIR), regenerated checkpoints
#   6. the seed's table: effdet-bench d0..d7 on CUDA at batch 1 and 32
# Usage, with a lent machine (see /work/.library/device): here `bash scripts/gpu_prepare.sh`, then ONE
# device call with carry [".gpu"], command `bash scripts/gpu_check.sh`, timeout_s 590.
# Elsewhere: bash scripts/gpu_check.sh [GOLDEN_DIR]   (python3 must hold torch with CUDA)
# Writes summary.log and the JSON files to $OUT (default /tmp/effdet-gpu); exit 0 when every step passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/effdet-gpu}"
GOLDEN_DIR="${1:-.gpu/golden}"
WORK="$(mktemp -d /tmp/effdet-gpu-work.XXXXXX)"
DEVICE="${DEVICE:-cuda}"        # DEVICE=cpu: a dry run of the script's plumbing on a CPU machine
QUICK="${QUICK:-0}"             # QUICK=1: tiny sizes, for that dry run
BUDGET="${BUDGET:-540}"         # seconds for the whole script: a device call may run 600 s at most
mkdir -p "$OUT"
exec > >(tee "$OUT/summary.log") 2>&1
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .gpu/wheels/*.whl \
    || echo "gpu_check: installing .gpu/wheels failed; the steps that need them will fail"
  export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY'
import os, platform, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available {torch.cuda.is_available()} "
      f"({name}), {os.cpu_count()} CPUs")
PY
failed=()
step() {  # step NAME SECONDS COMMAND...: run one check under a time limit (and BUDGET), note a failure
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - SECONDS - 10))
  if [ "$left" -lt 20 ]; then echo; echo "=== $name: skipped, the ${BUDGET} s budget is spent"; failed+=("$name (no time)"); return; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo; echo "=== $name ($(date -u +%H:%M:%S), limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"; local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}
if [ "$QUICK" = 1 ]; then sizes=(--image-size 128); n_images=8; rounds=2; variants=(d0 d1); b_d0=(1 2); b_all=(1 2)
else sizes=(); n_images=256; rounds=10; variants=(d0 d1 d2 d3 d4 d5 d6 d7); b_d0=(1 8 32); b_all=(1 32); fi

step "effdet-bench d0" 150 python3 -m effdet_cli.bench --variant d0 "${sizes[@]}" --device "$DEVICE" \
  --batch "${b_d0[@]}" --repeats 10 -o "$OUT/bench_d0.json" --force
step "batching" 90 python3 benchmarks/bench_batching.py --variant d0 --batch 8 --rounds "$rounds" --device "$DEVICE"
step "eval path" 150 python3 benchmarks/gpu_eval_check.py --device "$DEVICE" --num-images "$n_images" \
  --batch-size 32 "${sizes[@]}" --json "$OUT/eval.json"
step "CUDA tests" 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rs
golden_check() {
  local fail=0 v npz tag
  for v in efficientdet-d0 efficientdet-lite0 efficientdet-d1; do
    for npz in golden/$v/*.npz "$GOLDEN_DIR"/$v/*.npz; do
      [ -f "$npz" ] || continue
      [ -d "$WORK/$v" ] || python3 -m effdet_cli.parity synth-ckpt --variant "$v" --bn-stats "golden/bn_stats/$v.npz" \
        -o "$WORK/$v" -q >/dev/null || { fail=1; continue; }
      tag="$v-$(basename "$npz" .npz)"
      python3 -m effdet_cli.parity golden --variant "$v" --weights "$WORK/$v" --golden "$npz" --device "$DEVICE" \
        --json "$WORK/$tag.json" > "$WORK/$tag.txt" 2>&1 || fail=1
      echo "$tag on $DEVICE: $(grep 'keys compared' "$WORK/$tag.txt")"
      grep FAIL "$WORK/$tag.txt" | cut -c1-160
    done
  done
  return $fail
}
export -f golden_check
export WORK GOLDEN_DIR DEVICE
step "goldens" 150 bash -c golden_check
step "seed's table" 200 python3 -m effdet_cli.bench --variant "${variants[@]}" "${sizes[@]}" --device "$DEVICE" \
  --batch "${b_all[@]}" --repeats 5 -o "$OUT/bench_all.json" --force
echo
if [ "${#failed[@]}" -eq 0 ]; then echo "gpu_check: every step passed"; rm -rf "$WORK"; exit 0; fi
printf 'gpu_check: failed: %s\n' "${failed[@]}"; rm -rf "$WORK"; exit 1
