# Shared by start_lighttts_a10.sh, run.sh and deploy.sh (source it; it defines functions only).
#
# lt_load_env FILE      KEY=VALUE settings; a variable already set (environment or an earlier
#                       file) wins, so load the most specific file first.
# lt_find_python        sets PY: $PYTHON, else $VENV / the active venv, else a venv next to the
#                       repository (seed 000: /root/tts/tts-research/.venv), else python3.
# lt_gpu_check NEED_MB  sets LT_DEVICE=gpu|cpu; without a GPU: a clear warning and CPU mode.
# lt_check_model DIR    every file of the official CosyVoice2 layout present, readable, complete.
# lt_http_code URL      the HTTP status of a GET (000 when nothing answers).
# lt_server_args        sets SERVER_ARGS: the api_server flags the environment sets (after lt_find_python).
# lt_server_settings FLAG...  sets each upper-case FLAG variable to the value the server will take.
# lt_voice_dir          exports VOICE_DIR (--voice_dir): the registered voices every instance started
#                       from this checkout shares and keeps across restarts; default <repo>/voices.
#
# Server flags have one declaration, light_tts/server/args.py (ServerArgs): every flag is the
# environment variable of its name in upper case, and its default lives there only. These
# functions ask it (python -m light_tts.server.args) instead of keeping their own lists.

