#!/usr/bin/env bash
# GPU checks for a CUDA machine (run by hand where one is lent; CI has none):
#   the CUDA tests, the golden check on CUDA for d0 (bundled goldens) and for every golden set in
#   $GOLDEN_DIR/<variant>/ (regenerated checkpoints), and the CPU-vs-CUDA eval-path agreement.
# Usage: bash scripts/gpu_check.sh [GOLDEN_DIR]      (python3 must hold torch with CUDA)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=2
GOLDEN_DIR="${1:-../shared/golden}"
OUT="${OUT:-/tmp/effdet-gpu}"
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
fail=0
python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rs 2>&1 | tail -15 || fail=1
for v in efficientdet-d0 efficientdet-lite0 efficientdet-d1; do
  python3 -m effdet_cli.parity synth-ckpt --variant "$v" --bn-stats "golden/bn_stats/$v.npz" -o "$OUT/$v" --force -q >/dev/null || fail=1
  for npz in golden/$v/*.npz "$GOLDEN_DIR"/$v/*.npz; do
    [ -f "$npz" ] || continue
    python3 -m effdet_cli.parity golden --variant "$v" --weights "$OUT/$v" --golden "$npz" --device cuda \
      --json "$OUT/$v-$(basename "$npz" .npz).json" > "$OUT/$v-$(basename "$npz" .npz).txt" 2>&1 || fail=1
    echo "$v $(basename "$npz") on cuda: $(grep 'taps compared' "$OUT/$v-$(basename "$npz" .npz).txt")"
    grep FAIL "$OUT/$v-$(basename "$npz" .npz).txt" | cut -c1-160
  done
done
python3 benchmarks/gpu_eval_check.py 2>&1 | tail -12 || fail=1
exit $fail
