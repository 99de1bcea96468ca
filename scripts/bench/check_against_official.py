"""End-to-end check: the official CosyVoice2 code vs light_tts on the SAME random model directory.

Run in a scratch venv that holds the official code's pins (torch, transformers==4.51.3, hyperpyyaml,
omegaconf, einops, diffusers==0.29.0, conformer==0.3.2, scipy, inflect, onnxruntime), with a checkout
of FunAudioLLM/CosyVoice (and Matcha-TTS in its third_party/) outside this repository:

    OFFICIAL_COSYVOICE=/path/to/CosyVoice [MATCHA_TTS=/path/to/Matcha-TTS] WORK_DIR=/tmp/official-check \
        /path/to/venv/bin/python scripts/bench/check_against_official.py [--tiny] [--full] [--lm-steps 60]

It writes the model dirs under WORK_DIR with our generator if missing (the main python, `python3`,
must have this package installed). Results of the last run: docs/verification.md.

Per directory (models/tiny, models/full written by `python3 -m light_tts.tools.make_random_model`):
  official: hyperpyyaml.load_hyperpyyaml(cosyvoice2.yaml, overrides={'qwen_pretrain_path': dir/CosyVoice-BlankEN})
            -> cosyvoice.cli.model.CosyVoice2Model(llm, flow, hift, fp16=False).load(llm.pt, flow.pt, hift.pt)
            (strict loads), configs['get_tokenizer'](), onnxruntime sessions as the official frontend makes them
  ours:     light_tts.models.cosyvoice2.CosyVoice2Model.from_pretrained(dir, dtype=fp32)
and compares, fp32 on CPU:
  a. LM greedy tokens (official forward_one_step + llm_decoder + argmax) and seeded sampled inference
  b. flow.inference: non-streaming finalize, streaming chunk, streaming finalize
  c. hift.inference with and without cache_source, same seed
  d. whole token2wav: the official tts() loop (stream and not; its llm_job replaced by one that
     posts a fixed token list) vs light_tts.models.token2wav.Token2Wav + stream_chunks.

Import-only stubs (never used for math; scripts/bench/official_env.py): torchaudio, whisper, pyarrow, pyworld,
librosa, matplotlib (the official yaml also builds training-only objects: the HiFiGan discriminators
construct torchaudio Spectrogram objects, given a dummy nn.Module here; they are never called),
matcha.utils/__init__ (hydra/lightning).
The official UpsampleConformerEncoder hard-codes 512 channels in PreLookaheadLayer and Upsample1D:
the tiny directory (64 channels) cannot load unchanged; it is retried with those two constructors
given the encoder width (construction only). The full directory is loaded with no shim.
"""
import argparse
import logging
import os
import subprocess
import time
import uuid as uuid_mod


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--lm-steps", type=int, default=60)
    ap.add_argument("--flow-tokens", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--lm-only", action="store_true", help="stop after the LM checks (unistream and bistream)")
    ap.add_argument("--no-direct", action="store_true", help="skip the directly-called official token2wav run")
    return ap.parse_args(argv)


# the command line first: --help answers without the official code's venv the imports below need
ARGS = parse_args() if __name__ == "__main__" else None
import official_env  # noqa: E402  (sys.path: the official checkout, Matcha-TTS, this repository)
from official_env import MAIN, lm_args, maxabs, official_greedy, official_lm_input, verdict  # noqa: E402

REFCHECK = os.environ.get("WORK_DIR", "/tmp/official-check")
os.makedirs(REFCHECK, exist_ok=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

official_env.stub_training_imports()

from hyperpyyaml import load_hyperpyyaml  # noqa: E402
import cosyvoice.transformer.upsample_encoder as off_ue  # noqa: E402
from cosyvoice.cli.model import CosyVoice2Model as OffModel  # noqa: E402

from light_tts.models.cosyvoice2 import CosyVoice2Model  # noqa: E402
from light_tts.frontend.tokenizer import CosyVoice2Tokenizer  # noqa: E402
from light_tts.frontend.features import whisper_log_mel, kaldi_fbank  # noqa: E402
from light_tts.models.token2wav import Token2Wav, StreamSchedule, stream_chunks  # noqa: E402

torch.set_num_threads(2)
logging.getLogger().setLevel(logging.WARNING)
import warnings  # noqa: E402
warnings.filterwarnings("ignore")

ROWS = []  # (model, check, result)


def row(label, check, result):
    ROWS.append((label, check, result))
    print(f"  [{label}] {check}: {result}", flush=True)


# ---------------------------------------------------------------- model dirs
def ensure_dir(size):
    d = os.path.join(REFCHECK, "models", size)
    if not os.path.isfile(os.path.join(d, "hift.pt")):
        print(f"writing {d} with light_tts.tools.make_random_model (main python)", flush=True)
        subprocess.run(["python3", "-m", "light_tts.tools.make_random_model", "--size", size, "--out", d],
                       cwd=MAIN, check=True)
    return d


# ---------------------------------------------------------------- official loading
class _EncoderWidthShim:
    """Tiny only: build PreLookaheadLayer / Upsample1D with the encoder width instead of 512."""

    def __init__(self, width):
        self.width = width

    def __enter__(self):
        self.orig = off_ue.PreLookaheadLayer, off_ue.Upsample1D
        pl, up, w = *self.orig, self.width
        off_ue.PreLookaheadLayer = lambda in_channels, channels, pre_lookahead_len: pl(w, w, pre_lookahead_len)
        off_ue.Upsample1D = lambda channels, out_channels, stride: up(w, w, stride)

    def __exit__(self, *exc):
        off_ue.PreLookaheadLayer, off_ue.Upsample1D = self.orig


def load_official(d, shim_width=None):
    """The official loading path, unchanged (CosyVoice2.__init__ minus the frontend)."""
    import contextlib
    ctx = _EncoderWidthShim(shim_width) if shim_width else contextlib.nullcontext()
    with ctx, open(os.path.join(d, "cosyvoice2.yaml")) as f:
        configs = load_hyperpyyaml(f, overrides={"qwen_pretrain_path": os.path.join(d, "CosyVoice-BlankEN")})
    model = OffModel(configs["llm"], configs["flow"], configs["hift"], fp16=False)
    model.load(os.path.join(d, "llm.pt"), os.path.join(d, "flow.pt"), os.path.join(d, "hift.pt"))
    return configs, model


def official_with_fallback(label, d, width):
    t0 = time.time()
    try:
        configs, model = load_official(d)
        row(label, "official load (yaml + CosyVoice2Model.load strict), no shim", f"OK ({time.time() - t0:.1f}s)")
        return configs, model, False
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        short = next((ln for ln in msg if "size mismatch" in ln), msg[0] if msg else repr(e))[:200]
        row(label, "official load, no shim", f"FAILS: {type(e).__name__}: {short.strip()}")
    configs, model = load_official(d, shim_width=width)
    row(label, f"official load with encoder-width shim ({width})", f"OK ({time.time() - t0:.1f}s)")
    return configs, model, True


# ---------------------------------------------------------------- tokenizer + onnx
TTS_TEXT = "Hello world, this is the end-to-end check of LightTTS against the official CosyVoice2 code."
PROMPT_TEXT = "收到好友从远方寄来的生日礼物。"


def check_tokenizer(label, d, configs):
    off_tok = configs["get_tokenizer"]()
    ours = CosyVoice2Tokenizer(os.path.join(d, "CosyVoice-BlankEN"))
    allowed = configs["allowed_special"]
    res = {}
    for name, text in (("tts", TTS_TEXT), ("prompt", PROMPT_TEXT)):
        a, b = off_tok.encode(text, allowed_special=allowed), ours.encode(text)
        res[name] = b
        row(label, f"tokenizer {name} text ({len(b)} ids)", "identical" if a == b else f"MISMATCH {a[:10]} vs {b[:10]}")
        assert a == b
    return res["tts"], res["prompt"]


def test_audio16k(seconds=3.0):
    g = np.random.default_rng(3)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 6))
    return (0.2 * x + 0.01 * g.standard_normal(t.shape)).astype(np.float32)


