#!/usr/bin/env bash
# One-GPU check (benchmarks/gpu_check.py): run from anywhere, prints one JSON line; exit 1 when a
# check fails. No network: with WHEELS=DIR it installs the project from wheels in DIR only.
#   benchmarks/gpu_check.sh [--dry-run] [--out summary.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e .
fi
export PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python TOKENIZERS_PARALLELISM=false
case " $* " in
    *" --dry-run "*) export DS_ACCELERATOR=cpu ;;
    *) unset DS_ACCELERATOR ;;  # DeepSpeed finds CUDA itself
esac
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
