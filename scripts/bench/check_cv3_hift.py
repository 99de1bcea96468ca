"""Check: the official CosyVoice3 CausalHiFTGenerator vs light_tts.models.hift_causal, same weights.

Run with the official code's venv (torch, numpy, scipy) and a checkout of FunAudioLLM/CosyVoice:

    PYTHONPATH=/tmp/CosyVoice:/work/main /tmp/official-venv/bin/python scripts/bench/check_cv3_hift.py [--tiny] [--full]

Per size (tests/model_util.py's TINY_CAUSAL_HIFT_KW: base_channels 32, cond_channels 32, shorter
kernels; full: CAUSAL_HIFT_KW, the kwargs of cosyvoice3.yaml):
  1. build the official module as hyperpyyaml does (F0 predictor first, then the generator) right
     after torch.manual_seed(noise_seed): its constructor draws the causal source's noise table
     from the global RNG; ours draws the same stream from `noise_seed`;
  2. give it seeded random weights (Snake alphas, weight-norm gains and biases perturbed, the F0
     head set to a speech-like range), load its state dict into ours with strict=True;
  3. compare inference(mel, finalize=True/False), fp32 on CPU, noise seeds 0 and 1: max abs diff
     of the waveform and of the returned source;
  4. negative controls: ours with the other noise seed, and ours with one weight-norm gain x1.001.
Also prints the official parameter count (recorded in tests/test_hift_causal.py). Exits 1 if a
waveform differs by more than 1e-5. --print-keys prints the official tiny state-dict keys that
tests/test_hift_causal.py compares with (tests/fixtures/official_keys/cv3_hift_tiny.txt).

No stubs are needed: cosyvoice.hifigan.generator/f0_predictor import only torch, numpy, scipy and
cosyvoice.transformer.{convolution,activation}, cosyvoice.utils.common (none training-only).
"""
import argparse
import sys

import torch
import torch.nn.functional as F

import official_env  # noqa: E402,F401  (sys.path: this repository and its tests/)
from cosyvoice.hifigan.f0_predictor import CausalConvRNNF0Predictor as OffF0  # noqa: E402
from cosyvoice.hifigan.generator import CausalHiFTGenerator as OffHiFT  # noqa: E402

from light_tts.models.hift_causal import build_causal_hift  # noqa: E402
from model_util import CAUSAL_HIFT_KW, F0_KW, TINY_CAUSAL_HIFT_KW, TINY_F0_KW, key_shapes  # noqa: E402

WEIGHT_SEED = 1234


def build_official(kw, f0_kw, noise_seed, state=None):
    f0 = OffF0(**f0_kw)
    torch.manual_seed(noise_seed)
    model = OffHiFT(**kw, f0_predictor=f0)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def randomize(model, mel):
    g = torch.Generator().manual_seed(WEIGHT_SEED)

    def rnd(p, lo, hi):
        return torch.rand(p.shape, generator=g, dtype=p.dtype) * (hi - lo) + lo

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(rnd(p, 0.5, 1.5))
            elif name.endswith("original0"):          # weight-norm gain
                p.mul_(rnd(p, 0.5, 1.5))
            elif name.endswith("bias"):
                p.copy_(rnd(p, -0.05, 0.05))
        # F0 head: 0 Hz on the constant "silent" stretch of the mel (so those frames are
        # unvoiced), 250 Hz at the 95th percentile of the distance from it.
        head = model.f0_predictor.classifier
        head.bias.zero_()
        raw = head(model.f0_predictor.condnet(F.pad(mel, (0, 3))).transpose(1, 2)).flatten()
        silent = raw[silent_frames(mel.shape[-1])].median().item()
        scale = 250.0 / (raw - silent).abs().quantile(0.95).item()
        head.weight.mul_(scale)
        head.bias.fill_(-silent * scale)


