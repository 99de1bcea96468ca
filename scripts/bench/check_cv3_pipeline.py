"""End-to-end check: the official CosyVoice3Model.tts() loop vs light_tts's token2wav pipeline, on the
SAME CosyVoice3 model directory, prompt and speech tokens (fp32, CPU).

Run with the official code's venv, a checkout of FunAudioLLM/CosyVoice and Matcha-TTS, from the
repository root:

    PYTHONPATH=/path/to/CosyVoice:. MATCHA_TTS=/path/to/Matcha-TTS /path/to/official-venv/bin/python \\
        scripts/bench/check_cv3_pipeline.py [--tiny] [--full] [--model-dir DIR] [--work-dir DIR] [--tokens N]

Per directory (tiny / full: written under --work-dir by light_tts.tools.make_random_model --family
cosyvoice3 when missing; --model-dir: any CosyVoice3 directory, e.g. the official release):
  official: hyperpyyaml.load_hyperpyyaml(cosyvoice3.yaml, overrides={'qwen_pretrain_path': dir/CosyVoice-BlankEN})
            -> cosyvoice.cli.model.CosyVoice3Model(llm, flow, hift, fp16=False).load(llm.pt, flow.pt, hift.pt)
            (the official CosyVoice3.__init__ minus the frontend; every load strict)
  ours:     light_tts.models.pretrained.load_model(dir, components=("flow", "hift")) (strict), and
            light_tts.models.token2wav: Token2Wav + stream_chunks, after drop_long_silences
and compares the audio chunks (count, lengths, max abs difference per chunk and joined) of:
  a. tts(stream=True) and tts(stream=False) with llm_job replaced by one that posts a fixed token list
     (as scripts/bench/check_against_official.py does for CosyVoice2), and tts(stream=False, speed=1.5);
  b. tts(stream=True) with the official llm_job itself, only its LM's `inference` replaced by a
     generator of fixed tokens that hold long silent runs: the official silent-token filter, then
     token2wav, vs drop_long_silences + ours (also the filtered token lists themselves);
  each for the HiFT as loaded and again with its F0 head moved into a speech range (applied to both
  models alike): a random F0 head leaves every frame unvoiced, and then the audio hardly depends on
  the mel, which would make agreement cheap.
Negative controls: the module classes; our flow with one weight x1.001 and our HiFT with one gain
x1.001 must differ clearly more than the comparisons above.

Aligned noise: the official causal HiFT draws its fixed noise table from the global RNG when it is
built (mid-yaml, after the LM and flow); ours draws the same stream from its noise_seed (0). The
official table is redrawn here as its constructor draws it after torch.manual_seed(0). The flow's
start noise (seeded 0 in the official constructor) is checked equal, not changed.

Import-only stubs (never used for math): torchaudio, pyarrow, pyworld, matplotlib, and matcha.utils'
__init__ (hydra/lightning). Exits 1 when a comparison fails.
"""
import argparse
import logging
import os
import sys
import time
import uuid as uuid_mod
import warnings


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random directory (default)")
    ap.add_argument("--full", action="store_true", help="a random directory at the official sizes (~4.4 GB)")
    ap.add_argument("--model-dir", help="check this CosyVoice3 directory instead")
    ap.add_argument("--work-dir", default="/tmp/cv3-pipeline-check")
    ap.add_argument("--tokens", type=int, default=230, help="speech tokens per utterance (230: 3 hops + the rest)")
    ap.add_argument("--prompt-tokens", type=int, default=37, help="prompt speech tokens (37: the first hop is 25 + 13)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest max abs difference that passes")
    ap.add_argument("--variants", choices=("both", "loaded", "voiced"), default="both",
                    help="the HiFT as loaded, with its F0 head voiced, or both (CPU time: the full flow is slow)")
    args = ap.parse_args(argv)
    if not (args.tiny or args.full or args.model_dir):
        args.tiny = True
    return args


