"""Check: CosyVoice3's bounded causal vocoder at the official sizes (random weights, CPU, fp32).

Streams a mel through token2wav.CausalVocoder with the official schedule (context_frames=None:
all mel so far re-vocoded per chunk) and with bounded windows of several context lengths, and
prints the largest sample difference per context: the context the server uses
(CausalVocoder.CONTEXT_FRAMES) must give float-rounding differences only, and the shortest ones
show the network's real left receptive field.

    python scripts/bench/check_cv3_vocoder_window.py [--frames 160] [--contexts 8 16 24 32]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from light_tts.models.config import _kwargs, load_hyper_yaml  # noqa: E402
from light_tts.models.hift_causal import CausalHiFTGenerator  # noqa: E402
from light_tts.models.token2wav import CausalVocoder, StreamSchedule  # noqa: E402
from light_tts.tools.make_random_model import official_yaml_text  # noqa: E402


def official_hift() -> CausalHiFTGenerator:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cosyvoice3.yaml")
        with open(path, "w") as f:
            f.write(official_yaml_text("cosyvoice3"))
        hift_kwargs = _kwargs(load_hyper_yaml(path).get("hift"), "hift", "CausalHiFTGenerator")
    f0_kwargs = _kwargs(hift_kwargs.pop("f0_predictor"), "hift.f0_predictor", "CausalConvRNNF0Predictor")
    hift = CausalHiFTGenerator.build(hift_kwargs, f0_kwargs).eval()
    with torch.no_grad():   # random F0 heads leave every frame unvoiced: move them into a speech range
        head = hift.f0_predictor.classifier
        head.weight.mul_(300.0)
        head.bias.fill_(150.0)
    return hift


def stream(hift, mel: torch.Tensor, cuts, context) -> np.ndarray:
    vocoder = CausalVocoder(hift, mel.device, mel.dtype, StreamSchedule(), None, context_frames=context)
    out, prev = [], 0
    with torch.inference_mode():
        for i, cut in enumerate(cuts):
            out.append(vocoder(mel[:, :, prev:cut], finalize=i == len(cuts) - 1)[0].numpy())
            prev = cut
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--contexts", type=int, nargs="+", default=[8, 16, 24, CausalVocoder.CONTEXT_FRAMES])
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    hift = official_hift()
    mel = torch.randn(1, 80, args.frames, generator=torch.Generator().manual_seed(0))
    cuts = [60] + list(range(110, args.frames, 50)) + [args.frames]
    t0 = time.time()
    ref = stream(hift, mel, cuts, None)
    print(f"official schedule: {len(cuts)} chunks, {len(ref)} samples, peak {np.abs(ref).max():.4f}, "
          f"{time.time() - t0:.1f} s")
    worst = 0.0
    for context in args.contexts:
        t0 = time.time()
        diff = float(np.abs(stream(hift, mel, cuts, context) - ref).max())
        print(f"context {context:3d} frames: max |difference| {diff:.3g} ({time.time() - t0:.1f} s)")
        if context == CausalVocoder.CONTEXT_FRAMES:
            worst = diff
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