def silent_frames(frames):
    return slice(frames * 3 // 10, frames * 3 // 10 + frames // 3)


def mel_input(frames, seed=7):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(1, 80, frames, generator=g) * 2 - 5
    mel[:, :, silent_frames(frames)] = -8.0  # a constant stretch, made unvoiced by randomize()
    return mel


def diff(a, b):
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"{(a - b).abs().max().item():.3e}"


def check(name, kw, f0_kw, frames, seeds):
    print(f"== {name}: base_channels {kw['base_channels']}, {frames} mel frames")
    torch.manual_seed(WEIGHT_SEED)
    proto = build_official(kw, f0_kw, noise_seed=0)
    mel = mel_input(frames)
    randomize(proto, mel)
    state = {k: v.clone() for k, v in proto.state_dict().items()}
    print(f"official parameters: {sum(p.numel() for p in proto.parameters())}, state-dict keys: {len(state)}")
    del proto
    worst = 0.0
    for seed in seeds:
        off = build_official(kw, f0_kw, seed, state)
        ours = build_causal_hift(dict(kw, noise_seed=seed), f0_kw).eval()
        ours.load_state_dict(state, strict=True)
        other = build_causal_hift(dict(kw, noise_seed=seed + 1), f0_kw).eval()
        other.load_state_dict(state, strict=True)
        bumped = build_causal_hift(dict(kw, noise_seed=seed), f0_kw).eval()
        bumped_state = dict(state)
        key = "conv_pre.parametrizations.weight.original0"  # a gain (scaling v would change nothing)
        bumped_state[key] = state[key] * 1.001
        bumped.load_state_dict(bumped_state, strict=True)
        for finalize in (True, False):
            ref_wav, ref_src = off.inference(speech_feat=mel, finalize=finalize)
            wav, src = ours.inference(mel, finalize=finalize)
            d_wav = (wav - ref_wav).abs().max().item() if wav.shape == ref_wav.shape else float("inf")
            worst = max(worst, d_wav)
            ow, _ = other.inference(mel, finalize=finalize)
            bw, _ = bumped.inference(mel, finalize=finalize)
            clamped = (ref_wav.abs() >= kw["audio_limit"]).float().mean().item()
            print(f"  noise_seed {seed} finalize={finalize!s:5}: samples {wav.shape[-1]:6d} "
                  f"(official {ref_wav.shape[-1]}), official |wav| max {ref_wav.abs().max().item():.3f} "
                  f"rms {ref_wav.pow(2).mean().sqrt().item():.4f} clamped {clamped:.3f}\n"
                  f"    max abs diff: wav {diff(wav, ref_wav)}, source {diff(src, ref_src)} | controls (wav): "
                  f"other noise seed {diff(ow, ref_wav)}, one gain x1.001 {diff(bw, ref_wav)}")
        with torch.inference_mode():  # the official converted its F0 predictor inside inference mode
            f0 = off.f0_predictor(mel.double()).float()
        voiced = (f0 > kw["nsf_voiced_threshold"]).float().mean().item()
        print(f"  official F0 {f0.min().item():.1f}..{f0.max().item():.1f} Hz, voiced frames {voiced:.2f}")
    print(f"== {name}: worst waveform max abs diff {worst:.3e}")
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--print-keys", action="store_true",
                    help="print the tiny official state-dict keys (tests/fixtures/official_keys/cv3_hift_tiny.txt)")
    args = ap.parse_args(argv)
    if args.print_keys:
        print("\n".join(key_shapes(build_official(TINY_CAUSAL_HIFT_KW, TINY_F0_KW, noise_seed=0).state_dict())))
        return 0
    if not (args.tiny or args.full):
        args.tiny = args.full = True
    torch.set_num_threads(args.threads)
    worst = 0.0
    if args.tiny:
        worst = max(worst, check("tiny", TINY_CAUSAL_HIFT_KW, TINY_F0_KW, args.frames, args.seeds))
    if args.full:
        worst = max(worst, check("full", CAUSAL_HIFT_KW, F0_KW, args.frames, args.seeds))
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
