#!/usr/bin/env bash
# The GPU machine's runs, each one device call (at most 10 minutes, start-up included):
#   bash scripts/gpu.sh MODE [args...]
# MODEL_DIR defaults to /tmp/lighttts-full (written by make_random_model --size full when missing);
# FAMILY=cosyvoice3 makes the default /tmp/lighttts-full-cv3, a full random CosyVoice3 directory.
#   report [MODEL_DIR] [DTYPE] [CONCURRENCY...]   the whole server under load: scripts/bench/benchmark.py,
#          streaming and not, 250 speech tokens, first-chunk breakdown per stage (default levels 1 16 64),
#          GPU memory sampled; then the plain reference pipeline (scripts/bench/plain_reference.py) on the
#          same inputs and GPU
#   server [MODEL_DIR] [DTYPE]   one request at a time, non-streaming and streaming (benchmark.py --repeat 3)
#   ws     [MODEL_DIR] [DTYPE]   WebSocket bistream: scripts/ws_client.py --simulate-stream, --test-interrupt,
#          --bench at 1 and 20 sockets x 5 rounds; nvidia-smi shows which GPU each stage process is on
#   soak   [MODEL_DIR] [MINUTES] [CONCURRENCY]   scripts/soak.py (mixed traffic, then the leak checks);
#          MINUTES (default 8) stays below the 10-minute call
#   model  [MODEL_DIR]           each network timed in bf16 and fp32 (scripts/bench/bench_model.py)
#   llm    [MODEL_DIR]           Triton kernels at real sizes (bench_kernels.py), the LLM engine beside
#          transformers on the same weights (bench_llm.py)
#   decode [MODEL_DIR] [DTYPE] [bench|placement|all]   the decode engine benchmark (bench_decode.py); with
#          2+ GPUs the --decode_process_num 2 placement check (one decode process per GPU)
# Environment:
#   LIGHTTTS_SRC=DIR  run the server from another checkout (its cwd and first on PYTHONPATH); clients, the
#                     model generator and this script stay this checkout's: two commits, one client
#   PORT              the server's port (default 8080)
#   SERVER_ARGS       more api_server flags, after the defaults (so they win), e.g. the A10 memory proof:
#                     SERVER_ARGS="--gpu_memory_limit_gb 22 --decode_max_batch_size 16" bash scripts/gpu.sh report
#                     report then prints "cap: X GB (Y MiB), peak: Z MiB, within cap: yes|no", the peak being
#                     nvidia-smi's memory.used during the run less what was in use before the server started
#   report: FIRST_LONG=N streams one N-token sentence (1500: 60 s) as the first request after the server is
#           ready, then once more warm, each with its chunks' arrival times (benchmark.py --hops), before the load
#   report: MPS=1 runs the server under NVIDIA MPS (a private control daemon, stopped at the end);
#           PLAIN_REFERENCE=0 skips the plain pipeline; PROMPT_WAV / PROMPT_TEXT: another prompt for both
#   ws: DECODE_PROCS (decode processes, default 1)      decode: BENCH_BUDGET_S (default 400), BENCH_MODES
#       (bench_decode.py --modes, e.g. graphs,fused+graphs,fused+graphs+cache)
#   OUT: where the JSON results and the server log go (default /tmp); CUDA_VISIBLE_DEVICES picks GPUs
# .whl/*.whl (packages the GPU image lacks: docs/benchmarks.md) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }
MODE=${1:-}
case "$MODE" in report|server|ws|soak|model|llm|decode) shift ;; *) usage ;; esac
[ "$MODE" != decode ] || case "${3:-all}" in bench|placement|all) ;; *) usage ;; esac

