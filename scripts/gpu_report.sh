#!/usr/bin/env bash
# One device call: the whole server on one GPU with the full random model, load-tested with
# scripts/benchmark.py (streaming and not, fixed 250 speech tokens, first-chunk breakdown per stage),
# GPU memory sampled; then the plain reference pipeline (scripts/plain_reference.py, one request at
# a time) on the same inputs and GPU.
#   bash scripts/gpu_report.sh [MODEL_DIR] [DTYPE] [CONCURRENCY...]
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}; DTYPE=${2:-bf16}; shift 2 2>/dev/null || true
LEVELS=${*:-1 16 64}
PORT=8080
. scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL_DIR/llm.pt" ] || python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR" | tail -1
python3 -m light_tts.server.api_server --model_dir "$MODEL_DIR" --port $PORT --data_type "$DTYPE" \
  --decode_max_batch_size 64 --log_stats_interval 30 > /tmp/server.log 2>&1 &
SERVER=$!
( while kill -0 $SERVER 2>/dev/null; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> /tmp/gpu_mem.txt; sleep 1; done ) &
trap 'kill $SERVER 2>/dev/null; grep -E "ERROR|Traceback" /tmp/server.log | head -5' EXIT
for i in $(seq 1 400); do
  curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -40 /tmp/server.log; exit 1; }
  sleep 1
done
grep -E "ready" /tmp/server.log | head
python3 scripts/benchmark.py --url http://127.0.0.1:$PORT --concurrency $LEVELS --fixed_speech_tokens 250 \
  --stream both --warmup 2 --json ${OUT:-/tmp}/benchmark.json
curl -s http://127.0.0.1:$PORT/metrics | grep -E "^lighttts_llm_(max_batch_size|kv_total)" || true
kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
echo "peak GPU memory used by the server: $(sort -n /tmp/gpu_mem.txt | tail -1) MiB"
timeout 240 python3 scripts/plain_reference.py --model_dir "$MODEL_DIR" --dtype "$DTYPE" --repeat 3
