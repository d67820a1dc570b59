#!/usr/bin/env bash
# Creates .venv and installs peftc with its dev extra.
# torch goes in first, pinned to the CPU build, and only when it is missing: an unpinned
# torch requirement resolved by pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"
