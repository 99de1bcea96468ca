"""GPU benchmark of the LLM engine (token-slot KV pool, Triton kernels, CUDA graphs) beside
`transformers` generate on the same weights, in one run. Prints a markdown table.

    python scripts/bench/bench_llm.py --model_dir models/full [--make]    # about 3-5 minutes on an H100

Shape (issue 9's anchor): Qwen2-0.5B body + the 6564-way speech head, bf16, prompts of ~200
tokens (2 special + 20 prompt text + 30 text + 148 prompt speech), 250 new tokens per request
(fixed-length mode: stop tokens masked, random weights rarely emit eos).

Rows:
- engine decode, batch 1 / 8 / 32 / 64 / 128, for CUDA graphs on/off x int8 KV off/on: median
  ms per decode step (the whole engine step: forward, batched sampling, bookkeeping) and decode
  tokens/s (batch x steps / wall time of the decode steps, after the prefill).
- engine GPU work only: one decode graph replay (the forward and, with the batched sampler, the
  draw) or one eager forward, timed with CUDA events; "ms / step" minus this is the host's share.
- engine prefill: one request of 200 / 500 / 1000 prompt tokens (prefill step, incl. sampling).
- transformers: Qwen2ForCausalLM built from <model_dir>/CosyVoice-BlankEN/config.json with our
  body weights and the speech head (llm_decoder, with its bias) as lm_head, generate(250 new
  tokens, greedy, min_new_tokens=250) with cache_implementation="static" (and "dynamic" at batch 1
  with --hf_dynamic): ms per step = (generate time - prefill time) / 249, tokens/s = batch x 250 /
  generate time. Generated ids index the text embedding table there (same cost as ours).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from light_tts.models.cosyvoice2 import CosyVoice2Model  # noqa: E402
from light_tts.server.io_struct import DecodeStartReq, LLMReq  # noqa: E402
from light_tts.server.llm.engine import LLMEngine  # noqa: E402

NEW_TOKENS = 250


def make_req(rid: str, prompt_len: int, rng: np.random.Generator, vocab: int, speech: int) -> LLMReq:
    """A request whose LM input is `prompt_len` tokens: 20 prompt text, 30 text, the rest prompt speech."""
    n_speech = prompt_len - 2 - 50
    pt = rng.integers(0, vocab, 20).astype(np.int32)
    ps = rng.integers(0, speech, n_speech).astype(np.int32)
    decode = DecodeStartReq(rid=rid, reply_to="", prompt_speech_tokens=ps, prompt_feat=np.zeros((0, 80), np.float32),
                            embedding=np.zeros(192, np.float32))
    return LLMReq(rid=rid, reply_to="", text_pieces=[rng.integers(0, vocab, 30).tolist()], prompt_text_ids=pt,
                  prompt_speech_tokens=ps, decode=decode, seed=int(rng.integers(1 << 30)), fixed_speech_tokens=NEW_TOKENS)


def build_engine(lm, graphs: bool, int8: bool, max_bs: int) -> LLMEngine:
    return LLMEngine(lm, max_total_token_num=max_bs * 520 + 4096, max_req_total_len=2048, running_max_req_size=max_bs,
                     batch_max_tokens=max_bs * 260 + 2048, router_max_wait_tokens=8, cuda_graph=graphs,
                     int8_kv=int8, graph_max_batch_size=max_bs, prefix_cache_entries=0)


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Milliseconds between start() and stop(): CUDA events on a GPU, wall time otherwise."""

    def start(self):
        if DEVICE == "cuda":
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop(self) -> float:
        if DEVICE == "cuda":
            self.b.record()
            sync()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t) * 1e3


