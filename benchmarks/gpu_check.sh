#!/usr/bin/env bash
# One GPU check run, at most 8 minutes on one data-center GPU (image: torch, triton, transformers,
# onnx, onnxruntime; TensorRT and mamba-ssm optional). Runs the GPU-capable tests, then
# benchmarks/fsdp_gpu_check.py (FSDP2 training, up to 100 s), then benchmarks/gpu_check.py, whose table is
# printed last. Extra arguments go to gpu_check.py.
#   bash benchmarks/gpu_check.sh                 # JSON results to ${OUT:-/tmp}/gpu_check.json
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-470}   # leave margin under 8 minutes

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA GPU is visible to torch; nothing to check" >&2
  exit 2
fi

echo "== tests on the GPU (kernels, CUDA-graph decode, TensorRT where importable)"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_cuda_graph_decode.py \
  tests/test_trt.py tests/test_plugin_contract.py
TESTS=$?
echo "== tests exit code: $TESTS"

OUTDIR=${OUT:-/tmp}
# FSDP2 training (issue 13): NCCL, bf16 mixed precision, activation checkpointing, kill + resume from the
# sharded checkpoint, on 2 GPUs when there are 2+ (torchrun), else in one process (about a minute).
echo "== FSDP2 training on the GPU(s)"
LEFT=$(( TOTAL - ($(date +%s) - START) ))
FSDP=0
if [ "$LEFT" -ge 240 ]; then
  timeout 100 python benchmarks/fsdp_gpu_check.py --timeout-s 85 --json "$OUTDIR/fsdp_gpu_check.json"
  FSDP=$?
  echo "== FSDP2 check exit code: $FSDP"
else
  echo "gpu_check.sh: only ${LEFT}s left after the tests; skipping benchmarks/fsdp_gpu_check.py (NOT checked)" >&2
fi

LEFT=$(( TOTAL - ($(date +%s) - START) ))
if [ "$LEFT" -lt 120 ]; then
  echo "gpu_check.sh: only ${LEFT}s left after the tests; skipping gpu_check.py" >&2
  exit 1
fi
timeout "$LEFT" python benchmarks/gpu_check.py --budget-s $(( LEFT - 150 )) --json "$OUTDIR/gpu_check.json" "$@"
CHECK=$?
[ "$TESTS" -eq 0 ] && [ "$FSDP" -eq 0 ] && [ "$CHECK" -eq 0 ]
