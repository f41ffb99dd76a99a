#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare the builtin corpus, train a tiny PanGu-α on
# the CPU, show that it learned (validation perplexity against a unigram model), sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
mkdir -p data_cache
pangu prepare --config configs/tiny.yaml > data_cache/tiny-report.json  # the full report (JSON)
pangu pretrain --config configs/tiny.yaml
pangu evaluate --config configs/tiny.yaml --checkpoint runs/tiny --baseline
pangu plot runs/tiny
pangu generate --checkpoint runs/tiny --prompt "中国经济" --max-new-tokens 40 --top-k 20 --temperature 0.8
