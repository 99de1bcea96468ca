#!/usr/bin/env bash
# LightTTS on an NVIDIA A10 (24 GB): start, stop and check the server (seed 000's runbook).
#
#   scripts/start_lighttts_a10.sh single       one instance on :8080, returns once /healthz is healthy
#   scripts/start_lighttts_a10.sh multi        two instances on :8080 and :8081 (staggered, lower
#                                              limits each) behind nginx on :8000
#   scripts/start_lighttts_a10.sh stop         stop this deployment: its instances and its nginx
#   scripts/start_lighttts_a10.sh status       this deployment's instances, health, uptime, logs
#                                              (exit 0 all healthy, 1 some not, 3 none running)
#     "This deployment" is the one holding PORT (as the server takes it: 8080 by default, or
#     PORT_BASE + GPU_INDEX), or the ports in PORTS if set: the ports a start recorded together
#     (multi: all of PORTS and its nginx). Deployments of other ports sharing PID_DIR are left alone:
#     PORT=9090 scripts/start_lighttts_a10.sh stop stops the one on :9090 only.
#   scripts/start_lighttts_a10.sh restart [single|multi]   stop, then start the last mode again
#   scripts/start_lighttts_a10.sh run          one instance in the foreground (systemd, containers)
#   scripts/start_lighttts_a10.sh nginx-conf   print the nginx config for PORTS (for the system nginx;
#                                              listening on NGINX_HOST:NGINX_PORT)
#   scripts/start_lighttts_a10.sh check        the pre-start checks only (Python, GPU, model files)
#
# Anything after the command goes to api_server unchanged: `... single --log_level debug`.
# Settings: configs/a10_single.env (multi: configs/a10_multi.env on top of it); an environment
# variable of the same name wins over both. Every api_server flag is the variable of its name in
# upper case (MODEL_DIR, HOST, PORT, MAX_TOTAL_TOKEN_NUM, REQUEST_TIMEOUT, LOG_LEVEL, ...; list:
# python -m light_tts.server.args --list), EXTRA_ARGS takes flags as written; unset ones keep the
# server's defaults. Script settings: PORTS (multi), LOG_DIR (/tmp), PID_DIR (/tmp), CONFIG_DIR
# (configs/), PYTHON or VENV (the interpreter), ENVRC (a file to source first, e.g.
# /root/tts/.envrc), STAGGER_SECONDS, STARTUP_TIMEOUT, STOP_TIMEOUT (30), NGINX_PREFIX, FORCE_CPU,
# REQUIRE_GPU, GPU_INDEX + PORT_BASE (single, run: port = PORT_BASE + GPU_INDEX).
#
# Files: log $LOG_DIR/lighttts_<mode>_<port>.log (the previous one is kept as .log.1),
# pid $PID_DIR/lighttts_worker_<port>.pid, the deployment (mode, ports, nginx) in
# $PID_DIR/lighttts_deployment_<first port>, private nginx under $PID_DIR/lighttts_nginx_<NGINX_PORT>/,
# registered voices in VOICE_DIR (--voice_dir; default <repo>/voices), one directory for every instance, kept
# across restarts.
set -uo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lighttts_common.sh"

CONFIG_DIR=${CONFIG_DIR:-$LT_ROOT/configs}
LOG_DIR=${LOG_DIR:-/tmp}
PID_DIR=${PID_DIR:-/tmp}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
LOG_TAIL_LINES=${LOG_TAIL_LINES:-40}
STARTED=()   # ports started by this invocation (stopped again if the start fails)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

load_profile() {
    local mode=$1
    if [ -n "${ENVRC:-}" ]; then
        # shellcheck disable=SC1090
        . "$ENVRC" || lt_die "sourcing ENVRC=$ENVRC failed"
    fi
    [ "$mode" = multi ] && lt_load_env "$CONFIG_DIR/a10_multi.env"
    lt_load_env "$CONFIG_DIR/a10_single.env"
    if [ -n "${GPU_INDEX:-}" ]; then export PORT=$(( ${PORT_BASE:-9000} + GPU_INDEX )); fi
    if [ "$mode" = multi ]; then PORTS=${PORTS:-"8080 8081"}; fi
    lt_voice_dir   # every instance (multi: all of them) gets the same --voice_dir
    NGINX_MODE=${NGINX_MODE:-private} NGINX_HOST=${NGINX_HOST:-127.0.0.1} NGINX_PORT=${NGINX_PORT:-8000}
    NGINX_BALANCE=${NGINX_BALANCE:-round_robin}
    NGINX_PREFIX=${NGINX_PREFIX:-$PID_DIR/lighttts_nginx_$NGINX_PORT}
    STAGGER_SECONDS=${STAGGER_SECONDS:-60} STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
    export CUDA_VISIBLE_DEVICES
    mkdir -p "$LOG_DIR" "$PID_DIR" || lt_die "cannot create LOG_DIR=$LOG_DIR or PID_DIR=$PID_DIR"
}

