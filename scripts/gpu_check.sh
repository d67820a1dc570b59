#!/usr/bin/env bash
# The one GPU check, meant to finish in under 8 minutes: the `gpu`-marked tests (kernels against
# their references on CUDA, fp32 and bf16), then the per-layer benchmarks, whose tables go into
# benchmarks/RESULTS.md (section gpu_quant_linear) and benchmarks/results/*.json.
#
#   bash scripts/gpu_check.sh
#
# Uses the machine's CUDA build of torch (a venv with --system-site-packages, torch and triton
# pinned to what is installed); everything else from constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L
[ -x .venv-gpu/bin/python ] || python3 -m venv --system-site-packages .venv-gpu
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
.venv-gpu/bin/python - > "$pins" <<'PY'
import importlib.metadata as md
for name in ("torch", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
grep -vE '^(torch|triton)==' constraints.txt > "$pins.rest"
.venv-gpu/bin/pip install -q -c "$pins" -c "$pins.rest" -e ".[dev]"
rm -f "$pins.rest"
timeout 300 .venv-gpu/bin/python -m pytest -q -m gpu -p no:cacheprovider
timeout 150 .venv-gpu/bin/python -m benchmarks.quant_linear --gpu
