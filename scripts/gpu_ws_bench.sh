#!/usr/bin/env bash
# One device call: the WebSocket bistream path on GPU with the full random model. Starts the server
# (DECODE_PROCS decode processes, spread over the GPUs: nvidia-smi shows where each runs), then
# scripts/ws_client.py: --simulate-stream, --test-interrupt, and --bench at 1 and 20 sockets x 5 rounds.
#   DECODE_PROCS=2 bash scripts/gpu_ws_bench.sh [MODEL_DIR] [DTYPE]
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}; DTYPE=${2:-bf16}
PORT=8080
. scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -f "$MODEL_DIR/llm.pt" ] || python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR" | tail -1
python3 -m light_tts.server.api_server --model_dir "$MODEL_DIR" --port $PORT --data_type "$DTYPE" \
  --decode_process_num "${DECODE_PROCS:-1}" --decode_max_batch_size 64 --bistream_max_len 1000 \
  --log_stats_interval 30 > /tmp/server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; grep -E "ERROR|Traceback" /tmp/server.log | head -5; cp /tmp/server.log ${OUT:-/tmp}/ 2>/dev/null' EXIT
T0=$(date +%s)
for i in $(seq 1 400); do
  curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -40 /tmp/server.log; exit 1; }
  sleep 1
done
echo "server healthy after $(( $(date +%s) - T0 )) s"
echo "== placement (nvidia-smi: which GPU each stage process is on)"
nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader | while IFS=, read -r uuid pid mem; do
  echo "GPU $(nvidia-smi --query-gpu=index,uuid --format=csv,noheader | grep "$uuid" | cut -d, -f1) pid$pid $(tr '\0' ' ' < /proc/${pid// /}/cmdline | cut -c1-60) $(cat /proc/${pid// /}/comm 2>/dev/null) $mem"
done
WS="python3 scripts/ws_client.py --url ws://127.0.0.1:$PORT/ws/tts --max-speech-tokens 100 --timeout 120"
echo "== simulate-stream"; $WS --simulate-stream --seed 1
echo "== test-interrupt"; $WS --test-interrupt --seed 2
echo "== bench 1 x 5"; $WS --bench --parallel 1 --rounds 5 --json ${OUT:-/tmp}/ws_bench_1.json
echo "== bench 20 x 5"; $WS --bench --parallel 20 --rounds 5 --json ${OUT:-/tmp}/ws_bench_20.json
curl -s http://127.0.0.1:$PORT/metrics | grep -E "^lighttts_llm_(max_batch_size|kv_used|kv_total|running) " || true