def check_onnx(label, d):
    import onnxruntime
    opt = onnxruntime.SessionOptions()  # as cosyvoice.cli.frontend.CosyVoiceFrontEnd builds them
    opt.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    opt.intra_op_num_threads = 1
    campplus = onnxruntime.InferenceSession(os.path.join(d, "campplus.onnx"), sess_options=opt,
                                            providers=["CPUExecutionProvider"])
    st = onnxruntime.InferenceSession(os.path.join(d, "speech_tokenizer_v2.onnx"), sess_options=opt,
                                      providers=["CPUExecutionProvider"])
    audio = test_audio16k()
    # features: ours (proved bit-identical to whisper.log_mel_spectrogram / kaldi.fbank in frontend_check)
    feat = whisper_log_mel(audio)
    tokens = st.run(None, {st.get_inputs()[0].name: feat.detach().cpu().numpy(),
                           st.get_inputs()[1].name: np.array([feat.shape[2]], dtype=np.int32)})[0].flatten().tolist()
    fb = kaldi_fbank(audio, subtract_mean=False)
    fb = fb - fb.mean(dim=0, keepdim=True)
    emb = campplus.run(None, {campplus.get_inputs()[0].name: fb.unsqueeze(dim=0).cpu().numpy()})[0].flatten().tolist()
    # ours: light_tts.frontend.Frontend in the main python (soundfile is not in the ref venv)
    npy = os.path.join(REFCHECK, f".e2e_audio_{label}.npy")
    np.save(npy, audio)
    code = ("import sys,json,numpy as np; from light_tts.frontend.frontend import Frontend; "
            f"fe=Frontend({d!r}); a=np.load({npy!r}); "
            "print(json.dumps([fe.speech_tokens(a).tolist(), fe.speaker_embedding(a).tolist()]))")
    import json
    out = subprocess.run(["python3", "-c", code], cwd=MAIN, capture_output=True, text=True, check=True).stdout
    our_tokens, our_emb = json.loads(out.strip().splitlines()[-1])
    os.remove(npy)
    row(label, f"speech_tokenizer_v2.onnx official call ({len(tokens)} tokens, range {min(tokens)}..{max(tokens)})",
        "identical to our Frontend.speech_tokens" if tokens == our_tokens else "MISMATCH")
    row(label, f"campplus.onnx official call ({len(emb)}-d)", f"max abs vs our Frontend.speaker_embedding "
        f"{maxabs(emb, our_emb):.2e}")