def gpu_work(eng: LLMEngine, check: bool) -> tuple:
    """Median ms of the current batch's GPU work alone: its decode graph replayed (the forward and,
    with the batched sampler, the draw) or one eager forward, for the token the next real step
    feeds, written into slots borrowed for the measurement (each row its own: rows sharing a slot
    would read each other's K/V) and given back after; the next real step rewrites the same
    req_to_token position. With `check`, also compare the replay with the eager path: logits
    within bf16 noise, and the in-graph draw equal to an eager draw on the graph's logits.
    Returns (ms, check failures)."""
    seqs = list(eng.running)
    sample_rows = eng._sample_rows(seqs)[0]
    borrowed = eng.pool.alloc(len(seqs))
    args = ([s.next_token or 0 for s in seqs], [s.row for s in seqs], [s.seq_len + 1 for s in seqs],
            borrowed.tolist())
    graph = eng.graphs is not None and eng.graphs.can_run(len(seqs), max(args[2]))

    def eager(max_len=max(args[2])):
        t = torch.tensor(args, dtype=torch.int64, device=eng.device)
        return eng.runner.decode(t[0], t[1].int(), t[2].int(), t[3], max_len)
    fwd = []
    for _ in range(10):
        timer = Timer()
        timer.start()
        eng.graphs.run(*args, sample_rows) if graph else eager()
        fwd.append(timer.stop())
    bad = []
    if check and graph:
        logits, drawn = (t.clone() if t is not None else None for t in eng.graphs.run(*args, sample_rows))
        # the graph's attention launches for --graph_max_len_in_batch: the eager forward with that
        # launch shape must give the same logits; with the batch's own (the eager engine's), flash
        # decoding may split the sequence differently, and bf16 rounding differs a little
        same = eager(eng.graphs.max_len).float()
        own = eager().float()
        rel = lambda a: ((logits.float() - a).norm() / a.norm()).item()
        print(f"    graph vs eager logits (relative L2): same launch shape {rel(same):.2e}, the batch's own "
              f"max_len {rel(own):.2e} (max |logit| {own.abs().max().item():.1f})", flush=True)
        if rel(same) > 1e-3:
            bad.append(f"graph logits differ from the eager forward: relative L2 error {rel(same):.2e}")
        if drawn is not None:
            inputs = torch.from_numpy(eng.sampler.inputs(sample_rows)).to(eng.device)
            again = eng.sampler.draw(logits, inputs)
            if not torch.equal(drawn, again):
                bad.append(f"in-graph draw differs from an eager draw on the same logits in "
                           f"{int((drawn != again).sum())} of {len(seqs)} rows")
    eng.pool.free(borrowed)
    return statistics.median(fwd[2:]), bad


