#!/usr/bin/env bash
# One command wherever a GPU is available (under 10 minutes on one H100/H200):
#   bash bench/gpu.sh [--out DIR]
# 1. the CUDA tests of the kernels, the decode CUDA graphs and the warm-up (pytest, if the container has it),
# 2. bench/kernel_speed.py --quick (FP8 GEMM vs torch bf16 at the V3 shapes, mla_decode GB/s vs a device copy),
# 3. bench/layer.py (one real-size V3.1 MoE layer, eager and CUDA-graph rows),
# 4. bench/e2e.py (the demo checkpoint end to end on CUDA: the engine's logits against the CPU path, then the
#    server with its CUDA graphs answering one MCP chat and one /v1/chat/completions),
# 5. bench/speculative.py on CUDA (decode tok/s with K = 0..3 drafts: replayed at set acceptances, and the MTP
#    layer's).
# Prints one markdown report and writes it to DIR/gpu.md (default bench/out).
# Installs into a temporary folder only (never the machine's environment): this package without dependencies,
# where the interpreter cannot import it, and the wheels in .whl/ (bench/wheels.sh; carry .whl to a machine
# without a package index). Steps 1-3 need torch, triton and safetensors; step 4 the server's packages.
# Without CUDA it runs what it can and says where a GPU is needed.
set -u
cd "$(dirname "$0")/.."
OUT=bench/out
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu.sh [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
REPORT="$OUT/gpu.md"
SITE=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
if ! PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" $PY -c "import deepseek_mcp.kernels" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
    || echo "could not install this package into $SITE (setuptools >= 69 is needed to build it)" >&2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "# bench/gpu.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
  $PY -c "import torch, triton; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'; \
print(f'device: {d}; torch {torch.__version__}; triton {triton.__version__}')" 2>&1
  echo
  echo "## CUDA tests"
  if [ "$CUDA" != 1 ]; then
    echo "skipped: no CUDA device (on CPU the same tests run through the Triton interpreter in the normal suite)"
  elif $PY -c "import pytest" 2>/dev/null; then
    echo '```'
    timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_fp8.py tests/test_kernels_mla.py \
      tests/test_kernels_moe.py tests/test_kernels_fused.py tests/test_cuda_graphs.py tests/test_warmup.py 2>&1 | tail -15
    echo '```'
  else
    echo "skipped: pytest is not installed in this container (nothing is installed by this script)"
  fi
  echo
  echo "## bench/kernel_speed.py --quick"
  echo '```'
  timeout 180 $PY bench/kernel_speed.py --quick 2>&1 | tail -60
  echo '```'
  echo
  echo "## bench/layer.py"
  timeout 200 $PY bench/layer.py --out "$OUT" 2>&1 | tail -40
  echo
  echo "## bench/e2e.py"
  timeout 300 $PY bench/e2e.py --prompts 2 --out "$OUT" 2>&1 | tail -40
  echo
  echo "## bench/speculative.py (issue 24: the verify path's cost on the GPU, the MTP layer's overhead)"
  if [ "$CUDA" = 1 ]; then
    timeout 150 $PY bench/speculative.py --device cuda --dtype bfloat16 --runs 3 --tokens 32 --batches 1 2>&1 | tail -40
  else
    echo "skipped: no CUDA device (the CPU rows are in bench/RESULTS.md)"
  fi
} | tee "$REPORT"
echo "report written to $REPORT"
