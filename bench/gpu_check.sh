#!/usr/bin/env bash
# GPU check of the with-past ONNX export, in one command (for a CUDA machine; not run in CI).
#
#   bench/gpu_check.sh [OUT_DIR]          # default: $OUT if set, else bench/work/decoder/gpu
#   PYTHON=/path/to/python bench/gpu_check.sh /tmp/out
#
# Builds a 0.43B Llama from a config (24 layers, hidden 1024, 16/4 heads, vocab 32000; random
# weights, no download), exports it with surgery.onnx.decoder in fp16, runs validate_generation
# on CUDA (onnxruntime CUDAExecutionProvider when it really loads, PyTorch fp16 on the GPU as the
# reference; greedy 32 tokens, left-padded batch, prompt longer than the export), then times greedy
# decoding (32 tokens after 16 / 240 / 1024 prompt tokens) with IOBinding (the cache stays on the
# GPU between steps) against PyTorch generate. Writes gpu_validation.json, gpu_check.json and
# gpu_check.log to OUT_DIR (small files only; the 0.9 GB model goes to $SCRATCH).
#
# Needs: python with torch (CUDA build), transformers, onnx, onnxscript, onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/work/decoder/gpu}}"
SCRATCH="${SCRATCH:-/tmp/surgery-gpu-check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR" "$SCRATCH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  "$PY" - <<'PY'
import onnxruntime as ort, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| onnxruntime", ort.__version__,
      ort.get_available_providers())
PY
  "$PY" bench/bench_decoder.py gpu --out "$OUT_DIR" --scratch "$SCRATCH" --device cuda "${@:2}"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