def decode_run(eng: LLMEngine, batch: int, rng, vocab, speech, check: bool = False) -> dict:
    for i in range(batch):
        eng.add(make_req(f"b{batch}-{i}", 200, rng, vocab, speech))
    while eng.waiting or any(not s.decoding for s in eng.running):
        assert eng.step().kind == "prefill"
    sync()
    step_ms, steps, t0, fwd_ms, bad = [], 0, time.perf_counter(), None, []
    while eng.running:
        if steps == min(20, NEW_TOKENS // 2):   # mid-run, so the RAS windows and counters are not trivial
            pause = time.perf_counter()
            fwd_ms, bad = gpu_work(eng, check)
            t0 += time.perf_counter() - pause
        t = time.perf_counter()
        res = eng.step()
        step_ms.append((time.perf_counter() - t) * 1e3)
        assert res.kind == "decode" and not res.errors, res.errors
        steps += 1
    sync()
    wall = time.perf_counter() - t0
    assert eng.kv_used() == 0
    if fwd_ms is None:
        bad.append(f"the mid-run check never ran ({steps} steps)")
    return dict(step_ms=statistics.median(step_ms), tok_s=batch * steps / wall, fwd_ms=fwd_ms, steps=steps, bad=bad)


def prefill_run(eng: LLMEngine, n: int, rng, vocab, speech) -> float:
    times = []
    for i in range(4):
        eng.add(make_req(f"p{n}-{i}", n, rng, vocab, speech))
        sync()
        t = time.perf_counter()
        assert eng.step().kind == "prefill"
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        eng.abort(f"p{n}-{i}")
    return statistics.median(times[1:])


def hf_model(model_dir: str, lm, dtype):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(os.path.join(model_dir, "CosyVoice-BlankEN"))
    cfg.use_sliding_window = False
    cfg._attn_implementation = "sdpa"
    hf = transformers.Qwen2ForCausalLM(cfg)
    hf.model.load_state_dict(lm.llm.model.model.state_dict(), strict=False)
    # generated ids are fed back through the text embedding: keep them inside it (only a tiny model
    # has a text vocabulary smaller than the 6564 speech classes)
    n_out = min(lm.llm_decoder.out_features, cfg.vocab_size)
    head = torch.nn.Linear(lm.llm_decoder.in_features, n_out, bias=True)
    head.load_state_dict({k: v[:n_out] for k, v in lm.llm_decoder.state_dict().items()})
    hf.lm_head = head
    hf.config.vocab_size = head.out_features
    return hf.to(DEVICE, dtype).eval()


@torch.inference_mode()
def hf_run(hf, batch: int, cache: str, rng, vocab: int) -> dict:
    ids = torch.as_tensor(rng.integers(0, vocab, (batch, 200)), device=DEVICE)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    if cache != "dynamic":
        kw["cache_implementation"] = cache

    def gen(n):
        sync()
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        assert out.shape[1] == 200 + n
        return time.perf_counter() - t
    gen(NEW_TOKENS)        # warm-up at the measured length: static-cache shapes (and their compile) settle
    pre = min(gen(1) for _ in range(2))
    total = gen(NEW_TOKENS)
    return dict(step_ms=(total - pre) / (NEW_TOKENS - 1) * 1e3, tok_s=batch * NEW_TOKENS / total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default="models/full")
    p.add_argument("--make", action="store_true", help="write a full-size random model there first if missing")
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--prefill", default="200,500,1000")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--hf_dynamic", action="store_true", help="also time transformers' default (dynamic) cache at batch 1")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script with a tiny model (numbers meaningless)")
    args = p.parse_args(argv)
    global DEVICE, NEW_TOKENS
    DEVICE = args.device
    if DEVICE == "cpu":
        NEW_TOKENS = 6
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.model_dir, "llm.pt")):
        if not args.make:
            print(f"{args.model_dir}/llm.pt missing (pass --make to write a random full-size model)", file=sys.stderr)
            return 2
        from light_tts.tools.make_random_model import make_random_model
        make_random_model(args.model_dir, "full")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    if DEVICE == "cpu":
        dtype = torch.float32
    lm = CosyVoice2Model.from_pretrained(args.model_dir, device=DEVICE, dtype=dtype, components=("llm",)).llm
    vocab, speech = lm.llm.model.model.config.vocab_size, lm.speech_token_size
    rng = np.random.default_rng(0)
    from light_tts.kernels import dispatch
    kernels = {n: ("triton" if dispatch.triton_available(n) else "reference") for n in dispatch.NAMES}
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    print(f"# LLM engine benchmark on {gpu} ({args.dtype}), torch {torch.__version__}")
    print(f"kernels: {kernels}\n", flush=True)

    rows = []   # (what, batch, step ms, tok/s, fwd ms)
    failures = []
    for graphs in (True, False):
        for int8 in (False, True):
            t = time.perf_counter()
            eng = build_engine(lm, graphs, int8, max(batches))
            setup = time.perf_counter() - t
            name = f"engine graphs={'on' if eng.graphs is not None else 'off'} int8kv={'on' if int8 else 'off'}"
            print(f"{name}: setup {setup:.1f} s ({eng.stats()['cuda_graphs']} graphs)", flush=True)
            for b in batches:
                r = decode_run(eng, b, rng, vocab, speech, check=True)
                failures += [f"{name} batch {b}: {m}" for m in r["bad"]]
                rows.append((name, b, r["step_ms"], r["tok_s"], r["fwd_ms"]))
                print(f"  batch {b}: {r['step_ms']:.2f} ms/step, {r['tok_s']:.0f} tok/s, GPU work {r['fwd_ms']:.2f} ms",
                      flush=True)
            if graphs and not int8:
                pre = [(n, prefill_run(eng, n, rng, vocab, speech)) for n in (int(x) for x in args.prefill.split(","))]
            del eng
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    hf_rows = []
    if not args.skip_hf:
        try:
            hf = hf_model(args.model_dir, lm, dtype)
            for b in batches:
                r = hf_run(hf, b, "static", rng, vocab)
                hf_rows.append(("transformers static cache", b, r["step_ms"], r["tok_s"]))
                print(f"  transformers static batch {b}: {r['step_ms']:.2f} ms/step {r['tok_s']:.0f} tok/s", flush=True)
            if args.hf_dynamic:
                r = hf_run(hf, 1, "dynamic", rng, vocab)
                hf_rows.append(("transformers dynamic cache", 1, r["step_ms"], r["tok_s"]))
        except Exception as e:  # noqa: BLE001 - report and keep the engine numbers
            print(f"transformers run failed: {type(e).__name__}: {e}", flush=True)

    print("\n| what | batch | ms / decode step | decode tok/s | GPU work only ms |")
    print("|---|---:|---:|---:|---:|")
    for name, b, ms, tps, fwd in rows:
        print(f"| {name} | {b} | {ms:.2f} | {tps:,.0f} | {fwd:.2f} |")
    for name, b, ms, tps in hf_rows:
        print(f"| {name} | {b} | {ms:.2f} | {tps:,.0f} | |")
    print("\n| prefill (batch 1, graphs on, bf16 KV) | ms |")
    print("|---|---:|")
    for n, ms in pre:
        print(f"| {n} prompt tokens | {ms:.2f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print("graph checks: " + ("; ".join(failures) if failures else "ok (graph logits = the eager forward at the same "
                                                                       "launch shape, in-graph draws = eager draws)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
