#!/usr/bin/env bash
# LightTTS under gunicorn (seed 001's run.sh): UvicornWorker workers serving wsgi_wrapper:app, which
# starts the backend stages once for all workers (--preload: the master starts it).
#
#   scripts/run.sh                        foreground; logs to stdout/stderr
#   WORKERS=2 ACCESS_LOG=/tmp/lighttts_access.log ERROR_LOG=/tmp/lighttts_error.log scripts/run.sh
#                                         seed 000's gunicorn variant (section 7.3)
#
# Server settings: configs/a10_single.env, plus LIGHTTTS_ENV_FILE if set (read first, so it wins);
# the environment wins over both. wsgi_wrapper.py reads every api_server flag as the environment
# variable of its name in upper case (MODEL_DIR, PORT, MAX_TOTAL_TOKEN_NUM, REQUEST_TIMEOUT, ...)
# and EXTRA_ARGS; unset ones keep the server's defaults (light_tts/server/args.py).
# gunicorn settings: WORKERS (4), TIMEOUT (300), KEEPALIVE (5), ACCESS_LOG (-), ERROR_LOG (-),
# PRELOAD (1), GUNICORN_ARGS (more flags); it binds HOST:PORT, the server's own settings.
# Interpreter: PYTHON or VENV as in start_lighttts_a10.sh. SKIP_CHECKS=1 skips the GPU and model checks.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lighttts_common.sh"
cd "$LT_ROOT"

[ -n "${LIGHTTTS_ENV_FILE:-}" ] && lt_load_env "$LIGHTTTS_ENV_FILE"
lt_load_env "${CONFIG_DIR:-$LT_ROOT/configs}/a10_single.env"
lt_voice_dir   # VOICE_DIR for wsgi_wrapper.py (--voice_dir): <repo>/voices unless set

# Performance environment (seed 001)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-8}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-8}
export CUDA_LAUNCH_BLOCKING=${CUDA_LAUNCH_BLOCKING:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Gunicorn (seed 001)
WORKERS=${WORKERS:-4}
WORKER_CLASS=uvicorn.workers.UvicornWorker
TIMEOUT=${TIMEOUT:-300}
KEEPALIVE=${KEEPALIVE:-5}
ACCESS_LOG=${ACCESS_LOG:--}
ERROR_LOG=${ERROR_LOG:--}

lt_find_python gunicorn
# the bind address is the server's --host/--port (PORT also names the backend instance)
lt_server_settings model_dir host port
if ! lt_is_true "${SKIP_CHECKS:-0}"; then
    lt_gpu_check "${GPU_MEM_NEED_MB:-0}"
    lt_check_model "$MODEL_DIR"
fi

preload=()
lt_is_true "${PRELOAD:-1}" && preload=(--preload)
extra=()
read -r -a extra <<<"${GUNICORN_ARGS:-}"

lt_log "gunicorn: $WORKERS x $WORKER_CLASS on $HOST:$PORT, model $MODEL_DIR"
exec "$PY" -m gunicorn -w "$WORKERS" \
    -k "$WORKER_CLASS" \
    -b "$HOST:$PORT" \
    --timeout "$TIMEOUT" \
    --keep-alive "$KEEPALIVE" \
    --access-logfile "$ACCESS_LOG" \
    --error-logfile "$ERROR_LOG" \
    "${preload[@]}" "${extra[@]}" \
    wsgi_wrapper:app
