#!/usr/bin/env bash
# One device call: the whole server on one GPU with the full random model, load-tested with
# scripts/benchmark.py (streaming and not, fixed 250 speech tokens, first-chunk breakdown per stage),
# GPU memory sampled; then the plain reference pipeline (scripts/plain_reference.py, one request at
# a time) on the same inputs and GPU.
#   bash scripts/gpu_report.sh [MODEL_DIR] [DTYPE] [CONCURRENCY...]
# SERVER_ARGS: more api_server flags, after the defaults (so they win), e.g. the A10 memory proof:
#   SERVER_ARGS="--gpu_memory_limit_gb 22 --decode_max_batch_size 16" bash scripts/gpu_report.sh
# With --gpu_memory_limit_gb it prints "cap: X GB, peak: Y MiB, within cap: yes|no", where the
# peak is nvidia-smi's memory.used during the run less what was in use before the server started.
# PLAIN_REFERENCE=0 skips the plain reference pipeline at the end.
# PROMPT_WAV / PROMPT_TEXT: another prompt for both the benchmark and the plain reference (default:
# benchmark.py's, the 5 s fixture).
# MPS=1 runs the server under NVIDIA MPS (a private control daemon, stopped at the end), so the LLM's
# and the decode process's kernels share the GPU at once instead of taking turns.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}; DTYPE=${2:-bf16}; shift 2 2>/dev/null || true
LEVELS=${*:-1 16 64}
PORT=8080
read -r -a EXTRA <<<"${SERVER_ARGS:-}"
PROMPT=()
[ -n "${PROMPT_WAV:-}" ] && PROMPT+=(--prompt_wav "$PROMPT_WAV")
[ -n "${PROMPT_TEXT:-}" ] && PROMPT+=(--prompt_text "$PROMPT_TEXT")
. scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL_DIR/llm.pt" ] || python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR" | tail -1
FLAGS=(--model_dir "$MODEL_DIR" --port $PORT --data_type "$DTYPE" --decode_max_batch_size 64 --log_stats_interval 30
       "${EXTRA[@]}")
echo "server flags: ${FLAGS[*]}"
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then echo "MPS: control daemon started"; else echo "MPS: not available"; fi
fi
stop_mps() { [ "${MPS:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control 2>/dev/null; true; }
mem() { nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits | tr -d ' '; }
mem > /tmp/gpu_mem_before.txt   # per GPU "index,MiB" before the server starts
: > /tmp/gpu_mem.txt
python3 -m light_tts.server.api_server "${FLAGS[@]}" > /tmp/server.log 2>&1 &
SERVER=$!
( while kill -0 $SERVER 2>/dev/null; do mem >> /tmp/gpu_mem.txt; sleep 1; done ) &
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; stop_mps; grep -E "ERROR|Traceback" /tmp/server.log | head -5' EXIT
for i in $(seq 1 400); do
  curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -40 /tmp/server.log; exit 1; }
  sleep 1
done
grep -E "ready|GPU memory" /tmp/server.log | head -20
echo "per process at ready (nvidia-smi, empty where the container hides pids): used_memory less the 'holds' logged above is its CUDA context"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader || true
python3 scripts/benchmark.py --url http://127.0.0.1:$PORT --concurrency $LEVELS --fixed_speech_tokens 250 \
  --stream both --warmup 2 --json ${OUT:-/tmp}/benchmark.json "${PROMPT[@]}"
curl -s http://127.0.0.1:$PORT/metrics | grep -E "^lighttts_(llm_(max_batch_size|kv_total)|decode_prompt_cache)" || true
echo "per process after the load (nvidia-smi):"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader || true
kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
# peak per GPU less that GPU's use before the start; the largest over the GPUs
PEAK=$(awk -F, 'NR == FNR { base[$1] = $2; next } { d = $2 - base[$1]; if (d > peak) peak = d; if ($2 > raw) raw = $2 }
                END { printf "%d %d", peak, raw }' /tmp/gpu_mem_before.txt /tmp/gpu_mem.txt)
read -r PEAK_SERVER PEAK_RAW <<<"$PEAK"
echo "peak GPU memory used by the server: $PEAK_SERVER MiB (nvidia-smi memory.used peak $PEAK_RAW MiB, before the start: $(cut -d, -f2 /tmp/gpu_mem_before.txt | paste -sd/) MiB)"
CAP_GB=   # the flag's last value wins, as in argparse
for i in "${!EXTRA[@]}"; do
  case "${EXTRA[$i]}" in
    --gpu_memory_limit_gb=*) CAP_GB=${EXTRA[$i]#*=} ;;
    --gpu_memory_limit_gb) CAP_GB=${EXTRA[$((i + 1))]:-} ;;
  esac
done
if [ -n "$CAP_GB" ]; then
  awk -v cap="$CAP_GB" -v peak="$PEAK_SERVER" 'BEGIN { if (cap + 0 <= 0) exit; mib = cap * 1e9 / 1048576
    printf "cap: %s GB (%.0f MiB), peak: %d MiB, within cap: %s\n", cap, mib, peak, (peak <= mib ? "yes" : "no") }'
fi
[ "${PLAIN_REFERENCE:-1}" = 0 ] && exit 0   # PLAIN_REFERENCE=0: skip the reference (saves device time)
timeout 240 python3 scripts/plain_reference.py --model_dir "$MODEL_DIR" --dtype "$DTYPE" --repeat 3 "${PROMPT[@]}"
