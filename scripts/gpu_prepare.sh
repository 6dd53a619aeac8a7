#!/usr/bin/env bash
# Run HERE, before a GPU check, on a machine that reaches PyPI: fills .gpu/ (git-ignored; ~14 MB) with
# what a lent GPU machine lacks and the device call must carry (it copies only the working tree):
#   .gpu/wheels/  google-crc32c (TensorBundle checksums), pycocotools (COCO eval), the effdet package
#                 and omegaconf (effdet-bench's baseline rows), built for the GPU image's Python
#                 (its image has torch, torchvision, numpy, numba, h5py, Pillow, pytest, hypothesis)
#   .gpu/golden/  the official chelsea recordings of lite0 and d1 from GOLDEN_DIR (d0's travel in golden/)
# Then ONE device call: carry [".gpu"], command `bash scripts/gpu_check.sh`, timeout_s 590.
# Usage: bash scripts/gpu_prepare.sh [GOLDEN_DIR [PYTHON_VERSION]]   (defaults ../shared/golden, 3.12)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
golden_dir="${1:-../shared/golden}"
py_version="${2:-3.12}"
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/golden
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$py_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "google-crc32c==1.9.0" "pycocotools==2.0.11" "effdet==0.4.1" "omegaconf==2.4.0"
for v in efficientdet-lite0 efficientdet-d1; do
  if [ -f "$golden_dir/$v/tensors_chelsea.npz" ]; then
    mkdir -p ".gpu/golden/$v"
    cp "$golden_dir/$v/tensors_chelsea.npz" ".gpu/golden/$v/"
  else
    echo "gpu_prepare: no $golden_dir/$v/tensors_chelsea.npz; the CUDA golden check of $v will be skipped" >&2
  fi
done
du -sh .gpu
