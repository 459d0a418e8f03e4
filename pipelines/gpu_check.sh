#!/usr/bin/env bash
# What a GPU run must show (issue 6), in one re-runnable command on a machine with a CUDA device:
#
#     bash pipelines/gpu_check.sh [OUT_DIR]          # default OUT_DIR: out/gpu-check
#
# 1. the CUDA code paths: fp16/bf16/fp32 buckets on the GPU against float32 on the CPU, within the
#    tolerances the README states; post-processing on the device (tests/operators/test_embed.py);
# 2. the benchmark, fp16, for all-MiniLM-L6-v2 and SmolLM2-135M (PromptEOL): the pipeline end to
#    end against sentence-transformers' encode with fp16 on the same GPU and corpus (target >= 2x),
#    the no-op ceiling, and the model's FLOP utilisation.
# Reports land in OUT_DIR (JSON per model, the test log, the GPU's name); the last lines sum up.
# CI has no GPU and never runs this; it stops at once without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu-check}
docs=${DOCS:-20000}

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch; nothing to measure" >&2
    exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"

python -m pytest -m gpu -q tests/operators/test_embed.py 2>&1 | tee "$out/test_gpu.txt"

python pipelines/benchmark.py --docs "$docs" --set model.dtype=float16 \
    --report "$out/minilm-fp16.json" 2>&1 | tee "$out/minilm-fp16.log"
python pipelines/benchmark.py --docs "$docs" --config configs/models/smollm2-135m-prompteol.yaml \
    --set model.dtype=float16 --report "$out/smollm2-fp16.json" 2>&1 | tee "$out/smollm2-fp16.log"

python - "$out" <<'EOF'
import json, sys
from pathlib import Path

for name in ("minilm-fp16", "smollm2-fp16"):
    r = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    ratio = r.get("pipeline_vs_baseline")
    util = r.get("model_flops_utilisation")
    print(
        f"{name}: {r['device']}; pipeline {r['pipeline_rows_per_s']:.0f} rows/s, encode "
        + (f"{r['baseline_rows_per_s']:.0f} rows/s, {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})"
           if ratio else f"unavailable ({r.get('baseline', {}).get('error')})")
        + f"; no-op / pipeline {r.get('noop_vs_pipeline', float('nan')):.1f}x; "
        + f"model {r.get('model_tflops', float('nan')):.1f} TFLOP/s"
        + (f" ({util:.1%} of peak)" if util else "")
    )
EOF
