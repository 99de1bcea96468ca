#!/usr/bin/env bash
# One device call: Triton kernels checked and timed at real sizes, then the LLM engine benchmark
# beside transformers on the same weights.   bash scripts/gpu_llm_check.sh [MODEL_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}
. scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
[ -f "$MODEL_DIR/llm.pt" ] || python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR" | tail -1
echo "## kernels"; timeout 200 python3 scripts/bench_kernels.py --dtype bf16 --quick
echo "## LLM engine"; timeout 330 python3 scripts/bench_llm.py --model_dir "$MODEL_DIR"
