#!/usr/bin/env bash
# Sets up, lints and runs the whole test suite (CPU only; multi-process tests use gloo).
# Arguments go to pytest: ./scripts/test.sh -m "not slow" is the fast loop (a couple of minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check pangu tests bench             # lint (settings in pyproject.toml)
ruff format --check pangu tests bench
python -m pytest -q "$@"