ARGS = parse_args() if __name__ == "__main__" else None  # --help answers without the official venv
MAIN = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OFFICIAL = os.environ.get("OFFICIAL_COSYVOICE", "/tmp/CosyVoice")
MATCHA = os.environ.get("MATCHA_TTS", os.path.join(OFFICIAL, "third_party", "Matcha-TTS"))
for p in (MATCHA, OFFICIAL, MAIN):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402  (before the stubs: it probes torchaudio's import spec)

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.WARNING)


# ---------------------------------------------------------------- import-only stubs
from official_env import stub as _stub, unused as _unused  # noqa: E402  (shared with the other checks)


_stub("torchaudio"); _stub("torchaudio.compliance"); _stub("torchaudio.compliance.kaldi", fbank=_unused)  # noqa: E702
_stub("torchaudio.transforms", Spectrogram=_unused, MelSpectrogram=_unused, Resample=_unused)
_stub("pyarrow"); _stub("pyarrow.parquet")  # noqa: E702
_stub("pyworld")
_stub("matplotlib", use=lambda *a, **k: None); _stub("matplotlib.pylab")  # noqa: E702
import matcha  # noqa: E402
_mu = _stub("matcha.utils")
_mu.__path__ = [os.path.join(os.path.dirname(matcha.__file__), "utils")]  # real submodules, skip its __init__
_stub("matcha.utils.pylogger", get_pylogger=logging.getLogger)

from hyperpyyaml import load_hyperpyyaml  # noqa: E402
from cosyvoice.cli.model import CosyVoice3Model as OffModel  # noqa: E402

from light_tts.models.flow.cfm import fixed_noise  # noqa: E402
from light_tts.models.pretrained import load_model  # noqa: E402
from light_tts.models.token2wav import StreamSchedule, Token2Wav, drop_long_silences, stream_chunks  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
ROWS, FAILED = [], []
VARIANTS = {"both": ("hift as loaded", "hift F0 head voiced"), "loaded": ("hift as loaded",),
            "voiced": ("hift F0 head voiced",)}


def row(label, check, result, ok=True):
    ROWS.append((label, check, result, ok))
    if not ok:
        FAILED.append(f"[{label}] {check}")
    print(f"  [{label}] {check}: {result}{'' if ok else '  <-- FAIL'}", flush=True)


