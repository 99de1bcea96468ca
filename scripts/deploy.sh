#!/usr/bin/env bash
# One-command deployment under gunicorn (seed 001's deploy.sh): check, write the settings, start
# scripts/run.sh in the background, wait until /healthz is healthy.
#
#   scripts/deploy.sh [MODEL_DIR] [DECODE_WORKERS] [HTTP_WORKERS]   deploy (defaults: the environment
#                     and configs/a10_single.env, else the server's defaults; run.sh's WORKERS)
#   scripts/deploy.sh stop | status
#
# Writes the effective settings to DEPLOY_ENV (configs/production.env), which run.sh reads first.
# Files: LOG_FILE (logs/light-tts.log), PID_FILE (/var/run/light-tts-<PORT>.pid, or
# $PID_DIR/light-tts-<PORT>.pid when /var/run is not writable) holding the gunicorn master's pid: one
# per port, so stop and status act on this deployment's instance only (the port is read from
# DEPLOY_ENV). STARTUP_TIMEOUT (300) bounds the wait. Environment overrides as in run.sh (PORT,
# HOST, PYTHON, ...).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lighttts_common.sh"

CONFIG_DIR=${CONFIG_DIR:-$LT_ROOT/configs}
DEPLOY_ENV=${DEPLOY_ENV:-$CONFIG_DIR/production.env}
LOG_FILE=${LOG_FILE:-$LT_ROOT/logs/light-tts.log}

resolve_pid_file() {   # after PORT is known (lt_server_settings): one pid file per port unless PID_FILE is set
    [ -n "${PID_FILE:-}" ] && return 0
    local dir=/var/run
    [ -w /var/run ] || dir=${PID_DIR:-/tmp}
    PID_FILE=$dir/light-tts-$PORT.pid
}

deployed_settings() {   # stop and status: this deployment's port, from what deploy wrote
    [ -f "$DEPLOY_ENV" ] && lt_load_env "$DEPLOY_ENV"
    PY=${PYTHON:-$(command -v python3)}
    lt_server_settings port
    resolve_pid_file
}

master_pid() {
    local pid
    [ -f "$PID_FILE" ] || return 1
    pid=$(cat "$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && grep -q gunicorn "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

do_stop() {
    local pid i
    [ -n "${PID_FILE:-}" ] || deployed_settings
    if ! pid=$(master_pid); then lt_log "not running (pid file $PID_FILE)"; rm -f "$PID_FILE"; return 0; fi
    kill -TERM "$pid"
    # gunicorn stops its workers; the backend follows its master out
    for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { lt_warn "gunicorn $pid still running after 30 s: SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null; }
    rm -f "$PID_FILE"
    lt_log "stopped (gunicorn master $pid)"
}

do_status() {
    local pid
    deployed_settings
    if pid=$(master_pid); then
        echo "running: gunicorn master $pid, http://127.0.0.1:$PORT/healthz -> $(lt_http_code "http://127.0.0.1:$PORT/healthz")"
        return 0
    fi
    echo "not running"; return 3
}

check_dependencies() {
    lt_log "checking dependencies..."
    lt_find_python gunicorn
    lt_server_settings model_dir decode_process_num host port
    lt_gpu_check "${GPU_MEM_NEED_MB:-0}"
    if [ "$LT_DEVICE" = gpu ]; then
        local gpu_count
        gpu_count=$(nvidia-smi --list-gpus | wc -l)
        [ "$gpu_count" -ge "$DECODE_PROCESS_NUM" ] ||
            lt_warn "$gpu_count GPU(s) for $DECODE_PROCESS_NUM decode processes: decode i runs on GPU i % $gpu_count"
    fi
    lt_check_model "$MODEL_DIR"
}

create_config() {
    lt_log "writing $DEPLOY_ENV"
    mkdir -p "$(dirname "$DEPLOY_ENV")"
    cat >"$DEPLOY_ENV" <<CONF
# written by scripts/deploy.sh on $(date '+%Y-%m-%d %H:%M:%S'); read by scripts/run.sh (LIGHTTTS_ENV_FILE)
MODEL_DIR=$MODEL_DIR
DECODE_PROCESS_NUM=$DECODE_PROCESS_NUM
PORT=$PORT
HOST=$HOST
LOAD_TRT=$LOAD_TRT
CONF
    if [ -n "${WORKERS:-}" ]; then echo "WORKERS=$WORKERS" >>"$DEPLOY_ENV"; fi
}

start_service() {
    local pid t0 code now next=0
    lt_log "starting LightTTS (gunicorn) -> $LOG_FILE"
    mkdir -p "$(dirname "$LOG_FILE")" "$(dirname "$PID_FILE")"
    LIGHTTTS_ENV_FILE=$DEPLOY_ENV SKIP_CHECKS=1 PYTHON=$PY \
        setsid "$LT_ROOT/scripts/run.sh" >>"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
    t0=$(date +%s)
    while :; do
        if [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" = Z ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "---- last 40 lines of $LOG_FILE ----" >&2; tail -n 40 "$LOG_FILE" >&2
            rm -f "$PID_FILE"; lt_die "the service exited during the start"
        fi
        code=$(lt_http_code "http://127.0.0.1:$PORT/healthz" 2)
        [ "$code" = 200 ] && break
        now=$(( $(date +%s) - t0 ))
        if [ "$now" -ge "${STARTUP_TIMEOUT:-300}" ]; then
            echo "---- last 40 lines of $LOG_FILE ----" >&2; tail -n 40 "$LOG_FILE" >&2
            do_stop; lt_die "not healthy after ${STARTUP_TIMEOUT:-300} s"
        fi
        if [ "$now" -ge "$next" ]; then echo "  waiting for /healthz ${now}/${STARTUP_TIMEOUT:-300} s (HTTP $code)"; next=$((now + 5)); fi
        sleep 1
    done
    lt_log "service started (gunicorn master $pid, pid file $PID_FILE)"
}

main() {
    case "${1:-}" in
        stop) do_stop; return ;;
        status) do_status; return ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; return ;;
    esac
    if [ -n "${LIGHTTTS_ENV_FILE:-}" ]; then lt_load_env "$LIGHTTTS_ENV_FILE"; fi
    lt_load_env "$CONFIG_DIR/a10_single.env"
    # the arguments win over everything; run.sh lets the environment win over production.env, and
    # a10_single.env above already put its own values there: hand the deployed ones over explicitly
    if [ -n "${1:-}" ]; then export MODEL_DIR=$1; fi
    if [ -n "${2:-}" ]; then export DECODE_PROCESS_NUM=$2; fi
    if [ -n "${3:-}" ]; then export WORKERS=$3; fi
    lt_log "deploying LightTTS..."
    check_dependencies
    resolve_pid_file
    master_pid >/dev/null && lt_die "already running on port $PORT (gunicorn master $(master_pid)); scripts/deploy.sh stop"
    export MODEL_DIR DECODE_PROCESS_NUM HOST PORT
    create_config
    start_service
    lt_log "deployed: http://localhost:$PORT"
    lt_log "health:   http://localhost:$PORT/healthz"
    lt_log "metrics:  http://localhost:$PORT/metrics"
    lt_log "verify:   $PY scripts/verify_deployment.py --full --url http://127.0.0.1:$PORT"
}

main "$@"