# ---------------------------------------------------------------- a. LM
def check_lm(label, off, ours, text, prompt_text, prompt_speech, steps, seeds):
    t0 = time.time()
    x_off = official_lm_input(off.llm, text, prompt_text, prompt_speech)
    with torch.inference_mode():
        x_ours = ours.llm.build_lm_input(text, prompt_text, prompt_speech)
    row(label, f"LM lm_input {tuple(x_ours.shape)}", f"max abs {maxabs(x_ours, x_off):.2e}")
    g_off = official_greedy(off.llm, x_off, steps, min_len=steps)  # eos masked every step
    g_ours = list(ours.llm.inference(text, prompt_text, prompt_speech, greedy=True,
                                     min_token_text_ratio=(steps + 0.5) / len(text), max_new_tokens=steps))
    row(label, f"LM greedy {steps} steps", f"{verdict(g_off, g_ours)} "
        f"({len(g_ours)} tokens; distinct {len(set(g_ours))}; {time.time() - t0:.1f}s)")
    # seeded sampling: max_len = int(len(text) * max_r) ~ steps
    max_r, min_r = (steps + 0.5) / len(text), 1.0
    for s in seeds:
        t0 = time.time()
        torch.manual_seed(s)
        s_off = [int(t) for t in off.llm.inference(**lm_args(text, prompt_text, prompt_speech, sampling=25,
                                                             max_token_text_ratio=max_r,
                                                             min_token_text_ratio=min_r))]
        s_ours = list(ours.llm.inference(text, prompt_text, prompt_speech, seed=s,
                                         min_token_text_ratio=min_r, max_token_text_ratio=max_r))
        row(label, f"LM sampled inference seed {s}", f"{verdict(s_off, s_ours)}"
            f" ({len(s_ours)} vs {len(s_off)} tokens; {time.time() - t0:.1f}s)")
    return g_ours


