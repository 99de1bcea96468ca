#!/usr/bin/env bash
# One device call: scripts/soak.py against the whole server on one GPU (full random model), mixed
# streaming / non-streaming / abort / bad traffic, then the leak checks (KV pool free, RSS and GPU
# memory flat). Pick the GPU with CUDA_VISIBLE_DEVICES; a device call is at most 10 minutes, start-up
# included, so MINUTES stays below that.
#   bash scripts/gpu_soak.sh [MODEL_DIR] [MINUTES] [CONCURRENCY]
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}; MINUTES=${2:-8}; CONC=${3:-16}
. scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -f "$MODEL_DIR/llm.pt" ] || python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR" | tail -1
python3 scripts/soak.py --model_dir "$MODEL_DIR" --minutes "$MINUTES" --concurrency "$CONC" --settle 20 \
  --server_args "--data_type bf16 --decode_max_batch_size $CONC --max_total_token_num 16384 --max_req_total_len 2048 --batch_max_tokens 4096"