# ---- prelude: wheels, paths ------------------------------------------------------------------------------
CALLER_PYTHONPATH=${PYTHONPATH:-}
SITE=
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  SITE=/tmp/site
fi
export PYTHONPATH=${SITE:+$SITE:}$ROOT${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}
export PYTHONUNBUFFERED=1
SRC=$(cd "${LIGHTTTS_SRC:-$ROOT}" 2>/dev/null && pwd) || { echo "LIGHTTTS_SRC=$LIGHTTTS_SRC: no such directory" >&2; exit 2; }
[ -d "$SRC/light_tts/server" ] || { echo "$SRC has no light_tts/server: not a LightTTS checkout" >&2; exit 2; }
# the server's own path: its checkout first, never this one (unless it is this one)
SERVER_PYTHONPATH=$SRC${SITE:+:$SITE}${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}
PORT=${PORT:-8080}
OUT_DIR=${OUT:-/tmp}
read -r -a EXTRA <<<"${SERVER_ARGS:-}"
FAMILY=${FAMILY:-cosyvoice2}
case "$FAMILY" in cosyvoice2) FULL_DIR=/tmp/lighttts-full ;; cosyvoice3) FULL_DIR=/tmp/lighttts-full-cv3 ;;
  *) echo "FAMILY=$FAMILY: cosyvoice2 or cosyvoice3" >&2; exit 2 ;; esac
RC=0
try() { "$@" || RC=$?; }   # run a step; the call fails at the end if any step did

gpus() { nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; }

ensure_model() {   # MODEL_DIR: write the full random model there unless it is complete
  [ -f "$1/hift.pt" ] && return 0
  local t0=$SECONDS
  python3 -m light_tts.tools.make_random_model --family "$FAMILY" --size full --out "$1" | tail -1 || exit 1
  echo "make_random_model: $((SECONDS - t0)) s wall"
}