def check_bistream(label, off, ours, text, prompt_text, prompt_speech, steps, seeds):
    """Official inference_bistream (text as a generator of 5-token chunks) vs ours, first `steps` tokens."""
    def chunks():
        for i in range(0, len(text), 5):
            yield torch.tensor([text[i:i + 5]], dtype=torch.int32)
    for case, (pt, ps) in {"with prompt": (prompt_text, prompt_speech), "no prompt": ([], []),
                           "prompt text only": (prompt_text, [])}.items():
        for s in seeds:
            t0 = time.time()
            torch.manual_seed(s)
            a = lm_args([], pt, ps, sampling=25)
            a["text"] = chunks()
            a.pop("text_len")
            s_off = []
            try:
                for t in off.llm.inference_bistream(**a):
                    s_off.append(int(t))
                    if len(s_off) >= steps:
                        break
            except ValueError as e:  # the official raises on a drawn S + 1 in a run
                row(label, f"LM bistream {case} seed {s}", f"official stopped: {e}")
                continue
            s_ours = []
            for t in ours.llm.inference_bistream([text[i:i + 5] for i in range(0, len(text), 5)], pt, ps, seed=s):
                s_ours.append(t)
                if len(s_ours) >= steps:
                    break
            row(label, f"LM bistream {case} seed {s}", f"{verdict(s_off, s_ours)}"
                f" ({len(s_ours)} vs {len(s_off)} tokens; {time.time() - t0:.1f}s)")


# ---------------------------------------------------------------- b. flow, c. hift
def flow_args(tokens, prompt_tokens, prompt_feat, emb, streaming, finalize):
    n = lambda x: torch.tensor([x.shape[1]], dtype=torch.int32)  # noqa: E731
    return dict(token=tokens, token_len=n(tokens), prompt_token=prompt_tokens, prompt_token_len=n(prompt_tokens),
                prompt_feat=prompt_feat, prompt_feat_len=n(prompt_feat), embedding=emb,
                streaming=streaming, finalize=finalize)


def make_inputs(n_tokens, n_prompt, seed=11):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, n_tokens), generator=g, dtype=torch.int32)
    prompt_tokens = torch.randint(0, 6561, (1, n_prompt), generator=g, dtype=torch.int32)
    prompt_feat = torch.randn(1, 2 * n_prompt, 80, generator=g) * 2 - 6  # roughly log-mel scale
    emb = torch.randn(1, 192, generator=g)
    return tokens, prompt_tokens, prompt_feat, emb


def check_flow(label, off, ours, tokens, prompt_tokens, prompt_feat, emb):
    worst, mel_ref = 0.0, None
    cases = (("non-streaming finalize", tokens, False, True),
             ("streaming chunk (first 53 tokens, finalize=False)", tokens[:, :53], True, False),
             ("streaming finalize", tokens, True, True))
    for name, tok, streaming, finalize in cases:
        t0 = time.time()
        with torch.inference_mode():
            a, _ = off.flow.inference(**flow_args(tok, prompt_tokens, prompt_feat, emb, streaming, finalize))
            b, _ = ours.flow.inference(**flow_args(tok, prompt_tokens, prompt_feat, emb, streaming, finalize))
        d = maxabs(b, a)
        worst = max(worst, d)
        row(label, f"flow {name}: mel {tuple(a.shape)}", f"max abs {d:.2e} (|mel| max {a.abs().max():.2f}; "
            f"{time.time() - t0:.1f}s)")
        if mel_ref is None:
            mel_ref = a
    return worst, mel_ref


