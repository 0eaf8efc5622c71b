#!/usr/bin/env bash
# Run the test suite on the oldest PyTorch that pyproject.toml allows (torch 2.4.1), in a throw-away venv.
# PyPI's torch 2.4.1 for Linux is a CUDA build (~3 GB with its nvidia-* wheels); it runs on the CPU.
#   bash benchmarks/check_torch_floor.sh [/path/to/venv]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/cellvi-torch-floor}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.4.1"
"$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
OMP_NUM_THREADS=2 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
