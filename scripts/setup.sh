#!/usr/bin/env bash
# Creates .venv (once) and installs pangu into it. torch is pinned to the CPU build that
# these machines cache locally; on a GPU machine install your CUDA torch first and drop the pin.
# pip -qq: errors only (a machine's pip configuration may name indexes that are not there).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import pangu, torch, deepspeed, megatron.core, pytest, transformers, wandb, google.protobuf" 2>/dev/null || ! command -v ruff >/dev/null; then
  python -m pip install -qq --upgrade pip
  python -m pip install -qq "torch==2.13.0" || python -m pip install -qq "torch>=2.5,<2.15"
  python -m pip install -qq -e ".[test]"
fi