def check_hift(label, off, ours, mel, seeds=(0, 5)):
    worst = 0.0
    for s in seeds:
        torch.manual_seed(s)
        with torch.inference_mode():
            a, a_src = off.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0))
            b, b_src = ours.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0),
                                           generator=torch.Generator().manual_seed(s))
        d, ds = maxabs(b, a), maxabs(b_src, a_src)
        worst = max(worst, d)
        row(label, f"hift seed {s}: speech {tuple(a.shape)}", f"max abs {d:.2e}, source {ds:.2e} "
            f"(|speech| max {a.abs().max():.3f})")
        # second call with the tail of the first as cache_source (the streaming path)
        cache = a_src[:, :, -8 * 480:]
        mel2 = mel[:, :, -40:]
        torch.manual_seed(s + 100)
        with torch.inference_mode():
            a2, _ = off.hift.inference(speech_feat=mel2, cache_source=cache)
            b2, _ = ours.hift.inference(speech_feat=mel2, cache_source=cache,
                                        generator=torch.Generator().manual_seed(s + 100))
        d2 = maxabs(b2, a2)
        worst = max(worst, d2)
        row(label, f"hift seed {s + 100} with cache_source {tuple(cache.shape)}", f"max abs {d2:.2e}")
    return worst


# ---------------------------------------------------------------- d. whole token2wav
def official_tts_token2wav(off, tokens, prompt_tokens, prompt_feat, emb, stream, seed):
    """Run the official CosyVoice2Model.tts() loop itself; only its llm_job is replaced by one that
    posts the fixed token list (the LM is checked separately)."""
    calls = []

    def fixed_llm_job(text, prompt_text, llm_prompt_speech_token, llm_embedding, uuid):
        off.tts_speech_token_dict[uuid].extend(int(t) for t in tokens)
        off.llm_end_dict[uuid] = True

    def logged_token2wav(**kw):
        calls.append((kw["token"].shape[1], kw["token_offset"], kw.get("stream", False), kw["finalize"]))
        return OffModel.token2wav(off, **kw)

    off.llm_job, off.token2wav = fixed_llm_job, logged_token2wav
    off.token_hop_len = 25  # tts() mutates it across calls
    try:
        torch.manual_seed(seed)
        chunks = [o["tts_speech"][0].numpy() for o in off.tts(
            text=torch.zeros(1, 1, dtype=torch.int32), flow_embedding=emb, llm_embedding=emb,
            prompt_text=torch.zeros(1, 0, dtype=torch.int32), llm_prompt_speech_token=prompt_tokens,
            flow_prompt_speech_token=prompt_tokens, prompt_speech_feat=prompt_feat, stream=stream)]
    finally:
        del off.llm_job, off.token2wav
        off.token_hop_len = 25
    return chunks, calls


def official_direct_token2wav(off, tokens, prompt_tokens, prompt_feat, emb, seed):
    """The same streaming schedule written out: token2wav called directly (brief's recipe)."""
    uid = str(uuid_mod.uuid1())
    off.hift_cache_dict[uid] = None
    off.token_hop_len = 25
    torch.manual_seed(seed)
    tok = [int(t) for t in tokens]
    pad = int(np.ceil(prompt_tokens.shape[1] / off.token_hop_len) * off.token_hop_len - prompt_tokens.shape[1])
    offset, chunks = 0, []
    while True:
        hop = off.token_hop_len + pad if offset == 0 else off.token_hop_len
        if len(tok) - offset < hop + off.flow.pre_lookahead_len:
            break
        chunks.append(off.token2wav(token=torch.tensor([tok[:offset + hop + off.flow.pre_lookahead_len]]),
                                    prompt_token=prompt_tokens, prompt_feat=prompt_feat, embedding=emb,
                                    token_offset=offset, uuid=uid, stream=True, finalize=False)[0].numpy())
        offset += hop
        off.token_hop_len = min(off.token_max_hop_len, off.token_hop_len * off.stream_scale_factor)
    chunks.append(off.token2wav(token=torch.tensor([tok]), prompt_token=prompt_tokens, prompt_feat=prompt_feat,
                                embedding=emb, token_offset=offset, uuid=uid, finalize=True)[0].numpy())
    off.hift_cache_dict.pop(uid)
    off.token_hop_len = 25
    return chunks