def maxabs(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


# ---------------------------------------------------------------- the model directories
def ensure_dir(work_dir, size):
    d = os.path.join(work_dir, f"cv3-{size}")
    if not os.path.isfile(os.path.join(d, "hift.pt")):
        from light_tts.tools.make_random_model import make_random_model
        print(f"writing {d} with light_tts.tools.make_random_model --family cosyvoice3 --size {size}", flush=True)
        make_random_model(d, size, seed=0, log=lambda *a, **k: None, family="cosyvoice3")
    return d


def load_official(d):
    """The official CosyVoice3.__init__'s model loading, unchanged (its frontend left out)."""
    with open(os.path.join(d, "cosyvoice3.yaml")) as f:
        configs = load_hyperpyyaml(f, overrides={"qwen_pretrain_path": os.path.join(d, "CosyVoice-BlankEN")})
    model = OffModel(configs["llm"], configs["flow"], configs["hift"], fp16=False)
    model.load(os.path.join(d, "llm.pt"), os.path.join(d, "flow.pt"), os.path.join(d, "hift.pt"))
    return model


def align_hift_noise(off_hift, seed=0):
    """Redraw the official causal source's fixed noise as its constructor does right after
    torch.manual_seed(seed) (SineGen2: the initial phase, then the table): what ours draws."""
    gen = off_hift.m_source.l_sin_gen
    torch.manual_seed(seed)
    rand_ini = torch.rand(1, gen.rand_ini.shape[1])
    rand_ini[:, 0] = 0
    gen.rand_ini, gen.sine_waves = rand_ini, torch.rand(*gen.sine_waves.shape)


def voice_f0_head(off_hift, our_hift, mel):
    """Move the F0 head's output into 100..250 Hz on `mel` (both models alike)."""
    off_hift.f0_predictor.to(torch.float64)   # as the official inference does on every call
    head = off_hift.f0_predictor.classifier
    with torch.inference_mode():
        x = off_hift.f0_predictor.condnet(torch.nn.functional.pad(mel.double(), (0, 3))).transpose(1, 2)
        raw = torch.nn.functional.linear(x, head.weight.double(), head.bias.double()).flatten()
    scale = 50.0 / max(raw.std().item(), 1e-12)
    state = {"weight": head.weight.detach() * scale,
             "bias": head.bias.detach() * scale + (175.0 - raw.mean().item() * scale)}
    for model in (off_hift, our_hift):
        model.f0_predictor.classifier.load_state_dict({k: v.to(model.f0_predictor.classifier.weight.dtype)
                                                       for k, v in state.items()}, strict=True)


def check_weights(label, off, ours):
    for c in ("flow", "hift"):
        osd, usd = getattr(off, c).state_dict(), getattr(ours, c).state_dict()
        if set(osd) != set(usd):
            row(label, f"{c} weights", f"key sets differ: {sorted(set(osd) ^ set(usd))[:4]}", ok=False)
            continue
        d = max((maxabs(usd[k].float(), osd[k].float()) for k in osd if osd[k].is_floating_point()), default=0.0)
        row(label, f"{c} weights official vs ours ({len(osd)} keys)", "identical" if d == 0 else f"max abs {d:.2e}",
            ok=d == 0)


# ---------------------------------------------------------------- the two pipelines
def official_tts(off, tokens, prompt_tokens, prompt_feat, emb, stream, speed=1.0, lm_stream=None):
    """Run the official tts() loop; its llm_job posts `tokens` (or, with lm_stream, the official
    llm_job runs with its LM's inference yielding lm_stream). Returns (chunks, token2wav calls,
    the token list the loop decoded)."""
    calls, seen = [], {}

    def fixed_llm_job(text, prompt_text, llm_prompt_speech_token, llm_embedding, uuid):
        off.tts_speech_token_dict[uuid].extend(int(t) for t in tokens)
        off.llm_end_dict[uuid] = True

    def logged_token2wav(**kw):
        calls.append((kw["token"].shape[1], kw["token_offset"], kw.get("stream", False), kw["finalize"]))
        seen["tokens"] = kw["token"][0].tolist()
        return OffModel.token2wav(off, **kw)

    if lm_stream is None:
        off.llm_job = fixed_llm_job
    else:
        off.llm.inference = lambda **kw: iter(int(t) for t in lm_stream)
    off.token2wav = logged_token2wav
    off.token_hop_len = 25  # tts() grows it and never resets it: every call would start where the last ended
    try:
        out = off.tts(text=torch.zeros(1, 1, dtype=torch.int32), flow_embedding=emb, llm_embedding=emb,
                      prompt_text=torch.zeros(1, 0, dtype=torch.int32), llm_prompt_speech_token=prompt_tokens,
                      flow_prompt_speech_token=prompt_tokens, prompt_speech_feat=prompt_feat, stream=stream,
                      speed=speed)
        chunks = [o["tts_speech"][0].numpy() for o in out]
    finally:
        for name in ("llm_job", "token2wav"):
            off.__dict__.pop(name, None)
        off.llm.__dict__.pop("inference", None)
        off.token_hop_len = 25
    return chunks, calls, seen.get("tokens")


def ours_tts(ours, tokens, prompt_tokens, prompt_feat, emb, stream, speed=1.0, silent=((), 5)):
    t2w = Token2Wav(ours.flow, ours.hift, prompt_tokens, prompt_feat, emb,
                    StreamSchedule(pre_lookahead_len=ours.flow.pre_lookahead_len), family="cosyvoice3")
    return list(stream_chunks(drop_long_silences(iter(int(t) for t in tokens), *silent), t2w, stream=stream,
                              speed=speed))


def compare(label, name, off_chunks, our_chunks, tol):
    lens_off, lens_ours = [len(c) for c in off_chunks], [len(c) for c in our_chunks]
    if lens_off != lens_ours:
        row(label, f"{name}: chunk lengths", f"official {lens_off} vs ours {lens_ours}", ok=False)
        return float("inf")
    per = [maxabs(a, b) for a, b in zip(our_chunks, off_chunks)]
    joined = maxabs(np.concatenate(our_chunks), np.concatenate(off_chunks))
    peak = float(np.abs(np.concatenate(off_chunks)).max())
    row(label, f"{name}: {len(lens_off)} chunks, lengths {lens_off}",
        f"max abs per chunk {['%.1e' % x for x in per]}, joined {joined:.2e} (|audio| max {peak:.3f})", ok=joined <= tol)
    return joined


def with_bumped(param, factor, fn):
    saved = param.detach().clone()   # restored bit for bit (x * f / f is not always x)
    with torch.no_grad():
        param.mul_(factor)
    try:
        return fn()
    finally:
        with torch.no_grad():
            param.copy_(saved)


# ---------------------------------------------------------------- driver
def run(label, d, args):
    print(f"\n===== {label}: {d} =====", flush=True)
    t0 = time.time()
    off = load_official(d)
    row(label, "official load (cosyvoice3.yaml + CosyVoice3Model.load, strict)", f"OK ({time.time() - t0:.1f}s)")
    t0 = time.time()
    ours = load_model(d, dtype=torch.float32, components=("flow", "hift"))
    row(label, "ours load_model(dir, components=(flow, hift), fp32)", f"OK ({time.time() - t0:.1f}s)")
    kinds = {c: (type(getattr(off, c)).__module__, type(getattr(ours, c)).__module__) for c in ("flow", "hift")}
    row(label, "module classes (official, ours)", str(kinds),
        ok=all(a.startswith("cosyvoice.") and b.startswith("light_tts.") for a, b in kinds.values()))
    check_weights(label, off, ours)
    row(label, "flow start noise: official rand_noise == light_tts fixed_noise()",
        str(torch.equal(off.flow.decoder.rand_noise, fixed_noise())), ok=torch.equal(off.flow.decoder.rand_noise,
                                                                                     fixed_noise()))
    align_hift_noise(off.hift)
    row(label, "official silent tokens / ours (CosyVoice3LM.SILENT_TOKENS)",
        f"{off.silent_tokens} / {list(ours_silent()[0])}", ok=list(off.silent_tokens) == list(ours_silent()[0]))

    g = torch.Generator().manual_seed(11)
    P, N = args.prompt_tokens, args.tokens
    prompt_tokens = torch.randint(0, 6561, (1, P), generator=g, dtype=torch.int32)
    prompt_feat = torch.randn(1, 2 * P, 80, generator=g) * 2 - 5
    emb = torch.randn(1, 192, generator=g)
    tokens = torch.randint(0, 6561, (N,), generator=g).tolist()
    silent = list(off.silent_tokens)
    lm_stream = (tokens[:40] + [silent[0]] * 9 + tokens[40:90] + [silent[7], silent[8]] * 4 + tokens[90:N - 30]
                 + [silent[3]] * 3 + tokens[N - 30:])
    cond = (prompt_tokens, prompt_feat, emb)
    tol, worst = args.tolerance, 0.0
    # where the audio differences below come from: the two flows' mel (fp32 rounding of the DiT)
    lens = lambda t: torch.tensor([t.shape[1]], dtype=torch.int32)
    tok = torch.tensor([tokens], dtype=torch.int32)
    flow_kw = dict(token=tok, token_len=lens(tok), prompt_token=prompt_tokens, prompt_token_len=lens(prompt_tokens),
                   prompt_feat=prompt_feat, prompt_feat_len=lens(prompt_feat), embedding=emb, streaming=False,
                   finalize=True)
    with torch.inference_mode():
        mel_off, _ = off.flow.inference(**flow_kw)
        mel_ours, _ = ours.flow.inference(**flow_kw)
    row(label, f"flow mel official vs ours ({N} tokens, non-streaming)",
        f"max abs {maxabs(mel_ours, mel_off):.2e} (|mel| max {mel_off.abs().max().item():.2f})")

    for variant in VARIANTS[args.variants]:
        if variant != "hift as loaded":
            voice_f0_head(off.hift, ours.hift, prompt_feat.transpose(1, 2))
        lab = f"{label} | {variant}"
        for stream, speed in ((True, 1.0), (False, 1.0), (False, 1.5)):
            t0 = time.time()
            oc, calls, _ = official_tts(off, tokens, *cond, stream=stream, speed=speed)
            uc = ours_tts(ours, tokens, *cond, stream=stream, speed=speed)
            name = f"a. tts(stream={stream}, speed={speed}) llm_job posting {N} tokens ({time.time() - t0:.1f}s)"
            if stream:
                row(lab, "a. official token2wav calls (tokens, offset, stream, finalize)", str(calls))
                ref = np.concatenate(oc)
            worst = max(worst, compare(lab, name, oc, uc, tol))
        t0 = time.time()
        oc, calls, off_tokens = official_tts(off, None, *cond, stream=True, lm_stream=lm_stream)
        ours_kept = list(drop_long_silences(lm_stream, *ours_silent()))
        row(lab, f"b. tokens after the silent-token filter ({len(lm_stream)} drawn)",
            f"official {len(off_tokens)}, ours {len(ours_kept)}, equal {off_tokens == ours_kept}",
            ok=off_tokens == ours_kept)
        uc = ours_tts(ours, lm_stream, *cond, stream=True, silent=ours_silent())
        worst = max(worst, compare(lab, f"b. tts(stream=True) with the official llm_job ({time.time() - t0:.1f}s)",
                                   oc, uc, tol))

        # negative controls: small changes of ours must show up far above the agreement
        w = ours.flow.decoder.estimator.proj_out.weight   # the DiT's output projection
        bumped = with_bumped(w, 1.001, lambda: np.concatenate(ours_tts(ours, tokens, *cond, stream=True)))
        d_flow = maxabs(bumped, ref)
        # the F0 predictor: the tiny random network's output hardly moves with its other gains
        gain = dict(ours.hift.named_parameters())["f0_predictor.condnet.0.parametrizations.weight.original0"]
        bumped = with_bumped(gain, 1.001, lambda: np.concatenate(ours_tts(ours, tokens, *cond, stream=True)))
        d_hift = maxabs(bumped, ref)
        row(lab, "negative control: ours with a flow weight x1.001 / the F0 conv gain x1.001 (streaming)",
            f"max abs {d_flow:.2e} / {d_hift:.2e}", ok=min(d_flow, d_hift) > 10 * max(worst, 1e-9)
            or variant == "hift as loaded")
    row(label, "worst joined max abs difference", f"{worst:.2e} (tolerance {tol:g})", ok=worst <= tol)


def ours_silent():
    from light_tts.models.llm import CosyVoice3LM
    return CosyVoice3LM.SILENT_TOKENS, CosyVoice3LM.MAX_SILENT_RUN


def main():
    args = ARGS
    dirs = []
    if args.model_dir:
        dirs.append(("given", args.model_dir))
    if args.tiny:
        dirs.append(("tiny", ensure_dir(args.work_dir, "tiny")))
    if args.full:
        dirs.append(("full", ensure_dir(args.work_dir, "full")))
    for label, d in dirs:
        run(label, d, args)
    print("\n" + ("ALL OK" if not FAILED else "FAILED:\n  " + "\n  ".join(FAILED)))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