# SERVER_ARGS for the instance on port $1: the flags the environment (and the env files) set,
# EXTRA_ARGS, then the command line's extra arguments
server_args() {
    PORT=$1 lt_server_args
    SERVER_ARGS+=("${CLI_EXTRA[@]}")
}

pid_file() { echo "$PID_DIR/lighttts_worker_$1.pid"; }
log_file() { echo "$LOG_DIR/lighttts_$1_$2.log"; }
deployment_file() { echo "$PID_DIR/lighttts_deployment_$1"; }

# Record a start: mode, ports and private nginx, in a file named by the first port. stop, status
# and restart read it back to act on this deployment only.
write_deployment() {
    local mode=$1 first=${2%% *} nginx=""
    [ "$mode" = multi ] && [ "$NGINX_MODE" != none ] && nginx=$NGINX_PREFIX
    DEPLOYMENT_FILE=$(deployment_file "$first")
    printf 'mode=%s\nports=%s\nnginx_prefix=%s\n' "$mode" "$2" "$nginx" >"$DEPLOYMENT_FILE"
}

# This deployment: the recorded one holding the first port of PORTS (if set) or PORT (as the
# server takes it). Sets DEPLOY_MODE, DEPLOY_PORTS, NGINX_PREFIX ("" = none) and DEPLOYMENT_FILE
# ("" when no start recorded one: then just that port / PORTS).
find_deployment() {
    local want f line mode ports nginx
    PY=${PYTHON:-$(command -v python3 || command -v python)}
    if [ -n "${PORTS:-}" ]; then
        want=$PORTS
    else   # in a subshell: the settings files must not leak into a start that follows (restart)
        want=$(load_profile single >/dev/null; lt_server_settings port; echo "$PORT")
        [[ $want =~ ^[0-9]+$ ]] || lt_die "cannot tell this deployment's port (the line above); set PORT or PORTS"
    fi
    DEPLOY_MODE="" DEPLOY_PORTS=$want NGINX_PREFIX="" DEPLOYMENT_FILE=""
    for f in "$PID_DIR"/lighttts_deployment_*; do
        [ -f "$f" ] || continue
        mode="" ports="" nginx=""
        while IFS= read -r line; do
            case "$line" in mode=*) mode=${line#mode=} ;; ports=*) ports=${line#ports=} ;;
                             nginx_prefix=*) nginx=${line#nginx_prefix=} ;; esac
        done <"$f"
        if [[ " $ports " == *" ${want%% *} "* ]]; then
            DEPLOY_MODE=$mode DEPLOY_PORTS=$ports NGINX_PREFIX=$nginx DEPLOYMENT_FILE=$f
            return 0
        fi
    done
}

# exposed_without_key HOST: true when HOST serves other machines and the instances get no key
# (LIGHTTTS_API_KEY) and ALLOW_OPEN is not set: the instances refuse such a --host themselves; this
# is the same rule for the nginx in front of them
exposed_without_key() {
    case "$1" in 127.*|localhost|::1|'[::1]') return 1 ;; esac
    [ -z "$(printenv LIGHTTTS_API_KEY)" ] && ! lt_is_true "$(printenv ALLOW_OPEN)"
}

check_exposure() {   # check_exposure VARIABLE VALUE
    if exposed_without_key "$2"; then
        lt_die "$1=$2 would serve other machines with no API key: set LIGHTTTS_API_KEY=<key> (every instance then requires it; clients send 'Authorization: Bearer <key>'), or $1=127.0.0.1, or ALLOW_OPEN=true to serve without a key"
    fi
}
check_nginx_exposure() { check_exposure NGINX_HOST "$NGINX_HOST"; }

