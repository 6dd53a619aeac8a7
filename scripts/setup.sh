#!/usr/bin/env bash
# Set up (or reuse) the project virtualenv in .venv with everything the demo and the tests need.
# Idempotent: re-runs pip only when pyproject.toml changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
"$PY" - <<'PYCHECK' || { echo "setup: Python >= 3.10 is required (found $("$PY" -V 2>&1))" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYCHECK

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" -V 2>&1)"
  "$PY" -m venv .venv
fi
stamp=".venv/.effdet-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing effdet-parity with its [tf,test] extras into .venv (first run: a few minutes)"
  # The venv takes ~8.5 GB (torch 2.14.1 is a CUDA build, ~5.5 GB; TensorFlow ~2 GB); pip fails
  # half-way with "[Errno 28] No space left on device" when less is free, so say so first.
  free_kb=$(df -Pk .venv | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
    echo "setup: warning: $((free_kb / 1024)) MiB free where .venv lives; the install needs about 10 GB" >&2
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[tf,test]"
  rm -f .venv/.effdet-setup-*
  touch "$stamp"
fi