def ours_token2wav(ours, tokens, prompt_tokens, prompt_feat, emb, stream, seed):
    t2w = Token2Wav(ours.flow, ours.hift, prompt_tokens, prompt_feat, emb,
                    StreamSchedule(pre_lookahead_len=ours.flow.pre_lookahead_len), seed=seed)
    return list(stream_chunks(iter(int(t) for t in tokens), t2w, stream=stream))


def compare_chunks(label, name, off_chunks, our_chunks):
    lens_off, lens_ours = [len(c) for c in off_chunks], [len(c) for c in our_chunks]
    ok = lens_off == lens_ours
    per = [maxabs(a, b) for a, b in zip(our_chunks, off_chunks)] if ok else []
    cat = maxabs(np.concatenate(our_chunks), np.concatenate(off_chunks)) if ok else float("nan")
    peak = float(np.abs(np.concatenate(off_chunks)).max())
    row(label, f"token2wav {name}: chunks {len(off_chunks)} vs ours {len(our_chunks)}, lengths {lens_off}"
        + ("" if ok else f" vs ours {lens_ours}"),
        f"per-chunk max abs {['%.2e' % x for x in per]}, concatenation {cat:.2e} (|audio| max {peak:.3f})")
    return max(per + [cat]) if ok else float("inf")


def check_token2wav(label, off, ours, tokens, prompt_tokens, prompt_feat, emb, seed=7, direct=True):
    worst = 0.0
    t0 = time.time()
    off_chunks, calls = official_tts_token2wav(off, tokens[0], prompt_tokens, prompt_feat, emb, True, seed)
    our_chunks = ours_token2wav(ours, tokens[0], prompt_tokens, prompt_feat, emb, True, seed)
    row(label, "official tts(stream=True) token2wav calls (tokens, offset, stream, finalize)", str(calls))
    worst = max(worst, compare_chunks(label, f"streaming via official tts() ({time.time() - t0:.1f}s)",
                                      off_chunks, our_chunks))
    if direct:
        d_chunks = official_direct_token2wav(off, tokens[0], prompt_tokens, prompt_feat, emb, seed)
        worst = max(worst, compare_chunks(label, "streaming, official token2wav called directly", d_chunks,
                                          our_chunks))
    t0 = time.time()
    off_chunks, calls = official_tts_token2wav(off, tokens[0], prompt_tokens, prompt_feat, emb, False, seed)
    our_chunks = ours_token2wav(ours, tokens[0], prompt_tokens, prompt_feat, emb, False, seed)
    worst = max(worst, compare_chunks(label, f"non-streaming via official tts() ({time.time() - t0:.1f}s)",
                                      off_chunks, our_chunks))
    return worst