# Is any non-zombie process left in process group $1? (each instance is its own group: setsid)
instance_alive() {
    local want=$1 d stat f
    for d in /proc/[0-9]*; do
        read -r stat 2>/dev/null <"$d/stat" || continue
        read -r -a f <<<"${stat##*) }"   # state ppid pgrp session ...
        [ "${f[2]:-}" = "$want" ] && [ "${f[0]:-}" != Z ] && return 0
    done
    return 1
}

# A live, non-zombie process (a launcher this shell started and that died stays a zombie child).
pid_running() {
    local stat f
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    read -r -a f <<<"${stat##*) }"
    [ "${f[0]}" != Z ]
}

# The pid in the file, if it is a live LightTTS launcher (not a recycled pid).
live_pid() {
    local f=$1 pid
    [ -f "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null)
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    pid_running "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'api_server' || return 1
    echo "$pid"
}

# fail_start WHAT WHY LOG: say why, show the log's last lines, stop what this run started, exit 1.
fail_start() {
    local what=$1 why=$2 log=${3:-}
    echo "${LT_RED}[$(date '+%Y-%m-%d %H:%M:%S')] ERROR: $what failed to start: $why${LT_NC}" >&2
    if [ -n "$log" ]; then
        echo "---- last $LOG_TAIL_LINES lines of $log ----" >&2
        tail -n "$LOG_TAIL_LINES" "$log" >&2
        echo "---- end of $log ----" >&2
    fi
    if [ ${#STARTED[@]} -gt 0 ]; then
        lt_log "stopping what this start launched (instances ${STARTED[*]/#/:})"
        stop_ports "${STARTED[@]}"
    fi
    stop_nginx
    rm -f "${DEPLOYMENT_FILE:-}"
    exit 1
}

start_instance() {
    local mode=$1 port=$2 log pidf pid
    log=$(log_file "$mode" "$port") pidf=$(pid_file "$port")
    [ -f "$log" ] && mv -f "$log" "$log.1"
    server_args "$port"
    {
        echo "# $(date '+%Y-%m-%d %H:%M:%S') start_lighttts_a10.sh $mode (device: $LT_DEVICE)"
        echo "# $PY -m light_tts.server.api_server ${SERVER_ARGS[*]}"
    } >"$log"
    # setsid: the instance is its own session and process group, so it outlives this shell and
    # `stop` can reach every process of it; the launcher keeps its command line (pkill -f works).
    setsid "$PY" -m light_tts.server.api_server "${SERVER_ARGS[@]}" >>"$log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pidf"
    STARTED+=("$port")
    lt_log "instance :$port starting (pid $pid, log $log)"
}

# wait_healthy PORT SECONDS [soft]: 0 when healthy; soft: 1 on timeout instead of failing.
wait_healthy() {
    local port=$1 limit=$2 soft=${3:-} t0 now next=0 code pid url line log
    url="http://127.0.0.1:$port/healthz"
    log=$(log_file "$CUR_MODE" "$port")
    pid=$(cat "$(pid_file "$port")")
    t0=$(date +%s)
    while :; do
        pid_running "$pid" || fail_start "instance :$port" "the server exited during the start" "$log"
        code=$(lt_http_code "$url" 2)
        [ "$code" = 200 ] && return 0
        now=$(( $(date +%s) - t0 ))
        if [ "$now" -ge "$limit" ]; then
            [ -n "$soft" ] && return 1
            fail_start "instance :$port" "not healthy after ${limit} s (STARTUP_TIMEOUT)" "$log"
        fi
        if [ "$now" -ge "$next" ]; then
            line=$(grep -v '^#' "$log" 2>/dev/null | tail -n1 | cut -c1-110)
            echo "  :$port waiting for /healthz ${now}/${limit} s (HTTP $code)${line:+ | $line}"
            next=$((now + 5))
        fi
        sleep 1
    done
}

# Stop instances by port: SIGTERM to the launcher (it stops HTTP, then every stage), SIGKILL to the
# whole process group if anything is left after STOP_TIMEOUT.
stop_ports() {
    local port pid pids=() ports=() t0 i
    for port in "$@"; do
        if pid=$(live_pid "$(pid_file "$port")"); then
            kill -TERM "$pid" 2>/dev/null
            pids+=("$pid") ports+=("$port")
        else
            [ -f "$(pid_file "$port")" ] && lt_log "instance :$port was not running (stale pid file removed)"
            rm -f "$(pid_file "$port")"
        fi
    done
    t0=$(date +%s)
    for i in "${!pids[@]}"; do
        while instance_alive "${pids[$i]}" && [ $(( $(date +%s) - t0 )) -lt "$STOP_TIMEOUT" ]; do sleep 0.2; done
        if instance_alive "${pids[$i]}"; then
            lt_warn "instance :${ports[$i]} still running after ${STOP_TIMEOUT} s: SIGKILL to its process group"
            kill -KILL -- "-${pids[$i]}" 2>/dev/null
            sleep 0.5
        fi
        rm -f "$(pid_file "${ports[$i]}")"
        lt_log "instance :${ports[$i]} stopped (pid ${pids[$i]})"
    done
    STOPPED=${#pids[@]}
}

# ---------------------------------------------------------------- nginx
render_nginx_conf() {
    local template="$CONFIG_DIR/nginx/lighttts_$NGINX_BALANCE.conf"
    [ -f "$template" ] || lt_die "no nginx template $template (NGINX_BALANCE=round_robin or least_conn)"
    awk -v ports="$PORTS" -v listen="$NGINX_HOST:$NGINX_PORT" '
        # the header names the shipped ports: name these instead
        NR == 1 && /^# LightTTS behind nginx: instances on / {
            n = split(ports, p, " "); list = "127.0.0.1:" p[1]
            for (i = 2; i <= n; i++) list = list (i == n ? " and :" : ", :") p[i]
            print "# LightTTS behind nginx on " listen ": instances on " list " (start_lighttts_a10.sh),"
            next
        }
        /^[[:space:]]*server 127\.0\.0\.1:[0-9]+/ {
            if (!done) {
                match($0, /:[0-9]+/); head = substr($0, 1, RSTART); tail = substr($0, RSTART + RLENGTH)
                n = split(ports, p, " ")
                for (i = 1; i <= n; i++) print head p[i] tail
                done = 1
            }
            next
        }
        /^[[:space:]]*listen [0-9]+;/ { print "    listen " listen ";"; next }
        { print }' "$template"
}

nginx_main_conf() {
    local prefix=$1
    cat <<EOF
# written by start_lighttts_a10.sh: a private nginx in front of the LightTTS instances
worker_processes ${NGINX_WORKERS:-auto};
pid $prefix/nginx.pid;
error_log $prefix/logs/error.log warn;
events { worker_connections 1024; }
http {
    log_format lighttts '\$remote_addr [\$time_local] "\$request" \$status \$body_bytes_sent '
                        'upstream=\$upstream_addr upstream_status=\$upstream_status time=\$request_time';
    access_log $prefix/logs/access.log lighttts;
    client_body_temp_path $prefix/temp/client_body;
    proxy_temp_path $prefix/temp/proxy;
    fastcgi_temp_path $prefix/temp/fastcgi;
    uwsgi_temp_path $prefix/temp/uwsgi;
    scgi_temp_path $prefix/temp/scgi;
    include $prefix/conf/lighttts.conf;
}
EOF
}

nginx_pid() { local f="$NGINX_PREFIX/nginx.pid" pid; [ -n "$NGINX_PREFIX" ] && [ -f "$f" ] || return 1; pid=$(cat "$f"); kill -0 "$pid" 2>/dev/null && echo "$pid"; }

start_nginx() {
    local prefix=$NGINX_PREFIX out i
    if [ "$NGINX_MODE" = none ]; then
        lt_log "NGINX_MODE=none: no balancer started (scripts/start_lighttts_a10.sh nginx-conf prints a config for yours)"
        return 0
    fi
    if ! command -v nginx >/dev/null 2>&1; then
        lt_warn "nginx not found (apt-get install -y nginx): the instances run without a balancer in front"
        return 0
    fi
    nginx_pid >/dev/null && lt_die "a private nginx is already running (pid $(nginx_pid), prefix $prefix)"
    lt_port_busy "$NGINX_HOST" "$NGINX_PORT" &&
        lt_die "port $NGINX_PORT for nginx is in use (the system nginx? set NGINX_PORT=... or NGINX_MODE=none)"
    mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/temp" || lt_die "cannot create $prefix"
    render_nginx_conf >"$prefix/conf/lighttts.conf"
    nginx_main_conf "$prefix" >"$prefix/conf/nginx.conf"
    echo "$NGINX_PORT" >"$prefix/port"
    # nginx reads $NGINX as sockets inherited from a binary upgrade: never pass one on
    unset NGINX
    out=$(nginx -t -q -p "$prefix" -c "$prefix/conf/nginx.conf" -e "$prefix/logs/error.log" 2>&1) ||
        fail_start nginx "nginx -t rejected $prefix/conf/nginx.conf: $out" "$prefix/logs/error.log"
    # no command substitution here: the nginx master keeps its stdout open, a pipe would never end
    nginx -p "$prefix" -c "$prefix/conf/nginx.conf" -e "$prefix/logs/error.log" \
        </dev/null >>"$prefix/logs/error.log" 2>&1 ||
        fail_start nginx "nginx did not start" "$prefix/logs/error.log"
    for i in $(seq 1 50); do
        [ "$(lt_http_code "http://127.0.0.1:$NGINX_PORT/healthz" 2)" = 200 ] && break
        [ "$i" = 50 ] && fail_start nginx "http://127.0.0.1:$NGINX_PORT/healthz did not answer 200 within 10 s" "$prefix/logs/error.log"
        sleep 0.2
    done
    lt_log "nginx ($NGINX_BALANCE) on $NGINX_HOST:$NGINX_PORT -> $(echo "$PORTS" | sed 's/[0-9][0-9]*/:&/g') (pid $(nginx_pid), config $prefix/conf/lighttts.conf, access log $prefix/logs/access.log)"
}

stop_nginx() {
    local pid i
    pid=$(nginx_pid) || return 0
    kill -QUIT "$pid" 2>/dev/null
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$NGINX_PREFIX/nginx.pid"
    lt_log "nginx stopped (pid $pid)"
}

# ---------------------------------------------------------------- commands
preflight() {
    lt_find_python
    lt_server_settings model_dir host port
    [ "$CUR_MODE" = multi ] || PORTS=$PORT
    check_exposure HOST "$HOST"   # the server refuses it too, but only after the model checks
    [ "$CUR_MODE" = multi ] && [ "$NGINX_MODE" != none ] && check_nginx_exposure
    lt_gpu_check "${GPU_MEM_NEED_MB:-0}"
    lt_check_model "$MODEL_DIR"
}

cmd_start() {
    local mode=$1 port pid prev="" ports settings="$CONFIG_DIR/a10_single.env"
    CUR_MODE=$mode
    load_profile "$mode"
    [ "$mode" = multi ] && settings="$CONFIG_DIR/a10_multi.env + $settings"
    lt_log "LightTTS $mode start (settings: environment, then $settings)"
    preflight
    read -r -a ports <<<"$PORTS"
    [ ${#ports[@]} -gt 0 ] || lt_die "PORTS is empty"
    for port in "${ports[@]}"; do
        [[ $port =~ ^[0-9]+$ ]] || lt_die "bad port '$port' (PORT/PORTS)"
        if pid=$(live_pid "$(pid_file "$port")"); then
            lt_die "an instance already runs on :$port (pid $pid): '$0 stop' or '$0 restart'"
        fi
        lt_port_busy "$HOST" "$port" && lt_die "port $port is in use by another process (ss -ltnp 'sport = :$port')"
    done
    write_deployment "$mode" "${ports[*]}"
    for port in "${ports[@]}"; do
        if [ -n "$prev" ]; then
            # seed 000: stagger the starts so two model loads do not compete; a healthy previous
            # instance has finished loading, so the wait ends there
            lt_log "stagger: waiting up to ${STAGGER_SECONDS} s for :$prev before starting :$port"
            wait_healthy "$prev" "$STAGGER_SECONDS" soft || true
        fi
        start_instance "$mode" "$port"
        prev=$port
    done
    for port in "${ports[@]}"; do
        wait_healthy "$port" "$STARTUP_TIMEOUT"
        lt_log "instance :$port healthy: http://127.0.0.1:$port/healthz"
    done
    [ "$mode" = multi ] && start_nginx
    lt_log "LightTTS $mode ready. Verify: $PY scripts/verify_deployment.py --full$(for p in "${ports[@]}"; do printf ' --url http://127.0.0.1:%s' "$p"; done)"
    local here=""   # how to name this deployment again (the one recorded with its first port)
    [ "${ports[0]}" = 8080 ] || here="PORT=${ports[0]} "
    lt_log "logs: $(for p in "${ports[@]}"; do printf '%s ' "$(log_file "$mode" "$p")"; done)| status: ${here}$0 status | stop: ${here}$0 stop"
}

cmd_stop() {
    local ports
    find_deployment
    read -r -a ports <<<"$DEPLOY_PORTS"
    STOPPED=0
    [ ${#ports[@]} -gt 0 ] && stop_ports "${ports[@]}"
    stop_nginx
    rm -f "$DEPLOYMENT_FILE"
    if [ "$STOPPED" = 0 ]; then
        lt_log "no instance of this deployment was running (:${DEPLOY_PORTS// / :}; others: ls $PID_DIR/lighttts_deployment_*)"
    fi
    return 0
}

cmd_status() {
    local port pid health uptime log any=0 bad=0 body nport
    find_deployment
    printf '%-7s %-8s %-9s %-30s %-12s %s\n' PORT PID STATE HEALTH UPTIME LOG
    for port in $DEPLOY_PORTS; do
        [ -f "$(pid_file "$port")" ] || continue
        any=1
        log=$(ls -t "$LOG_DIR"/lighttts_*_"$port".log 2>/dev/null | head -n1)
        if pid=$(live_pid "$(pid_file "$port")"); then
            body=$(curl_body "http://127.0.0.1:$port/healthz")
            health="$(lt_http_code "http://127.0.0.1:$port/healthz" 3) $body"
            uptime=$(ps -o etime= -p "$pid" 2>/dev/null | tr -d ' ')
            [[ $health == 200* ]] || bad=1
            printf '%-7s %-8s %-9s %-30s %-12s %s\n' "$port" "$pid" running "${health:0:30}" "$uptime" "$log"
        else
            bad=1
            printf '%-7s %-8s %-9s %-30s %-12s %s\n' "$port" "$(cat "$(pid_file "$port")" 2>/dev/null)" dead - - "$log"
        fi
    done
    if pid=$(nginx_pid); then
        nport=$(cat "$NGINX_PREFIX/port" 2>/dev/null)
        health=$(lt_http_code "http://127.0.0.1:$nport/healthz" 3)
        [ "$health" = 200 ] || bad=1
        printf '%-7s %-8s %-9s %-30s %-12s %s\n' "$nport" "$pid" nginx "$health" \
            "$(ps -o etime= -p "$pid" 2>/dev/null | tr -d ' ')" "$NGINX_PREFIX/logs/"
    fi
    [ -n "$DEPLOY_MODE" ] && echo "mode: $DEPLOY_MODE (${DEPLOYMENT_FILE})"
    if [ "$any" = 0 ]; then echo "not running"; return 3; fi
    return "$bad"
}

curl_body() {
    "$PY" -I -c '
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3); print(r.read(200).decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.read(200).decode(errors="replace"))
except Exception as e:
    print(type(e).__name__)' "$1" | tr -d '\n'
}

cmd_run() {
    CUR_MODE=single
    load_profile single
    preflight
    server_args "$PORT"
    lt_log "exec $PY -m light_tts.server.api_server ${SERVER_ARGS[*]}"
    exec "$PY" -m light_tts.server.api_server "${SERVER_ARGS[@]}"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
[ "${1:-}" = -- ] && shift
CLI_EXTRA=("$@")
case "$cmd" in
    single|multi) cmd_start "$cmd" ;;
    stop) cmd_stop ;;
    status) cmd_status; exit $? ;;
    restart)
        find_deployment
        mode=${CLI_EXTRA[0]:-${DEPLOY_MODE:-single}}
        case "$mode" in single|multi) ;; *) lt_die "restart: unknown mode '$mode' (single or multi)" ;; esac
        [ "${CLI_EXTRA[0]:-}" = "$mode" ] && CLI_EXTRA=("${CLI_EXTRA[@]:1}")
        cmd_stop
        cmd_start "$mode" ;;
    run) cmd_run ;;
    nginx-conf) load_profile multi; check_nginx_exposure; render_nginx_conf ;;
    check) CUR_MODE=single; load_profile single; preflight; lt_log "checks passed" ;;
    -h|--help|help) usage ;;
    *) usage >&2; echo >&2; lt_die "unknown command '${cmd}': single, multi, stop, status, restart, run, nginx-conf, check" ;;
esac
