"""The one command-line parser of the server (`python -m light_tts.server.api_server --help`).

Every flag the operators' runbooks name parses. Flags that change nothing in this design say so
in their help text ("no effect here: ...") rather than being silently ignored. Boolean flags
take LightTTS's spellings: `--load_trt`, `--load_trt True`, `--load_trt false`.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


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


def _flag(p: argparse.ArgumentParser, name: str, help: str, default: bool = False) -> None:
    p.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


NO_EFFECT = "no effect here: "
# Stages keep a reply socket per HTTP worker (ipc.ReplySockets): at most this many stay open
MAX_HTTP_WORKERS = 64
MODES = ("triton_flashdecoding", "triton_int8kv", "ppl_int8kv", "triton_gqa_flashdecoding", "triton_gqa_attention")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m light_tts.server.api_server",
        description="LightTTS: CosyVoice2 TTS server (HTTP front end, encode / LLM / decode processes over ZeroMQ)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--model_dir", required=True, help="CosyVoice2 model directory (official layout)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8080)
    g.add_argument("--httpserver_workers", type=int, default=1,
                   help="HTTP worker processes sharing one backend (each has its own reply socket; at most 64)")
    g.add_argument("--zmq_mode", default="ipc:///tmp/",
                   help="ZeroMQ transport prefix; only ipc:// is supported: sockets live in a private "
                        "per-instance directory under this path (mode 0700, named by the port)")
    g.add_argument("--api_key", default=os.environ.get("LIGHTTTS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint except health (env LIGHTTTS_API_KEY)")
    g.add_argument("--max_upload_bytes", type=int, default=20 * 2**20, help="largest accepted prompt upload")
    g.add_argument("--request_timeout", type=float, default=300.0,
                   help="seconds before a request is aborted everywhere and answered 504")
    g.add_argument("--max_queue_size", type=int, default=256,
                   help="requests in flight per HTTP worker before new ones get 503 with Retry-After")
    _flag(g, "--health_monitor", "restart a crashed stage process (otherwise /healthz reports it and the "
                                 "server keeps answering 503 until restarted)")
    g.add_argument("--log_stats_interval", type=float, default=10.0, help="seconds between stats log lines")
    _flag(g, "--disable_log_stats", "do not log periodic stats")
    g.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    g.add_argument("--gpu_memory_limit_gb", type=gigabytes, default=0.0, metavar="GB",
                   help="most GPU memory, in GB (10^9 bytes; nvidia-smi shows MiB: 22 GB is 20981 MiB), that all "
                        "processes of this instance together may use on each GPU they run on, counted as "
                        "nvidia-smi does (CUDA contexts included); 0 = no cap. Each process caps its allocator "
                        "at its share: a CUDA-context allowance per process off the top, the LLM what its "
                        "weights, KV pool (--max_total_token_num) and prefill (--batch_max_tokens) need, the "
                        "decode processes on that GPU the rest in equal parts (light_tts/server/gpu_memory.py). "
                        "A limit too small for the flags stops the start naming the flag to change. No effect "
                        "on a CPU")

    g = p.add_argument_group("encode")
    g.add_argument("--encode_process_num", type=int, default=1, help="encode processes (text, prompt audio features)")
    g.add_argument("--encode_paral_num", type=int, default=100,
                   help=NO_EFFECT + "LightTTS's per-encoder concurrency; each encode process here takes "
                                    "requests one at a time and cache hits cost microseconds")
    g.add_argument("--cache_capacity", type=int, default=100, help="encoded prompts kept per encode process (LRU)")
    g.add_argument("--tokenizer_mode", default="slow", help=NO_EFFECT + "one tokenizer implementation (tokenizers BPE)")
    _flag(g, "--trust_remote_code", NO_EFFECT + "no remote code is ever loaded")
    g.add_argument("--min_prompt_seconds", type=float, default=0.5)
    g.add_argument("--max_prompt_seconds", type=float, default=30.0)

    g = p.add_argument_group("LLM")
    g.add_argument("--max_total_token_num", type=int, default=32768,
                   help="KV pool size in token slots (every layer's K/V for one token per slot), allocated once and "
                        "shared by all running requests and the prompt prefix cache")
    g.add_argument("--max_req_total_len", type=int, default=16384,
                   help="largest prompt + generated length of one text piece (2 special + prompt text + piece text + "
                        "prompt speech + max speech tokens); longer requests get 400")
    g.add_argument("--bistream_max_len", type=int, default=3000,
                   help="most tokens (prompt + text + speech) one streaming-text (WebSocket) request may hold; its KV "
                        "reservation at admission, since its length is unknown up front (capped by --max_req_total_len)")
    g.add_argument("--batch_max_tokens", type=int, default=16384, help="most prompt tokens prefilled in one prefill step (new requests are admitted while their "
                        "prompts fit; must be >= --max_req_total_len)")
    g.add_argument("--running_max_req_size", type=int, default=1000, help="most requests admitted at once (decoding, waiting for their next piece's prefill, or paused)")
    g.add_argument("--router_token_ratio", type=float, default=0.0,
                   help="busy threshold as LightLLM: while KV in use / --max_total_token_num >= this ratio (always, at 0) "
                        "admission assumes every request generates its maximum length, so running requests never "
                        "run out of KV; below it, --router_max_new_token_len (or 1.1 x tokens so far) is assumed "
                        "and a request that outgrows the pool is paused (KV freed, tokens kept, prefilled again "
                        "later), never lost")
    g.add_argument("--router_max_new_token_len", type=int, default=1024,
                   help="speech tokens assumed per text piece at admission while not busy (see --router_token_ratio): "
                        "min(max length, max(1.1 x tokens so far, this))")
    g.add_argument("--router_max_wait_tokens", type=int, default=8,
                   help="decode steps between prefill steps while requests decode: waiting requests (and the next text "
                        "piece of running ones) are prefilled every this many decode steps; with nothing "
                        "decoding they are prefilled at once")
    g.add_argument("--cache_reserved_ratio", type=float, default=0.5,
                   help="share of the KV pool kept free for running requests to grow into")
    g.add_argument("--gpt_paral_num", type=int, default=None,
                   help="LightTTS's cap on requests in the LLM; if set, overrides --running_max_req_size")
    g.add_argument("--gpt_paral_step_num", type=int, default=None,
                   help=NO_EFFECT + "LightTTS's per-step token budget; here --batch_max_tokens bounds prefill")
    g.add_argument("--mode", nargs="+", default=[], metavar="MODE",
                   help="kernel modes, space or comma separated: " + ", ".join(MODES) +
                        " (triton_int8kv stores the KV cache in int8)")
    _flag(g, "--disable_cudagraph", "run the LLM decode step and the decode stage (flow encoder, Euler loop, HiFT) "
                                    "without CUDA graphs")
    g.add_argument("--graph_max_batch_size", type=int, default=64, help="largest decode batch captured in a CUDA graph")
    g.add_argument("--graph_max_len_in_batch", type=int, default=32768, help="longest sequence a captured graph serves")
    _flag(g, "--sample_close", "greedy decoding (argmax) instead of RAS sampling")
    g.add_argument("--load_way", default="HF", help=NO_EFFECT + "weights always load from the official .pt files")
    g.add_argument("--tp_size", type=int, default=1, help="tensor parallelism; only 1 is supported (a 0.5 B LM fits one GPU)")

    g = p.add_argument_group("decode")
    g.add_argument("--decode_process_num", type=int, default=1, help="decode processes; decode i runs on GPU i %% num_gpus")
    g.add_argument("--decode_paral_num", type=int, default=None,
                   help="LightTTS's per-decoder concurrency; if set, overrides --decode_max_batch_size")
    g.add_argument("--decode_max_batch_size", type=int, default=16, help="requests one decode process serves at once")
    g.add_argument("--data_type", default="float16", choices=("float16", "bfloat16", "float32", "fp16", "bf16", "fp32"),
                   help="weights and activations dtype on a GPU (on a CPU everything runs in float32)")
    _flag(g, "--load_trt", "use a TensorRT engine for the flow estimator (needs the tensorrt package)")
    _flag(g, "--load_jit", "torch.compile HiFT, and the flow estimator when it is not the fused one "
                           "(--disable_fused_estimator); ignored with --load_trt")
    _flag(g, "--disable_fused_estimator", "on a GPU, run the flow estimator module by module instead of the fused "
                                          "one (same math up to rounding; for comparison and triage)")
    g.add_argument("--decode_prompt_cache_gb", type=gigabytes, default=0.0,
                   help="GPU memory (GB) of each decode process's prompt cache: per voice, the flow's prompt frames "
                        "that no generated token changes, computed once (2.3 MB per frame in fp16/bf16, 0.46 GB "
                        "for a 5 s prompt), so a streaming chunk computes only its own frames. Pays off when "
                        "decode is the bottleneck and voices repeat; 0 = off (default); fused estimator only "
                        "(not with --load_trt or --disable_fused_estimator)")
    g.add_argument("--decode_first_hop", type=int, default=0,
                   help="speech tokens in the first streaming chunk; 0 = the official 25 + prompt padding "
                        "(smaller: earlier first audio, chunks end inside a flow chunk, audio differs from the official)")
    return p


def validate(args: argparse.Namespace) -> list[str]:
    """One line per mistake; empty when the combination is usable."""
    errors = []
    if not os.path.isdir(args.model_dir):
        errors.append(f"--model_dir {args.model_dir}: not a directory")
    if args.batch_max_tokens < args.max_req_total_len:
        errors.append(f"--batch_max_tokens ({args.batch_max_tokens}) must be >= --max_req_total_len "
                      f"({args.max_req_total_len}): a request's prompt must fit one prefill")
    if args.max_req_total_len > args.max_total_token_num:
        errors.append(f"--max_req_total_len ({args.max_req_total_len}) must be <= --max_total_token_num "
                      f"({args.max_total_token_num}): one request must fit the KV cache")
    for name in ("httpserver_workers", "encode_process_num", "decode_process_num", "decode_max_batch_size",
                 "running_max_req_size", "max_total_token_num", "max_req_total_len", "batch_max_tokens",
                 "max_queue_size", "graph_max_batch_size"):
        if getattr(args, name) < 1:
            errors.append(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.httpserver_workers > MAX_HTTP_WORKERS:
        errors.append(f"--httpserver_workers must be <= {MAX_HTTP_WORKERS} (got {args.httpserver_workers}); "
                      "for more, run several instances behind nginx")
    if not 0 <= args.router_token_ratio < 1:
        errors.append(f"--router_token_ratio must be in [0, 1) (got {args.router_token_ratio})")
    if not 0 <= args.cache_reserved_ratio < 1:
        errors.append(f"--cache_reserved_ratio must be in [0, 1) (got {args.cache_reserved_ratio})")
    if args.decode_first_hop < 0 or 0 < args.decode_first_hop < 5:
        errors.append(f"--decode_first_hop must be 0 (official) or >= 5 (got {args.decode_first_hop}): "
                      "HiFT holds back the last 8 mel frames (4 tokens) of every chunk")
    if args.cache_capacity < 0:
        errors.append(f"--cache_capacity must be >= 0 (got {args.cache_capacity})")
    if not 0 < args.port < 65536:
        errors.append(f"--port must be in 1..65535 (got {args.port})")
    if not args.zmq_mode.startswith("ipc://"):
        errors.append(f"--zmq_mode {args.zmq_mode}: only ipc:// is supported")
    if args.tp_size != 1:
        errors.append(f"--tp_size {args.tp_size}: only 1 is supported")
    for m in args.mode:
        if m not in MODES:
            errors.append(f"--mode {m}: unknown; choose from {', '.join(MODES)}")
    if args.min_prompt_seconds <= 0 or args.max_prompt_seconds <= args.min_prompt_seconds:
        errors.append("--min_prompt_seconds must be > 0 and < --max_prompt_seconds")
    if args.request_timeout <= 0:
        errors.append("--request_timeout must be > 0")
    return errors


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    """Fold aliases into the flags the code reads."""
    args.mode = [m for item in args.mode for m in item.split(",") if m]
    if args.gpt_paral_num is not None:
        args.running_max_req_size = args.gpt_paral_num
    if args.decode_paral_num is not None:
        args.decode_max_batch_size = args.decode_paral_num
    args.data_type = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(args.data_type, args.data_type)
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = normalize(parser.parse_args(argv))
    errors = validate(args)
    if errors:
        parser.exit(2, "".join(f"error: {e}\n" for e in errors))
    return args
