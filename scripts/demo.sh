#!/usr/bin/env bash
# Set up .venv if needed, then run the demo on the bundled d0 fixture (see README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m effdet_cli.demo "$@"
