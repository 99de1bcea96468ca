"""The server's one configuration declaration: `ServerArgs`, one field per flag.

Everything else is derived from it:
- `build_parser()`: the command line of `python -m light_tts.server.api_server` (`--help`);
- `validate()`: one line per mistake, from the fields' checks and the cross-flag `CHECKS` (the first
  turns a ModelScope id in --model_dir into its local directory, light_tts.models.hub);
- `env_argv()` / `args_from_env()`: every flag is also the environment variable of its name in upper
  case (REQUEST_TIMEOUT=30, LOAD_TRT=true, MODE="triton_int8kv triton_flashdecoding"); unset or
  empty variables keep the default. wsgi_wrapper.py (gunicorn) calls `args_from_env()`; the
  scripts in scripts/ run `python -m light_tts.server.args --from-env`, which prints that argv.

Defaults live here and nowhere else: the env files in configs/ set only what differs for their
profile. Flags LightTTS has that change nothing in this design say "no effect here: <why>" in their
help. Boolean flags take LightTTS's spellings: `--load_trt`, `--load_trt True`, `--load_trt false`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from light_tts.models.hub import ModelLoadError, resolve_model_dir

NO_EFFECT = "no effect here: "
# Stages keep a reply socket per HTTP worker (ipc.ReplySockets): at most this many stay open
MAX_HTTP_WORKERS = 64
MODES = ("triton_flashdecoding", "triton_int8kv", "ppl_int8kv", "triton_gqa_flashdecoding", "triton_gqa_attention")
INT8_KV_MODES = ("triton_int8kv", "ppl_int8kv")
DATA_TYPES = ("float16", "bfloat16", "float32", "fp16", "bf16", "fp32")
# LightTTS's names that, when set, override the flag the code reads
ALIASES = {"gpt_paral_num": "running_max_req_size", "decode_paral_num": "decode_max_batch_size",
           "first_hop_tokens": "decode_first_hop"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Extra api_server flags, appended to what the environment sets (scripts and gunicorn alike)
EXTRA_ARGS_ENV = "EXTRA_ARGS"


class ConfigError(ValueError):
    pass


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def gigabytes(value) -> float:
    """A size in GB (--gpu_memory_limit_gb, --decode_prompt_cache_gb): a number >= 0; empty (an unset
    env-file key) is 0, meaning no cap / off."""
    text = str(value).strip()
    try:
        gb = float(text) if text else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {value!r}") from None
    if not gb >= 0:   # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of GB >= 0, got {value!r}")
    return gb


def lower(value: str) -> str:
    return str(value).strip().lower()


# Per-field checks: None when fine, else the rest of the line after "--<flag> ".
def at_least(lo) -> Callable:
    return lambda v: None if v >= lo else f"must be >= {lo} (got {v})"


def in_unit_interval(v) -> Optional[str]:
    return None if 0 <= v < 1 else f"must be in [0, 1) (got {v})"


def positive(v) -> Optional[str]:
    return None if v > 0 else f"must be > 0 (got {v})"


def _workers(v) -> Optional[str]:
    if v < 1:
        return f"must be >= 1 (got {v})"
    if v > MAX_HTTP_WORKERS:
        return f"must be <= {MAX_HTTP_WORKERS} (got {v}); for more, run several instances behind nginx"
    return None


def _first_hop(v) -> Optional[str]:
    if v < 0 or 0 < v < 5:
        return (f"must be 0 (official) or >= 5 (got {v}): HiFT holds back the last 8 mel frames (4 tokens) of "
                "every chunk")
    return None


def _modes(v) -> Optional[str]:
    bad = [m for m in v if m not in MODES]
    return f"{' '.join(bad)}: unknown; choose from {', '.join(MODES)}" if bad else None


ORIGIN = re.compile(r"^https?://[^/\s,]+$")


def cors_origin_list(value: str) -> list[str]:
    """--cors_origins as a list (empty: CORS off)."""
    return [o.strip() for o in value.split(",") if o.strip()]


def _origins(v) -> Optional[str]:
    """Each origin must be what a browser sends in Origin: no path, no trailing slash (which would never match)."""
    bad = [o for o in cors_origin_list(v) if o != "*" and not ORIGIN.match(o)]
    return (f"{', '.join(bad)}: not an origin; give scheme://host[:port] with no path or trailing slash "
            "(https://app.example.com), or '*'") if bad else None


def _default_model_dir() -> str:
    return os.path.join(REPO_ROOT, "pretrained_models", "CosyVoice2-0.5B")


def opt(default=dataclasses.MISSING, help: str = "", *, group: str, check: Optional[Callable] = None,
        parse: Optional[Callable] = None, choices: Optional[Sequence] = None, metavar: Optional[str] = None,
        env: Sequence[str] = (), env_default: Optional[Callable[[], str]] = None, secret: bool = False,
        factory=dataclasses.MISSING):
    """A ServerArgs field. env: the variable names (default: the flag's name in upper case);
    env_default: the value when none of them is set (only where the command line has no default);
    secret: never put on a command line (read from the environment by parse_args)."""
    meta = dict(help=help, group=group, check=check, parse=parse, choices=choices, metavar=metavar,
                env=tuple(env), env_default=env_default, secret=secret)
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServerArgs:
    # ---- server
    model_dir: str = opt(help="CosyVoice2 model directory (official layout), or its ModelScope id iic/CosyVoice2-0.5B "
                              "(downloaded at start into the ModelScope cache; needs pip install "
                              "'light-tts[modelscope]'). From the environment: MODEL_DIR, else "
                              "FINETURED_COSYVOICE2_MODEL_PATH (seed 000's .envrc), else <repo>/pretrained_models/"
                              "CosyVoice2-0.5B", group="server", env=("MODEL_DIR", "FINETURED_COSYVOICE2_MODEL_PATH"),
                         env_default=_default_model_dir)
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface); under gunicorn its -b binds "
                                 "instead", group="server")
    port: int = opt(8080, "port to listen on; also names the instance (its IPC directory), so under gunicorn set it "
                          "to -b's port", group="server", check=lambda v: None if 0 < v < 65536 else
                    f"must be in 1..65535 (got {v})")
    httpserver_workers: int = opt(1, "HTTP worker processes sharing one backend (each has its own reply socket; at "
                                     f"most {MAX_HTTP_WORKERS}); under gunicorn its -w decides instead",
                                  group="server", check=_workers)
    zmq_mode: str = opt("ipc:///tmp/", "ZeroMQ transport prefix; only ipc:// is supported: sockets live in a private "
                                       "per-instance directory under this path (mode 0700, named by the port)",
                        group="server", check=lambda v: None if v.startswith("ipc://") else
                        f"{v}: only ipc:// is supported")
    api_key: Optional[str] = opt(None, "require 'Authorization: Bearer KEY' on every endpoint except health; several "
                                       "clients' keys separated by commas (KEY1,KEY2: each is accepted and has its own "
                                       "--voice_quota); from the environment: LIGHTTTS_API_KEY (kept off command lines)",
                                 group="server", env=("LIGHTTTS_API_KEY",), secret=True)
    allow_open: bool = opt(False, "serve a --host other than loopback (0.0.0.0, a LAN address) without --api_key; "
                                  "without this flag such a start is refused, so an instance is never open to the "
                                  "network by accident (behind nginx on this machine, keep --host 127.0.0.1; to "
                                  "expose it, set LIGHTTTS_API_KEY). Under gunicorn the same holds for -b",
                           group="server")
    cors_origins: str = opt("", "web page origins allowed to call this server from a browser (CORS), comma "
                                "separated, each scheme://host[:port] as the browser sends it "
                                "('https://a.example,http://localhost:3000'), or '*' for any; empty (the default) "
                                "turns CORS off: a preflight (OPTIONS) gets 405. An allowed origin's preflight is "
                                "answered for GET, POST and DELETE with the Authorization and Content-Type headers; "
                                "any other origin gets no CORS headers", group="server", check=_origins,
                            metavar="ORIGINS")
    default_format: str = opt("wav", "what a POST to /inference_* without stream or format answers: wav (a WAV "
                                      "file) or pcm (raw 24 kHz int16, what LightTTS's non-streaming client reads); a "
                                      "request's format= wins. GET (the official runtime's client) always defaults to "
                                      "pcm, streaming (stream=true) too; /v1/audio/speech to wav", group="server",
                              parse=lower, choices=("wav", "pcm"))
    max_upload_bytes: int = opt(20 * 2**20, "largest accepted prompt upload", group="server")
    request_timeout: float = opt(300.0, "seconds before a request is aborted everywhere and answered 504",
                                 group="server", check=positive)
    max_queue_size: int = opt(256, "requests in flight per HTTP worker before new ones get 503 with Retry-After",
                              group="server", check=at_least(1))
    health_monitor: bool = opt(False, "restart a crashed stage process (otherwise /healthz reports it and the server "
                                      "keeps answering 503 until restarted)", group="server")
    log_stats_interval: float = opt(10.0, "seconds between the LLM's stats log lines", group="server")
    disable_log_stats: bool = opt(False, "do not log periodic stats", group="server")
    log_level: str = opt("info", "log level of every process (any case)", group="server", parse=lower,
                         choices=("debug", "info", "warning", "error"))
    gpu_memory_limit_gb: float = opt(
        0.0, "most GPU memory, in GB (10^9 bytes; nvidia-smi shows MiB: 22 GB is 20981 MiB), that all processes of "
             "this instance together may use on each GPU they run on, counted as nvidia-smi does (CUDA contexts "
             "included); 0 = no cap. Each process caps its allocator at its share: a CUDA-context allowance per "
             "process off the top, the LLM what its weights, KV pool (--max_total_token_num) and prefill "
             "(--batch_max_tokens) need, the decode processes on that GPU the rest in equal parts "
             "(light_tts/server/gpu_memory.py). A limit too small for the flags stops the start naming the flag to "
             "change. No effect on a CPU", group="server", parse=gigabytes, metavar="GB")

    # ---- encode
    encode_process_num: int = opt(1, "encode processes (text, prompt audio features)", group="encode",
                                  check=at_least(1))
    encode_paral_num: int = opt(100, NO_EFFECT + "LightTTS's per-encoder concurrency; each encode process here takes "
                                                 "requests one at a time and cache hits cost microseconds",
                                group="encode")
    cache_capacity: int = opt(100, "encoded prompts kept per encode process (LRU)", group="encode", check=at_least(0))
    voice_dir: Optional[str] = opt(None, "directory of the registered voices (POST /voices), shared by every instance "
                                         "of a deployment: each reads and writes it safely and looks a voice up there "
                                         "on use, so a voice registered through one instance works through all and "
                                         "survives restarts (the start scripts set <repo>/voices; k8s needs a "
                                         "ReadWriteMany volume). Created 0700 if missing; a world-writable one is "
                                         "refused. Unset: a private directory per instance, removed at exit",
                                   group="encode", metavar="DIR")
    max_voices: int = opt(100, "registered voices the voice store holds (with --voice_dir: the whole deployment's); "
                               "a registration of a new id beyond it gets 507", group="encode", check=at_least(1))
    voice_quota: Optional[int] = opt(None, "registered voices each API key may hold (--api_key with several keys); one "
                                           "over it gets 429 while other keys still register. Default: a fair share, "
                                           "--max_voices divided by the number of keys, rounded up (with one key or "
                                           "none: no quota beyond --max_voices); 0: no quota", group="encode",
                                     check=at_least(0))
    tokenizer_mode: str = opt("slow", NO_EFFECT + "one tokenizer implementation (tokenizers BPE)", group="encode")
    trust_remote_code: bool = opt(False, NO_EFFECT + "no remote code is ever loaded", group="encode")
    min_prompt_seconds: float = opt(0.5, "shortest accepted prompt audio", group="encode", check=positive)
    max_prompt_seconds: float = opt(30.0, "longest accepted prompt audio", group="encode")

    # ---- LLM
    max_total_token_num: int = opt(32768, "KV pool size in token slots (every layer's K/V for one token per slot), "
                                          "allocated once and shared by all running requests and the prompt prefix "
                                          "cache", group="LLM", check=at_least(1))
    max_req_total_len: int = opt(16384, "largest prompt + generated length of one text piece (2 special + prompt text "
                                        "+ piece text + prompt speech + max speech tokens); longer requests get 400",
                                 group="LLM", check=at_least(1))
    bistream_max_len: int = opt(3000, "most tokens (prompt + text + speech) one streaming-text (WebSocket) request may "
                                      "hold; its KV reservation at admission, since its length is unknown up front "
                                      "(capped by --max_req_total_len)", group="LLM")
    batch_max_tokens: int = opt(16384, "most prompt tokens prefilled in one prefill step (new requests are admitted "
                                       "while their prompts fit; must be >= --max_req_total_len)", group="LLM",
                                check=at_least(1))
    running_max_req_size: int = opt(1000, "most requests admitted at once (decoding, waiting for their next piece's "
                                          "prefill, or paused)", group="LLM", check=at_least(1))
    router_token_ratio: float = opt(
        0.0, "busy threshold as LightLLM: while KV in use / --max_total_token_num >= this ratio (always, at 0) "
             "admission assumes every request generates its maximum length, so running requests never run out of "
             "KV; below it, --router_max_new_token_len (or 1.1 x tokens so far) is assumed and a request that "
             "outgrows the pool is paused (KV freed, tokens kept, prefilled again later), never lost",
        group="LLM", check=in_unit_interval)
    router_max_new_token_len: int = opt(1024, "speech tokens assumed per text piece at admission while not busy (see "
                                              "--router_token_ratio): min(max length, max(1.1 x tokens so far, this))",
                                        group="LLM")
    router_max_wait_tokens: int = opt(8, "decode steps between prefill steps while requests decode: waiting requests "
                                         "(and the next text piece of running ones) are prefilled every this many "
                                         "decode steps; with nothing decoding they are prefilled at once", group="LLM")
    cache_reserved_ratio: float = opt(0.5, NO_EFFECT + "LightTTS keeps this share of the KV pool free for running "
                                                       "requests to grow into; here admission reserves that growth "
                                                       "per request from its estimated peak length "
                                                       "(--router_token_ratio, --router_max_new_token_len)",
                                      group="LLM", check=in_unit_interval)
    gpt_paral_num: Optional[int] = opt(None, "LightTTS's cap on requests in the LLM; if set, overrides "
                                             "--running_max_req_size", group="LLM")
    gpt_paral_step_num: Optional[int] = opt(None, NO_EFFECT + "LightTTS's per-step token budget; here "
                                                              "--batch_max_tokens bounds prefill", group="LLM")
    mode: list[str] = opt(help="kernel modes, space or comma separated. triton_int8kv and ppl_int8kv (either) store "
                               "the LLM's KV cache in int8. triton_flashdecoding, triton_gqa_flashdecoding and "
                               "triton_gqa_attention: no effect here: the LLM always runs its one Triton "
                               "flash-decoding kernel, which already handles GQA",
                          group="LLM", check=_modes, metavar="MODE", factory=list)
    disable_cudagraph: bool = opt(False, "run the LLM decode step and the decode stage (flow encoder, Euler loop, "
                                         "HiFT) without CUDA graphs", group="LLM")
    graph_max_batch_size: int = opt(64, "largest decode batch captured in a CUDA graph", group="LLM", check=at_least(1))
    graph_max_len_in_batch: int = opt(32768, "longest sequence a captured graph serves", group="LLM")
    sample_close: bool = opt(False, "greedy decoding (argmax) instead of RAS sampling", group="LLM")
    load_way: str = opt("HF", NO_EFFECT + "weights always load from the official .pt files", group="LLM")
    tp_size: int = opt(1, NO_EFFECT + "tensor parallelism; only 1 is accepted (a 0.5 B LM fits one GPU)", group="LLM",
                       check=lambda v: None if v == 1 else f"{v}: only 1 is supported")

    # ---- decode
    decode_process_num: int = opt(1, "decode processes; decode i runs on GPU i %% num_gpus", group="decode",
                                  check=at_least(1))
    decode_paral_num: Optional[int] = opt(None, "LightTTS's per-decoder concurrency; if set, overrides "
                                                "--decode_max_batch_size", group="decode")
    decode_max_batch_size: int = opt(16, "requests one decode process serves at once", group="decode",
                                     check=at_least(1))
    data_type: str = opt("float16", "weights and activations dtype on a GPU (on a CPU everything runs in float32)",
                         group="decode", choices=DATA_TYPES)
    load_trt: bool = opt(False, "use a TensorRT engine for the flow estimator; needs an NVIDIA GPU and the tensorrt "
                                "package (pip install tensorrt-cu12), checked before any stage starts. Unverified: "
                                "TensorRT cannot be installed on this project's test machines", group="decode")
    load_jit: bool = opt(False, "torch.compile HiFT, and the flow estimator when it is not the fused one "
                                "(--disable_fused_estimator); ignored with --load_trt", group="decode")
    disable_fused_estimator: bool = opt(False, "on a GPU, run the flow estimator module by module instead of the "
                                               "fused one (same math up to rounding; for comparison and triage)",
                                        group="decode")
    decode_prompt_cache_gb: float = opt(
        0.0, "GPU memory (GB) of each decode process's prompt cache: per voice, the flow's prompt frames that no "
             "generated token changes, computed once, and per streaming request the frames of its earlier chunks "
             "(CosyVoice2: 2.3 MB per frame in fp16/bf16, 0.46 GB for a 5 s prompt, 1.15 GB for 10 s of streamed "
             "audio; CosyVoice3: 1.8 MB per frame), so a "
             "streaming chunk computes only its own frames; the same audio. What does not fit is recomputed. Pays "
             "off when decode is the bottleneck; 0 = off (default); fused estimator only (not with --load_trt or "
             "--disable_fused_estimator)",
        group="decode", parse=gigabytes, metavar="GB")
    decode_stream_cache: bool = opt(False, "with --decode_prompt_cache_gb, keep also each stream's frames from its "
                                           "earlier chunks, so a chunk computes only its own frames (the same audio): "
                                           "chunk times stay flat in a long sentence (60 s: 0.17-0.22 s per 4 s chunk "
                                           "instead of up to 0.6 s), but at 64 "
                                           "streams of 10 s its throughput is within the run-to-run spread of the "
                                           "default (151-178 audio-s/s either way) and it needs 2.3 MB per frame "
                                           "(60 GB for 64 such streams; docs/benchmarks.md); off by default",
                                    group="decode")
    decode_first_hop: int = opt(0, "speech tokens in the first streaming chunk; 0 = the official 25 + prompt padding "
                                   "(smaller: earlier first audio, chunks end inside a flow chunk, audio differs from "
                                   "the official)", group="decode", check=_first_hop)
    first_hop_tokens: Optional[int] = opt(None, "another name for --decode_first_hop; if set, overrides it",
                                          group="decode")
    decode_sm_percent: int = opt(0, "under NVIDIA MPS (an nvidia-cuda-mps-control daemon the operator runs), the "
                                    "most of the GPU's SMs each decode process may use (the rest stay free for the "
                                    "LLM's kernels); 0 = no limit (default). Measured on an H200 with the prompt and "
                                    "stream caches: 70 cut the streaming p99 first audio at 16 streams by 12%% (the "
                                    "first chunks' decode got faster, the LLM's first tokens did not) and cost a "
                                    "third of the streaming throughput at 64. Without an MPS daemon it has no "
                                    "effect (logged)",
                                 group="decode", check=lambda v: None if 0 <= v <= 100 else
                                 f"must be a percentage in 0..100 (got {v})", metavar="PERCENT")
    first_chunk_priority: bool = opt(True, "while a decode process on the LLM's GPU computes first chunks of "
                                           "streams, the LLM leaves the streams already past their first chunk out "
                                           "of its steps (at most 1 s per call), so a first chunk does not share the "
                                           "GPU with the rest of the sentences; their later tokens come a little "
                                           "later, covered by the audio already sent (no hold while a stream waiting "
                                           "for tokens has under 1 s buffered). The same audio. Measured on an "
                                           "H200: streaming first audio p50 at 1 stream 127 -> 92-95 ms, p99 at 16 "
                                           "518 -> 398-493 ms, 64 unchanged (docs/benchmarks.md). On by default; "
                                           "false turns it off",
                                     group="decode")

    def public(self) -> dict:
        """The settings without secrets, for logs."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["secret"]}


def _local_model_dir(args: ServerArgs) -> Optional[str]:
    """A ModelScope id in --model_dir becomes its local directory here, once, before any stage starts
    (each stage loads args.model_dir); a path stays as given."""
    try:
        args.model_dir = resolve_model_dir(args.model_dir)
    except ModelLoadError as e:
        return f"--model_dir {e}"
    return None if os.path.isdir(args.model_dir) else f"--model_dir {args.model_dir}: not a directory"


def api_keys(value: Optional[str]) -> list[str]:
    """--api_key as the list of accepted keys (comma separated; empty: no key required)."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def _voice_dir(args: ServerArgs) -> Optional[str]:
    """--voice_dir: created (0700) and checked before anything starts; made absolute."""
    if args.voice_dir is None:
        return None
    if not args.voice_dir.strip():
        args.voice_dir = None   # VOICE_DIR= in a settings file: the private default
        return None
    from light_tts.server.encode.voice_store import VoiceDirError, prepare_dir
    try:
        args.voice_dir = prepare_dir(args.voice_dir)
    except VoiceDirError as e:
        return f"--voice_dir {e}"
    return None


# Checks between flags, one line each (run after aliases are folded). The first sets --model_dir to a
# local directory, which the others read.
CHECKS: list[Callable[[ServerArgs], Optional[str]]] = [
    _local_model_dir,
    lambda a: None if a.batch_max_tokens >= a.max_req_total_len else
    f"--batch_max_tokens ({a.batch_max_tokens}) must be >= --max_req_total_len ({a.max_req_total_len}): "
    "a request's prompt must fit one prefill",
    lambda a: None if a.max_req_total_len <= a.max_total_token_num else
    f"--max_req_total_len ({a.max_req_total_len}) must be <= --max_total_token_num ({a.max_total_token_num}): "
    "one request must fit the KV cache",
    lambda a: None if a.max_prompt_seconds > a.min_prompt_seconds else
    f"--max_prompt_seconds ({a.max_prompt_seconds}) must be > --min_prompt_seconds ({a.min_prompt_seconds})",
    lambda a: None if not a.api_key or api_keys(a.api_key) else
    "--api_key (LIGHTTTS_API_KEY) is set but holds no key (only commas or spaces)",
    _voice_dir,
]
FIELDS = {f.name: f for f in dataclasses.fields(ServerArgs)}
_HINTS = typing.get_type_hints(ServerArgs)


def _kind(name: str):
    """bool, list, or the scalar type (Optional[int] -> int)."""
    t = _HINTS[name]
    if t is bool:
        return bool
    if typing.get_origin(t) is list:
        return list
    if typing.get_origin(t) is typing.Union:
        return next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _converter(name: str) -> Callable:
    kind = _kind(name)
    return FIELDS[name].metadata["parse"] or (str2bool if kind is bool else str if kind is list else kind)


def env_names(name: str) -> tuple[str, ...]:
    """The environment variables that set flag `name`, first match wins."""
    return FIELDS[name].metadata["env"] or (name.upper(),)


def default_of(name: str):
    """The flag's default; for a flag the command line requires, what the environment mapping falls back to."""
    f = FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is dataclasses.MISSING:
        return f.metadata["env_default"]()
    return f.default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m light_tts.server.api_server",
        description="LightTTS: CosyVoice2 TTS server (HTTP front end, encode / LLM / decode processes over ZeroMQ). "
                    "Every flag is also the environment variable of its name in upper case (REQUEST_TIMEOUT=30, "
                    "LOAD_TRT=true, MODE='a b'), read by wsgi_wrapper.py (gunicorn) and the scripts in scripts/ "
                    "(python -m light_tts.server.args --list)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = p.add_argument_group(meta["group"])
        kw = dict(help=meta["help"] or None, metavar=meta["metavar"])
        kind = _kind(name)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw.update(required=True, default=argparse.SUPPRESS)
        else:
            kw["default"] = default_of(name)
        if kind is bool:
            kw.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        elif kind is list:
            kw.update(nargs="+")
        else:
            kw.update(type=_converter(name), choices=meta["choices"])
        groups[meta["group"]].add_argument(f"--{name}", **kw)
    return p


def normalize(args: ServerArgs) -> ServerArgs:
    """Fold aliases into the flags the code reads."""
    args.mode = [m for item in args.mode for m in item.replace(",", " ").split()]
    for alias, target in ALIASES.items():
        if getattr(args, alias) is not None:
            setattr(args, target, getattr(args, alias))
    args.data_type = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(args.data_type, args.data_type)
    return args


def validate(args: ServerArgs) -> list[str]:
    """One line per mistake; empty when the combination is usable. Sets args.model_dir to the local
    directory when it is a ModelScope id (downloaded, or found in the ModelScope cache)."""
    errors = []
    for name, f in FIELDS.items():
        value = getattr(args, name)
        if f.metadata["check"] is not None and value is not None:
            why = f.metadata["check"](value)
            if why:
                errors.append(f"--{name} {why}")
    errors += [why for check in CHECKS if (why := check(args))]
    return errors


def _secrets_from_env(args: ServerArgs, environ: Mapping[str, str]) -> None:
    for name, f in FIELDS.items():
        if f.metadata["secret"] and getattr(args, name) is None:
            setattr(args, name, next((environ[e] for e in env_names(name) if environ.get(e)), None))


def _parse(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[argparse.ArgumentParser, ServerArgs]:
    parser = build_parser()
    args = ServerArgs(**vars(parser.parse_args(list(argv))))
    _secrets_from_env(args, environ)
    return parser, normalize(args)


def parse_args(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> ServerArgs:
    """The command line (sys.argv by default): exits 2 with one line per mistake."""
    parser, args = _parse(sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ)
    errors = validate(args)
    if errors:
        parser.exit(2, "".join(f"error: {e}\n" for e in errors))
    return args


def env_argv(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The api_server flags the environment sets, then EXTRA_ARGS. Raises ConfigError naming the
    variable whose value does not parse."""
    environ = os.environ if environ is None else environ
    argv = []
    for name, f in FIELDS.items():
        meta = f.metadata
        if meta["secret"]:
            continue
        var, raw = next(((e, environ[e]) for e in env_names(name) if environ.get(e, "").strip()), (None, None))
        if raw is None:
            if meta["env_default"] is None:
                continue
            raw = meta["env_default"]()
        raw = raw.strip()
        kind = _kind(name)
        try:
            if kind is list:
                argv += [f"--{name}", *raw.replace(",", " ").split()]
                continue
            value = _converter(name)(raw)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{var}={raw!r}: {e}") from None
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{var}={raw!r}: choose from {', '.join(meta['choices'])}")
        text = str(value) if kind is bool else raw
        argv += [f"--{name}={text}"] if text.startswith("-") else [f"--{name}", text]
    extra = environ.get(EXTRA_ARGS_ENV, "")
    try:
        argv += shlex.split(extra)
    except ValueError as e:
        raise ConfigError(f"{EXTRA_ARGS_ENV}={extra!r}: {e}") from None
    return argv


def args_from_env(environ: Optional[Mapping[str, str]] = None) -> ServerArgs:
    """ServerArgs for the environment alone (gunicorn): raises ConfigError, one line per mistake."""
    environ = os.environ if environ is None else environ
    argv = env_argv(environ)
    try:
        _, args = _parse(argv, environ)
    except SystemExit:   # argparse has printed why (an EXTRA_ARGS flag)
        raise ConfigError(f"server flags from the environment rejected: {shlex.join(argv)}") from None
    errors = validate(args)
    if errors:
        raise ConfigError("\n".join(errors))
    return args


def _show(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m light_tts.server.args",
                                description="The server settings the environment makes (scripts/*.sh use this)")
    p.add_argument("--from-env", action="store_true",
                   help="print the api_server arguments the environment sets, one a line (EXTRA_ARGS last)")
    p.add_argument("--get", nargs="+", metavar="FLAG",
                   help="with --from-env: print the value each FLAG takes, one a line (unset: its default)")
    p.add_argument("--list", action="store_true", help="every flag: its environment variable and default")
    ns = p.parse_args(argv)
    if ns.list:
        for name in FIELDS:
            print(f"--{name:<25} {' or '.join(env_names(name)):<25} {_show(default_of(name)) or '-'}")
        return 0
    if not ns.from_env:
        p.error("--from-env or --list")
    try:
        argv_env = env_argv()
        if ns.get:
            unknown = [n for n in ns.get if n not in FIELDS]
            if unknown:
                p.error(f"unknown flag(s) {', '.join(unknown)}")
            _, args = _parse(argv_env, os.environ)
            lines = [_show(getattr(args, n)) for n in ns.get]
        else:
            lines = argv_env
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [line for line in lines if "\n" in line]
    if bad:
        print(f"error: a value holds a newline: {bad[0]!r}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