# ---- one server: start, wait for /healthz, stop on exit ---------------------------------------------------
SERVER_PID=
SERVER_LOG=/tmp/server.log
launch_server() {   # api_server flags...: in the background, from $SRC; SERVER_PID
  [ "$SRC" = "$ROOT" ] || echo "server from $SRC $(git -C "$SRC" log -1 --format='(%h %s)' 2>/dev/null | cut -c1-72)"
  echo "server flags: $*"
  (cd "$SRC" && PYTHONPATH=$SERVER_PYTHONPATH exec python3 -m light_tts.server.api_server "$@") > "$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
}
wait_healthy() {   # /healthz within HEALTH_TIMEOUT_S (400) seconds, else the log's tail and exit 1
  local t0=$SECONDS
  until curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited during start-up:"; tail -40 "$SERVER_LOG"; exit 1; }
    if (( SECONDS - t0 >= ${HEALTH_TIMEOUT_S:-400} )); then
      echo "server not healthy after $((SECONDS - t0)) s:"; tail -40 "$SERVER_LOG"; exit 1
    fi
    sleep 1
  done
  echo "server healthy after $((SECONDS - t0)) s: $(curl -s "http://127.0.0.1:$PORT/healthz")"
}
start_server() { launch_server "$@"; wait_healthy; }
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
  grep -E "ERROR|Traceback" "$SERVER_LOG" | head -5
  [ "$OUT_DIR" = /tmp ] || cp "$SERVER_LOG" "$OUT_DIR/" 2>/dev/null
  true
}
stop_mps() { [ "${MPS:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control 2>/dev/null; true; }
trap 'stop_server; stop_mps' EXIT
metrics() { curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^lighttts_($1)" || true; }
apps() { nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader || true; }
mem() { nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits | tr -d ' '; }

# ---- modes ------------------------------------------------------------------------------------------------
report() {
  local model_dir=${1:-$FULL_DIR} dtype=${2:-bf16}
  local levels=("${@:3}")
  [ ${#levels[@]} -gt 0 ] || levels=(1 16 64)
  local prompt=()
  [ -n "${PROMPT_WAV:-}" ] && prompt+=(--prompt_wav "$PROMPT_WAV")
  [ -n "${PROMPT_TEXT:-}" ] && prompt+=(--prompt_text "$PROMPT_TEXT")
  gpus; ensure_model "$model_dir"
  if [ "${MPS:-0}" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then echo "MPS: control daemon started"; else echo "MPS: not available"; fi
  fi
  mem > /tmp/gpu_mem_before.txt   # per GPU "index,MiB" before the server starts
  : > /tmp/gpu_mem.txt
  launch_server --model_dir "$model_dir" --port "$PORT" --data_type "$dtype" --decode_max_batch_size 64 \
    --log_stats_interval 30 "${EXTRA[@]}"
  # once a second while the server lives, start-up included
  ( while kill -0 "$SERVER_PID" 2>/dev/null; do mem >> /tmp/gpu_mem.txt; sleep 1; done ) &
  local sampler=$!
  wait_healthy
  grep -E "ready|GPU memory" "$SERVER_LOG" | head -20
  echo "per process at ready (nvidia-smi, empty where the container hides pids): used_memory less the 'holds' logged above is its CUDA context"
  apps
  if [ -n "${FIRST_LONG:-}" ]; then
    try python3 scripts/bench/benchmark.py --url "http://127.0.0.1:$PORT" --repeat 1 --warmup 0 --stream yes \
      --fixed_speech_tokens "$FIRST_LONG" --hops "${prompt[@]}"
    try python3 scripts/bench/benchmark.py --url "http://127.0.0.1:$PORT" --repeat 1 --warmup 0 --stream yes \
      --fixed_speech_tokens "$FIRST_LONG" --hops "${prompt[@]}"
  fi
  try python3 scripts/bench/benchmark.py --url "http://127.0.0.1:$PORT" --concurrency "${levels[@]}" \
    --fixed_speech_tokens 250 --stream both --warmup 2 --json "$OUT_DIR/benchmark.json" "${prompt[@]}"
  metrics "llm_(max_batch_size|kv_total)|decode_prompt_cache"
  echo "per process after the load (nvidia-smi):"
  apps
  stop_server
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  # peak per GPU less that GPU's use before the start; the largest over the GPUs
  local peak_server peak_raw
  read -r peak_server peak_raw < <(awk -F, 'NR == FNR { base[$1] = $2; next }
      { d = $2 - base[$1]; if (d > peak) peak = d; if ($2 > raw) raw = $2 } END { printf "%d %d\n", peak, raw }' \
      /tmp/gpu_mem_before.txt /tmp/gpu_mem.txt)
  echo "peak GPU memory used by the server: $peak_server MiB (nvidia-smi memory.used peak $peak_raw MiB, before the start: $(cut -d, -f2 /tmp/gpu_mem_before.txt | paste -sd/) MiB)"
  local cap_gb= i   # the flag's last value wins, as in argparse
  for i in "${!EXTRA[@]}"; do
    case "${EXTRA[$i]}" in
      --gpu_memory_limit_gb=*) cap_gb=${EXTRA[$i]#*=} ;;
      --gpu_memory_limit_gb) cap_gb=${EXTRA[$((i + 1))]:-} ;;
    esac
  done
  if [ -n "$cap_gb" ]; then
    awk -v cap="$cap_gb" -v peak="$peak_server" 'BEGIN { if (cap + 0 <= 0) exit; mib = cap * 1e9 / 1048576
      printf "cap: %s GB (%.0f MiB), peak: %d MiB, within cap: %s\n", cap, mib, peak, (peak <= mib ? "yes" : "no") }'
  fi
  [ "${PLAIN_REFERENCE:-1}" = 0 ] && return   # PLAIN_REFERENCE=0: skip the reference (saves device time)
  try timeout 240 python3 scripts/bench/plain_reference.py --model_dir "$model_dir" --dtype "$dtype" --repeat 3 "${prompt[@]}"
}

server() {
  local model_dir=${1:-$FULL_DIR} dtype=${2:-bf16}
  gpus; ensure_model "$model_dir"
  start_server --model_dir "$model_dir" --port "$PORT" --data_type "$dtype" "${EXTRA[@]}"
  grep -E "ready" "$SERVER_LOG" | head
  try python3 scripts/bench/benchmark.py --url "http://127.0.0.1:$PORT" --repeat 3 --fixed_speech_tokens 250 \
    --prompt_wav tests/fixtures/prompt_en.wav --prompt_text "The quick brown fox jumps over the lazy dog." \
    --tts_text "LightTTS turns text into speech in the voice of a short recording."
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  metrics "llm_max_batch|first_chunk_seconds_(sum|count)"
}

placement() {   # which GPU each stage process is on (nvidia-smi), with its command line
  local gpu_ids
  gpu_ids=$(nvidia-smi --query-gpu=index,uuid --format=csv,noheader)
  nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader | while IFS=, read -r uuid pid mem; do
    pid=${pid// /}
    echo "GPU $(grep "${uuid// /}" <<<"$gpu_ids" | cut -d, -f1) pid $pid $mem: $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-60)"
  done
}

ws() {
  local model_dir=${1:-$FULL_DIR} dtype=${2:-bf16}
  gpus; ensure_model "$model_dir"
  start_server --model_dir "$model_dir" --port "$PORT" --data_type "$dtype" --decode_process_num "${DECODE_PROCS:-1}" \
    --decode_max_batch_size 64 --bistream_max_len 1000 --log_stats_interval 30 "${EXTRA[@]}"
  echo "== placement (nvidia-smi: which GPU each stage process is on)"; placement
  local client=(python3 scripts/ws_client.py --url "ws://127.0.0.1:$PORT/ws/tts" --max-speech-tokens 100 --timeout 120)
  echo "== simulate-stream"; try "${client[@]}" --simulate-stream --seed 1
  echo "== test-interrupt"; try "${client[@]}" --test-interrupt --seed 2
  echo "== bench 1 x 5"; try "${client[@]}" --bench --parallel 1 --rounds 5 --json "$OUT_DIR/ws_bench_1.json"
  echo "== bench 20 x 5"; try "${client[@]}" --bench --parallel 20 --rounds 5 --json "$OUT_DIR/ws_bench_20.json"
  metrics "llm_(max_batch_size|kv_used|kv_total|running) "
}

soak() {
  local model_dir=${1:-$FULL_DIR} minutes=${2:-8} conc=${3:-16}
  gpus; ensure_model "$model_dir"
  try python3 scripts/soak.py --model_dir "$model_dir" --server_src "$SRC" --minutes "$minutes" --concurrency "$conc" \
    --settle 20 --server_args "--data_type bf16 --decode_max_batch_size $conc --max_total_token_num 16384 --max_req_total_len 2048 --batch_max_tokens 4096 ${SERVER_ARGS:-}"
}

model() {
  local model_dir=${1:-$FULL_DIR} dtype
  gpus
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  ensure_model "$model_dir"
  du -sh "$model_dir"
  for dtype in bf16 fp32; do
    try python3 scripts/bench/bench_model.py --model_dir "$model_dir" --dtype "$dtype" --repeat 20
  done
}

llm() {
  local model_dir=${1:-$FULL_DIR}
  gpus
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  ensure_model "$model_dir"
  echo "## kernels"; try timeout 200 python3 scripts/bench/bench_kernels.py --dtype bf16 --quick
  echo "## LLM engine"; try timeout 330 python3 scripts/bench/bench_llm.py --model_dir "$model_dir"
}

decode() {
  local model_dir=${1:-$FULL_DIR} dtype=${2:-bf16} what=${3:-all} ngpu
  gpus; ensure_model "$model_dir"
  if [ "$what" != placement ]; then
    try python3 scripts/bench/bench_decode.py --model_dir "$model_dir" --dtype "$dtype" --batch_sizes 1,4,16,64 \
      --repeat 5 --budget_s "${BENCH_BUDGET_S:-400}" ${BENCH_MODES:+--modes "$BENCH_MODES"}
  fi
  [ "$what" = bench ] && return
  ngpu=$(nvidia-smi -L | wc -l)
  if [ "$ngpu" -lt 2 ]; then
    echo "placement check needs 2+ GPUs (found $ngpu): run on a 2-GPU kind"
    [ "$what" = placement ] && RC=1
    return
  fi
  echo; echo "== --decode_process_num 2 on $ngpu GPUs =="
  start_server --model_dir "$model_dir" --port "$PORT" --data_type "$dtype" --decode_process_num 2 "${EXTRA[@]}"
  grep -E "\[decode:[0-9]+\].*ready on" "$SERVER_LOG" || true
  placement
  nvidia-smi
}

"$MODE" "$@"
stop_server
exit "$RC"
