#!/usr/bin/env bash
# The one GPU check, meant to finish in under 8 minutes; every step runs even when one before it
# failed, and the script exits non-zero at the end if any did:
#   1. the `gpu`-marked tests (kernels against their references on CUDA: fp32, bf16, fp32 adapters)
#   2. benchmarks.layer: one LoRA linear fwd+bwd, T=8192 d=4096 r=16, bf16 base + fp32 adapters:
#      frozen linear vs HF PEFT's unfused layer vs peftc fused  -> RESULTS.md section layer_gpu
#   3. benchmarks.step_time: a GPU-sized Llama step, frozen base / PEFT / peftc (fused), eager and
#      torch.compile                                           -> RESULTS.md section step_time_gpu
#   4. benchmarks.quant_linear --gpu: the NF4 + LoRA layer       -> RESULTS.md section gpu_quant_linear
#
#   bash scripts/gpu_check.sh             # on a machine with a CUDA device
#   bash scripts/gpu_check.sh --dry-run   # here, on CPU: the same steps at tiny shapes into a temp
#                                         # report, so a typo cannot waste the GPU run
#
# Uses the machine's CUDA build of torch (a venv with --system-site-packages, torch and triton
# pinned to what is installed); everything else from constraints.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
step() {  # step NAME TIMEOUT_S CMD...: run, time, remember a failure, go on
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" || failed+=("$name (rc $?)")
    echo "== $name: $((SECONDS - t0)) s"
}

if [ "${1:-}" = "--dry-run" ]; then
    py=.venv/bin/python
    out=$(mktemp -d)
    report="$out/RESULTS.md"
    step "layer benchmark (dry run)" 300 $py -m benchmarks.layer --dry-run --out "$out" --report "$report"
    step "step benchmark (dry run)" 600 $py -m benchmarks.step_time --quick --gpu-shape --no-progress \
        --out "$out" --report "$report"
    grep -c ':begin -->' "$report" | grep -qx 2 || failed+=("report sections")
    echo "dry-run report: $report"
else
    set -e
    nvidia-smi -L
    [ -x .venv-gpu/bin/python ] || python3 -m venv --system-site-packages .venv-gpu
    .venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
    pins=$(mktemp)
    trap 'rm -f "$pins" "$pins.rest"' EXIT
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
    set +e
    py=.venv-gpu/bin/python
    step "gpu tests" 150 $py -m pytest -q -m gpu -p no:cacheprovider
    step "layer benchmark" 90 $py -m benchmarks.layer --device cuda
    step "step benchmark" 180 $py -m benchmarks.step_time --device cuda --gpu-shape --compile --dropout 0.0 \
        --no-ops --no-progress
    step "quant layer benchmark" 60 $py -m benchmarks.quant_linear --gpu
fi
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all steps passed"
