"""Load a CosyVoice2 directory and time one step of each network (plain-PyTorch paths).

    python scripts/bench/bench_model.py --model_dir models/full --dtype bf16 [--make full]

Prints a markdown table: load time and GPU memory of each module, one LLM prefill + one decode
step, one streaming flow chunk (25 new tokens + 3 lookahead after a 125-token prompt, 10 Euler
steps with CFG) and one HiFT chunk. Times are medians of --repeat runs after warm-up, measured
with CUDA events on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from light_tts.tools.bench_args import add_model_args, ensure_model  # noqa: E402
from light_tts.models.cosyvoice2 import CosyVoice2Model  # noqa: E402


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `repeat` runs after two warm-ups."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt_tokens", type=int, default=125)
    p.add_argument("--prefill_tokens", type=int, default=200)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    ensure_model(args)

    rows = []
    model = CosyVoice2Model.from_pretrained(args.model_dir, device="cpu", dtype=args.dtype, components=())
    for name in ("llm", "flow", "hift"):
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        t = time.perf_counter()
        part = CosyVoice2Model.from_pretrained(args.model_dir, device=device, dtype=args.dtype, components=(name,))
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        setattr(model, name, getattr(part, name))
        mem = (torch.cuda.memory_allocated(device) - before) / 2**20 if device.type == "cuda" else float("nan")
        params = sum(x.numel() for x in getattr(model, name).parameters())
        rows.append((f"load {name}", f"{secs:.2f} s", f"{mem:.0f} MiB", f"{params / 1e6:.1f} M params"))

    g = torch.Generator(device="cpu").manual_seed(0)
    llm = model.llm
    hidden = llm.llm_embedding.weight.shape[1]
    embeds = torch.randn(1, args.prefill_tokens, hidden, generator=g).to(device, model.dtype)
    with torch.inference_mode():
        prefill = lambda: llm.forward(embeds, llm.new_cache(args.prefill_tokens + 8), last_only=True)
        rows.append((f"LLM prefill {args.prefill_tokens} tokens", f"{timed(prefill, args.repeat, device):.2f} ms", "", ""))
        cache = llm.new_cache(args.prefill_tokens + 8)
        llm.forward(embeds, cache, last_only=True)
        step_in = llm.speech_embedding.weight[:1].reshape(1, 1, -1)

        def decode_step():
            cache.seq_len = args.prefill_tokens  # overwrite the same slot: a constant-length step
            llm.forward(step_in, cache, last_only=True)
        rows.append(("LLM decode step (batch 1)", f"{timed(decode_step, args.repeat, device):.2f} ms", "",
                     f"{args.prefill_tokens} tokens in KV"))

        prompt_tok = torch.randint(0, 6561, (1, args.prompt_tokens), generator=g).to(device, torch.int32)
        prompt_feat = torch.randn(1, 2 * args.prompt_tokens, 80, generator=g).to(device, model.dtype)
        emb = torch.randn(1, 192, generator=g).to(device, model.dtype)
        new_tok = torch.randint(0, 6561, (1, 28), generator=g).to(device, torch.int32)
        n = lambda t: torch.tensor([t.shape[1]], dtype=torch.int32, device=device)

        def flow_chunk():
            return model.flow.inference(token=new_tok, token_len=n(new_tok), prompt_token=prompt_tok,
                                        prompt_token_len=n(prompt_tok), prompt_feat=prompt_feat,
                                        prompt_feat_len=n(prompt_feat), embedding=emb, streaming=True, finalize=False)
        rows.append(("flow chunk (25+3 tokens, 10 steps, CFG)", f"{timed(flow_chunk, args.repeat, device):.2f} ms", "", ""))
        mel = flow_chunk()[0].to(model.dtype)
        hift_chunk = lambda: model.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0, device=device))
        rows.append((f"HiFT chunk ({mel.shape[2]} mel frames)", f"{timed(hift_chunk, args.repeat, device):.2f} ms", "", ""))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, dtype {args.dtype}, torch {torch.__version__}, model {args.model_dir}\n")
    print("| what | time | GPU memory | note |\n| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if device.type == "cuda":
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