LT_ROOT=${LT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

if [ -t 1 ]; then LT_RED=$'\033[0;31m' LT_GREEN=$'\033[0;32m' LT_YELLOW=$'\033[1;33m' LT_NC=$'\033[0m'
else LT_RED='' LT_GREEN='' LT_YELLOW='' LT_NC=''; fi

lt_log()  { echo "${LT_GREEN}[$(date '+%Y-%m-%d %H:%M:%S')]${LT_NC} $*"; }
lt_warn() { echo "${LT_YELLOW}[$(date '+%Y-%m-%d %H:%M:%S')] WARNING:${LT_NC} $*" >&2; }
lt_die()  { echo "${LT_RED}[$(date '+%Y-%m-%d %H:%M:%S')] ERROR:${LT_NC} $*" >&2; exit 1; }

lt_load_env() {
    local file=$1 line key val n=0
    [ -f "$file" ] || lt_die "settings file $file not found"
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        line="${line#"${line%%[![:space:]]*}"}"
        line="${line%"${line##*[![:space:]]}"}"
        [[ -z $line || $line == \#* || $line == \;* ]] && continue
        [[ $line =~ ^(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] ||
            lt_die "$file:$n: expected KEY=VALUE, got: $line"
        key=${BASH_REMATCH[2]} val=${BASH_REMATCH[3]}
        if [[ $val =~ ^\"(.*)\"$ || $val =~ ^\'(.*)\'$ ]]; then val=${BASH_REMATCH[1]}; fi
        if [ -z "${!key+set}" ]; then
            printf -v "$key" '%s' "$val"
            export "${key?}"
        fi
    done <"$file"
}

lt_server_cli() {
    PYTHONPATH="$LT_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m light_tts.server.args "$@"
}

lt_server_args() {
    local out
    out=$(lt_server_cli --from-env) || lt_die "server settings in the environment rejected (the line above)"
    SERVER_ARGS=()
    [ -z "$out" ] || mapfile -t SERVER_ARGS <<<"$out"
}

lt_server_settings() {
    local out name i=0 vals=()
    out=$(lt_server_cli --from-env --get "$@") || lt_die "server settings in the environment rejected (the line above)"
    mapfile -t vals <<<"$out"
    for name in "$@"; do
        printf -v "${name^^}" '%s' "${vals[$i]-}"
        i=$((i + 1))
    done
}

lt_voice_dir() {
    # after the settings files (VOICE_DIR= there, empty, means this default)
    VOICE_DIR=${VOICE_DIR:-$LT_ROOT/voices}
    export VOICE_DIR
}

lt_is_true() {
    case "${1,,}" in 1|true|yes|y|on) return 0 ;; *) return 1 ;; esac
}

lt_find_python() {
    local cand
    if [ -n "${PYTHON:-}" ]; then
        PY=$PYTHON
    else
        PY=
        for cand in "${VENV:-}" "${VIRTUAL_ENV:-}" "$LT_ROOT/.venv" "$LT_ROOT/venv" "$LT_ROOT/../.venv" \
                    "$LT_ROOT/../tts-research/.venv"; do
            if [ -n "$cand" ] && [ -x "$cand/bin/python" ]; then PY="$cand/bin/python"; break; fi
        done
        [ -n "$PY" ] || PY=$(command -v python3 || command -v python || true)
    fi
    if [ -z "$PY" ] || ! command -v "$PY" >/dev/null; then
        lt_die "no Python found${PY:+ ($PY is not executable)}: set PYTHON=/path/to/python or VENV=/path/to/venv"
    fi
    export PYTHONPATH="$LT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    local missing
    missing=$("$PY" -c '
import importlib.util, sys
mods = ["light_tts", "fastapi", "uvicorn", "zmq", "torch"] + sys.argv[1:]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))' "$@" 2>&1) ||
        lt_die "$PY does not run: $missing"
    [ -z "$missing" ] || lt_die "$PY cannot import: $missing (PYTHONPATH=$PYTHONPATH). Install the project into that environment: pip install -e $LT_ROOT (GPU: the CUDA build of torch first)"
}

# GPU memory (MiB) free on the first visible GPU, or empty.
lt_gpu_free_mb() {
    local first=${CUDA_VISIBLE_DEVICES:-0}
    first=${first%%,*}
    nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits -i "$first" 2>/dev/null | head -n1 | tr -d ' '
}

lt_gpu_check() {
    local need_mb=${1:-0} gpus free
    LT_DEVICE=cpu
    if lt_is_true "${FORCE_CPU:-0}"; then
        lt_warn "FORCE_CPU is set: running on the CPU."
    elif ! command -v nvidia-smi >/dev/null 2>&1; then
        lt_warn "no NVIDIA GPU here (nvidia-smi not found): starting in CPU MODE. Fine for tests and the tiny model; the real CosyVoice2-0.5B on a CPU is far slower than real time."
    elif ! gpus=$(nvidia-smi -L 2>/dev/null) || [ -z "$gpus" ]; then
        lt_warn "nvidia-smi lists no GPU (driver not loaded?): starting in CPU MODE."
    elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        lt_warn "nvidia-smi sees a GPU but $PY's torch has no CUDA (a CPU build?): starting in CPU MODE. Install the CUDA build of torch to use the GPU."
    else
        LT_DEVICE=gpu
        lt_log "GPU: $(nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader | tr '\n' ';' | sed 's/;$//') (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})"
        free=$(lt_gpu_free_mb)
        if [ -n "$free" ] && [ "$need_mb" -gt 0 ] && [ "$free" -lt "$need_mb" ]; then
            lt_warn "only ${free} MiB GPU memory free; this profile needs about ${need_mb} MiB (other processes on the GPU? nvidia-smi)"
        fi
    fi
    lt_server_settings load_trt
    if [ "$LT_DEVICE" = gpu ] && lt_is_true "$LOAD_TRT" && ! "$PY" -c 'import tensorrt' 2>/dev/null; then
        lt_die "LOAD_TRT=True (seed 000's A10 profile) needs NVIDIA TensorRT's Python package: pip install tensorrt-cu12 -- or start with LOAD_TRT=False (CUDA graphs still apply)"
    fi
    if [ "$LT_DEVICE" = cpu ]; then
        if lt_is_true "${REQUIRE_GPU:-0}"; then lt_die "REQUIRE_GPU is set and there is no usable GPU"; fi
        if lt_is_true "$LOAD_TRT"; then
            lt_log "CPU mode: --load_trt False (TensorRT needs a GPU)"
        fi
        # exported: the server's flags come from the environment
        export LOAD_TRT=False
    fi
}

# Files of the official CosyVoice2-0.5B directory and the smallest size a real one can have.
LT_MODEL_FILES=(cosyvoice2.yaml llm.pt flow.pt hift.pt campplus.onnx speech_tokenizer_v2.onnx
                CosyVoice-BlankEN/config.json CosyVoice-BlankEN/tokenizer_config.json
                CosyVoice-BlankEN/vocab.json CosyVoice-BlankEN/merges.txt)
# Official sizes (bytes, rounded down): a smaller file is a test model or a broken download.
declare -A LT_OFFICIAL_SIZE=([llm.pt]=2000000000 [flow.pt]=400000000 [hift.pt]=80000000
                             [campplus.onnx]=25000000 [speech_tokenizer_v2.onnx]=400000000)

lt_human() { awk -v b="$1" 'BEGIN { split("B KB MB GB", u); i = 1; while (b >= 1000 && i < 4) { b /= 1000; i++ } printf (i == 1 ? "%d %s" : "%.1f %s"), b, u[i] }'; }

lt_check_model() {
    local dir=$1 f path size head4 tail4 problems=() small=() summary=()
    [ -d "$dir" ] || lt_die "model directory $dir does not exist (set MODEL_DIR=/path/to/CosyVoice2-0.5B)"
    for f in "${LT_MODEL_FILES[@]}"; do
        path="$dir/$f"
        if [ ! -e "$path" ]; then problems+=("$f: missing"); continue; fi
        if [ ! -f "$path" ] || [ ! -r "$path" ]; then problems+=("$f: not a readable file"); continue; fi
        size=$(stat -L -c %s "$path")
        if [ "$size" -eq 0 ]; then problems+=("$f: empty"); continue; fi
        if head -c 200 "$path" | grep -q 'git-lfs.github.com/spec'; then
            problems+=("$f: a Git LFS pointer, not the file (run 'git lfs pull' in the model directory)"); continue
        fi
        case "$f" in
            *.pt)
                head4=$(head -c 4 "$path" | od -An -tx1 | tr -d ' \n')
                tail4=$(tail -c 22 "$path" | head -c 4 | od -An -tx1 | tr -d ' \n')
                if [ "$head4" = 504b0304 ]; then
                    # torch.save's zip: the end-of-central-directory record closes a complete file
                    [ "$tail4" = 504b0506 ] || problems+=("$f: truncated ($(lt_human "$size"), the zip has no end record): download it again")
                elif [ "${head4:0:2}" != 80 ]; then
                    problems+=("$f: not a PyTorch checkpoint (starts with $head4)")
                fi ;;
            *.onnx)
                # an ONNX ModelProto starts with field 1 (ir_version, varint): byte 0x08
                [ "$(head -c 1 "$path" | od -An -tx1 | tr -d ' \n')" = 08 ] || problems+=("$f: not an ONNX model")
                [ "$size" -ge 1024 ] || problems+=("$f: only $size bytes") ;;
        esac
        if [ -n "${LT_OFFICIAL_SIZE[$f]:-}" ]; then
            summary+=("$f $(lt_human "$size")")
            [ "$size" -ge "${LT_OFFICIAL_SIZE[$f]}" ] || small+=("$f")
        fi
    done
    if [ ${#problems[@]} -gt 0 ]; then
        printf '  %s\n' "${problems[@]}" >&2
        lt_die "model directory $dir is incomplete or damaged (${#problems[@]} problem(s) above)"
    fi
    lt_log "model: $dir: all ${#LT_MODEL_FILES[@]} files of the official layout present ($(IFS=,; echo "${summary[*]}" | sed 's/,/, /g'))"
    if [ ${#small[@]} -gt 0 ]; then
        lt_log "note: ${small[*]} smaller than the official CosyVoice2-0.5B files: a test or random model?"
    fi
}

lt_http_code() {
    "$PY" -I -c '
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")' "$1" "${2:-3}"
}

# Is something listening on host:port?
lt_port_busy() {
    "$PY" -I -c '
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)' "${1/0.0.0.0/127.0.0.1}" "$2"
}
