#!/usr/bin/env bash
# One device call: the decode engine benchmark (batch 1/4/16/64; eager, CUDA graphs, torch.compile;
# beside the plain one-request path), then, where 2+ GPUs are visible, the --decode_process_num 2
# placement check (server up, nvidia-smi's process list shows one decode process per GPU).
#   bash scripts/gpu_decode_check.sh [MODEL_DIR] [DTYPE] [bench|placement|all]
# bench < 8 minutes on an H100/H200 (the first full-model write adds ~1 minute);
# placement: run on the nvidia-h100-x2 kind.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${1:-/tmp/lighttts-full}
DTYPE=${2:-bf16}
WHAT=${3:-all}
PORT=8090
. scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -f "$MODEL_DIR/flow.pt" ] || python3 -m light_tts.tools.make_random_model --size full --out "$MODEL_DIR" | tail -1

if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
  python3 scripts/bench_decode.py --model_dir "$MODEL_DIR" --dtype "$DTYPE" --batch_sizes 1,4,16,64 --repeat 5 \
    --budget_s ${BENCH_BUDGET_S:-400}
fi

NGPU=$(nvidia-smi -L | wc -l)
if { [ "$WHAT" = placement ] || [ "$WHAT" = all ]; } && [ "$NGPU" -ge 2 ]; then
  echo; echo "== --decode_process_num 2 on $NGPU GPUs =="
  python3 -m light_tts.server.api_server --model_dir "$MODEL_DIR" --port $PORT --data_type "$DTYPE" \
    --decode_process_num 2 > /tmp/server-decode2.log 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; tail -3 /tmp/server-decode2.log' EXIT
  for i in $(seq 1 400); do
    curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat /tmp/server-decode2.log; exit 1; }
    sleep 1
  done
  curl -s http://127.0.0.1:$PORT/healthz; echo
  grep -E "\[decode:[0-9]+\].*ready on" /tmp/server-decode2.log || true
  nvidia-smi --query-gpu=index,uuid --format=csv,noheader
  nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader | while IFS=, read -r uuid pid mem; do
    echo "$uuid,$pid,$mem, $(ps -o args= -p "${pid// /}" 2>/dev/null | cut -c1-40)"
  done
  nvidia-smi
elif [ "$WHAT" = placement ]; then
  echo "placement check needs 2+ GPUs (found $NGPU): run on the nvidia-h100-x2 kind"
fi
