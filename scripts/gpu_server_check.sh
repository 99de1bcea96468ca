#!/usr/bin/env bash
# One device call: the server on the GPU with the full random model; one request non-streaming and
# streaming, first-audio latency printed.   bash scripts/gpu_server_check.sh [MODEL_DIR] [DTYPE]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}
DTYPE=${2:-bf16}
PORT=8080
. scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL_DIR/llm.pt" ] || python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR" | tail -1
python3 -m light_tts.server.api_server --model_dir "$MODEL_DIR" --port $PORT --data_type "$DTYPE" \
  > /tmp/server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; tail -5 /tmp/server.log' EXIT
for i in $(seq 1 300); do
  curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat /tmp/server.log; exit 1; }
  sleep 1
done
curl -s http://127.0.0.1:$PORT/healthz; echo
grep -E "ready|LLM ready" /tmp/server.log | head
python3 scripts/request_timing.py --url http://127.0.0.1:$PORT --prompt_wav tests/fixtures/prompt_en.wav \
  --prompt_text "The quick brown fox jumps over the lazy dog." --fixed_speech_tokens 250 --repeat 3
nvidia-smi --query-gpu=memory.used --format=csv,noheader
curl -s http://127.0.0.1:$PORT/metrics | grep -E "^lighttts_(llm_max_batch|first_chunk_seconds_(sum|count))" || true