# ---------------------------------------------------------------- negative controls
def negative_controls(label, off, ours, tokens, prompt_tokens, prompt_feat, emb, mel):
    """Zero differences above must come from two different implementations agreeing, not from
    comparing one object with itself: show the classes, and that small changes are detected."""
    kinds = {c: (type(getattr(off, c)).__module__, type(getattr(ours, c)).__module__) for c in ("llm", "flow", "hift")}
    assert all(a.startswith("cosyvoice.") and b.startswith("light_tts.") for a, b in kinds.values()), kinds
    row(label, "negative control: module classes (official, ours)", str(kinds))
    w = ours.flow.decoder.estimator.final_proj.weight
    with torch.inference_mode():
        a, _ = off.flow.inference(**flow_args(tokens, prompt_tokens, prompt_feat, emb, False, True))
        w.mul_(1.001)
        b, _ = ours.flow.inference(**flow_args(tokens, prompt_tokens, prompt_feat, emb, False, True))
        w.div_(1.001)
    row(label, "negative control: flow with final_proj.weight x1.001", f"max abs {maxabs(b, a):.2e} (must be > 0)")
    torch.manual_seed(0)
    with torch.inference_mode():
        a, _ = off.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0))
        b, _ = ours.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0),
                                   generator=torch.Generator().manual_seed(1))
    row(label, "negative control: hift seed 0 vs 1", f"max abs {maxabs(b, a):.2e} (must be > 0)")


# ---------------------------------------------------------------- driver
def check_weights(label, off, ours):
    bad = []
    for c in ("llm", "flow", "hift"):
        osd, usd = getattr(off, c).state_dict(), getattr(ours, c).state_dict()
        if set(osd) != set(usd):
            bad.append(f"{c}: key sets differ {sorted(set(osd) ^ set(usd))[:4]}")
            continue
        d = max(maxabs(usd[k], osd[k]) for k in osd if osd[k].is_floating_point())
        if d:
            bad.append(f"{c}: max abs {d:.2e}")
    n = {c: len(getattr(ours, c).state_dict()) for c in ("llm", "flow", "hift")}
    row(label, f"loaded weights official vs ours (keys {n})", "identical" if not bad else "; ".join(bad))


def run(size, lm_steps, flow_tokens, seeds, direct, bistream_only=False):
    label = size
    print(f"\n===== {size} =====", flush=True)
    d = ensure_dir(size)
    ours = CosyVoice2Model.from_pretrained(d, dtype=torch.float32)
    row(label, "ours CosyVoice2Model.from_pretrained(dir, fp32)", f"OK ({sum(ours.load_seconds.values()):.1f}s)")
    width = ours.config.encoder["output_size"]
    configs, off, shimmed = official_with_fallback(label, d, int(width))
    check_weights(label, off, ours)
    text, prompt_text = check_tokenizer(label, d, configs)
    check_onnx(label, d)
    g = torch.Generator().manual_seed(3)
    prompt_speech = torch.randint(0, 6561, (50,), generator=g).tolist()
    summary = {}
    summary["lm"] = check_lm(label, off, ours, text, prompt_text, prompt_speech, lm_steps, seeds)
    check_bistream(label, off, ours, text, prompt_text, prompt_speech, 3 * lm_steps, seeds)  # reaches the final phase
    if bistream_only:
        return summary
    tokens, prompt_tokens, prompt_feat, emb = make_inputs(flow_tokens, 37)
    summary["flow"], mel = check_flow(label, off, ours, tokens, prompt_tokens, prompt_feat, emb)
    summary["hift"] = check_hift(label, off, ours, mel)
    summary["token2wav"] = check_token2wav(label, off, ours, tokens, prompt_tokens, prompt_feat, emb, direct=direct)
    negative_controls(label, off, ours, tokens, prompt_tokens, prompt_feat, emb, mel)
    row(label, "WORST max abs", f"flow {summary['flow']:.2e}, hift {summary['hift']:.2e}, "
        f"token2wav {summary['token2wav']:.2e} (target <= 1e-3)" + (" [tiny: encoder-width shim]" if shimmed else ""))
    del off, ours, configs
    return summary


def main():
    a = ARGS if ARGS is not None else parse_args()
    sizes = [s for s, on in (("tiny", a.tiny), ("full", a.full)) if on] or ["tiny", "full"]
    t0 = time.time()
    for s in sizes:
        run(s, a.lm_steps, a.flow_tokens, a.seeds, not a.no_direct, a.lm_only)
    print(f"\n===== summary ({time.time() - t0:.0f}s) =====")
    for r in ROWS:
        print(" | ".join(r))


if __name__ == "__main__":
    main()
