#!/usr/bin/env bash
# The device check on a GPU machine (docs/gpu.md): installs what the machine's image lacks from
# the wheels in .whl/ (scripts/gpu_wheels.sh, carried along; no index is reached), then runs
# scripts/gpu_check.py with these arguments (--out DIR, default $OUT; --budget-minutes, default
# 7, which leaves room for the installs and the end inside a 10-minute device command).
# --cpu-smoke runs the same rows on the CPU of a machine where pangu is installed already.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --cpu-smoke "* ]]; then
  started=$SECONDS
  python3 -m pip install -q --no-index --find-links .whl deepspeed megatron-core jieba opencc datasets
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
  echo "[gpu_check] installs took $((SECONDS - started)) s"
fi
exec python3 scripts/gpu_check.py "$@"
