"""The official CosyVoice3LM vs light_tts's CosyVoice3LM on the same random weights.

Run with the official code's venv (torch, transformers==4.51.3, onnxruntime) and a checkout of
FunAudioLLM/CosyVoice on the path, from the repository root:

    PYTHONPATH=/path/to/CosyVoice:. /path/to/official-venv/bin/python scripts/bench/check_cv3_llm.py \
        [--full] [--steps 60] [--seeds 0 1 2]

Per size (tiny: a 2-layer Qwen2 of width 64 with the 151936-id text vocabulary, because the official
code asserts the hard-coded <|endofprompt|> id 151646 is in the text; --full adds the Qwen2-0.5B
sizes):
  official: a random Qwen2ForCausalLM saved with save_pretrained, then the official constructors
            unchanged: Qwen2Encoder(dir), CosyVoice3LM(llm_input_size, llm_output_size, 6561, encoder,
            ras_sampling(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)); every weight redrawn from a seed
  ours:     light_tts.models.llm.CosyVoice3LM at the same sizes, the official state dict loaded strictly
and compares, fp32 on CPU:
  1. the LM input embeddings of the official `inference` (captured at inference_wrapper) and ours
  2. greedy tokens: the official inference_wrapper loop with argmax for sampling (min_len masking
     as the official) vs ours (greedy=True); then the same with every stop id masked, `--steps` long
  3. seeded sampling: torch.manual_seed(s) + the official `inference` vs ours with seed=s
  4. bistream (seeded): official inference_bistream fed one text id at a time, as the official
     frontend's text generator yields them, vs ours fed 5-id chunks; with the random head, and again
     with its speech rows scaled x3 (fewer stop ids drawn in runs, so the final phase is reached)
  negative controls: our task id moved to the eos row (LM input and greedy must differ), and our
  sampling with seed s + 1000 (tokens must differ).
Import-only stubs (never used for math): torchaudio (scripts/bench/official_env.stub_torchaudio).
"""
import argparse
import functools
import logging
import sys
import tempfile
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also check at the Qwen2-0.5B sizes (~4 GB of RAM)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None  # --help answers without the official venv
import official_env  # noqa: E402  (sys.path: the official checkout, Matcha-TTS, this repository)
from official_env import first_diff, lm_args, official_greedy, official_lm_input, verdict  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
official_env.stub_torchaudio()

from cosyvoice.llm.llm import CosyVoice3LM as OffLM, Qwen2Encoder as OffEncoder  # noqa: E402
from cosyvoice.utils.common import ras_sampling  # noqa: E402

from light_tts.models.config import Qwen2Config  # noqa: E402
from light_tts.models.llm import CosyVoice3LM  # noqa: E402
from light_tts.models.loading import load_strict  # noqa: E402

torch.set_num_threads(2)
logging.getLogger().setLevel(logging.WARNING)  # the official bistream logs every step at INFO
S = 6561
EOP = 151646  # the official hard-coded <|endofprompt|> id
SAMPLING = dict(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
    "full": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
}
FAILURES = []


def row(label, check, result, ok=True):
    print(f"  [{label}] {check}: {result}", flush=True)
    if not ok:
        FAILURES.append(f"{label}: {check}")


def build_pair(sizes, seed=0):
    """The official module from its own constructors, every weight redrawn; ours loaded from it."""
    with tempfile.TemporaryDirectory() as d:
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes)).save_pretrained(d)
        off = OffLM(sizes["hidden_size"], sizes["hidden_size"], S, OffEncoder(d),
                    functools.partial(ras_sampling, **SAMPLING), length_normalized_loss=True, lsm_weight=0,
                    mix_ratio=[5, 15])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in off.named_parameters():  # every parameter away from its init (norms too)
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if name.endswith("bias") else 0.08))
    off.eval()
    ours = CosyVoice3LM(sizes["hidden_size"], sizes["hidden_size"], S, Qwen2Config(**{
        k: v for k, v in sizes.items() if k in Qwen2Config.__dataclass_fields__}), mix_ratio=[5, 15], sampling=SAMPLING)
    load_strict(ours, off.state_dict(), "<official CosyVoice3LM state dict>")
    return off, ours.eval()


def t32(ids):
    return torch.tensor([ids], dtype=torch.int32)


class _FinalPhase(logging.Handler):
    """Notes the official bistream's "no more text token" (its final phase has begun)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen = False

    def emit(self, record):
        self.seen |= "no more text token" in record.getMessage()


def check_bistream(label, off, ours, text, prompt_text, prompt_speech, cap, seeds, variant):
    root = logging.getLogger()
    for case, (pt, ps) in {"with prompt speech": (prompt_text, prompt_speech), "no prompt speech": (prompt_text, []),
                           "instruction only": ([EOP], [])}.items():
        for s in seeds:
            torch.manual_seed(s)
            a, note, final = [], "", _FinalPhase()
            args = lm_args([], pt, ps, sampling=25)
            args.pop("text_len")
            args["text"] = (t32([t]) for t in text)  # one id per item, as the official frontend's generator
            root.handlers, saved = [final], root.handlers
            root.setLevel(logging.INFO)
            try:
                for t in off.inference_bistream(**args):
                    a.append(int(t))
                    if len(a) >= cap:
                        break
            except ValueError as e:
                note = f"; official raised after {len(a)} tokens ({e})"
            finally:
                root.handlers = saved
                root.setLevel(logging.WARNING)
            b = []
            for t in ours.inference_bistream([text[i:i + 5] for i in range(0, len(text), 5)], pt, ps, seed=s):
                b.append(t)
                if len(b) >= len(a):
                    break
            ok = a == b[:len(a)]
            row(label, f"bistream {variant}, {case}, seed {s}", f"{verdict(a, b[:len(a)])} ({len(a)} tokens"
                f"{', into the final phase' if final.seen else ''}{note})", ok)


def check(label, sizes, steps, seeds):
    t0 = time.time()
    off, ours = build_pair(sizes)
    row(label, "official state dict -> ours, strict", f"OK ({len(off.state_dict())} keys; {time.time() - t0:.1f}s)")
    g = torch.Generator().manual_seed(7)
    text = torch.randint(0, 151643, (12,), generator=g).tolist()
    prompt_text = [EOP] + torch.randint(0, 151643, (9,), generator=g).tolist()
    prompt_speech = torch.randint(0, S, (31,), generator=g).tolist()

    # 1. LM input
    x_off = official_lm_input(off, text, prompt_text, prompt_speech)
    with torch.inference_mode():
        x_ours = ours.build_lm_input(text, prompt_text, prompt_speech)
    d = (x_off - x_ours).abs().max().item()
    row(label, f"LM input {tuple(x_ours.shape)} [sos, text, task, prompt speech]", f"max abs {d:.2e}", d == 0)

    # 2. greedy: official min/max length rules, then every stop masked for `steps` tokens
    min_r, max_r = 2.0, (steps + 0.5) / len(text)
    min_len, max_len = int(len(text) * min_r), int(len(text) * max_r)
    a = official_greedy(off, x_off, max_len, min_len)
    b = list(ours.inference(text, prompt_text, prompt_speech, greedy=True, min_token_text_ratio=min_r,
                            max_token_text_ratio=max_r))
    row(label, f"greedy, official stop rules (max {max_len})",
        f"{verdict(a, b)} ({len(b)} vs {len(a)} tokens, {len(set(b))} distinct)", a == b)
    a = official_greedy(off, x_off, steps, 0, mask_all_stops=True)
    b = list(ours.inference(text, prompt_text, prompt_speech, greedy=True, fixed_new_tokens=steps))
    row(label, f"greedy {steps} steps, stops masked", f"{verdict(a, b)} ({len(b)} tokens, {len(set(b))} distinct)",
        a == b and len(a) == steps)

    # 3. seeded sampling through the official inference (its RNG: the global one)
    for s in seeds:
        torch.manual_seed(s)
        a = [int(t) for t in off.inference(**lm_args(text, prompt_text, prompt_speech, sampling=25,
                                                       max_token_text_ratio=max_r, min_token_text_ratio=min_r))]
        b = list(ours.inference(text, prompt_text, prompt_speech, seed=s, min_token_text_ratio=min_r,
                                max_token_text_ratio=max_r))
        row(label, f"sampled seed {s}", f"{verdict(a, b)} ({len(b)} vs {len(a)} tokens)", a == b)

    # 4. bistream (seeded); the official raises where a run draws a stop id other than fill, which
    # random heads do often, so it runs twice: as drawn, and with the speech rows of the head scaled
    # x3 (both models alike) so that runs go on into the final phase
    for variant in ("random head", "speech rows x3"):
        if variant != "random head":
            with torch.no_grad():
                off.llm_decoder.weight[:S] *= 3
                ours.llm_decoder.weight[:S] *= 3
        check_bistream(label, off, ours, text, prompt_text, prompt_speech, 2 * steps, seeds, variant)
    with torch.no_grad():
        off.llm_decoder.weight[:S] /= 3
        ours.llm_decoder.weight[:S] /= 3

    # negative controls: the check must see a wrong special row and a wrong seed
    task = ours.task_id
    ours.task_id = ours.eos_token
    with torch.inference_mode():
        x_bad = ours.build_lm_input(text, prompt_text, prompt_speech)
        d = (official_lm_input(off, text, prompt_text, prompt_speech) - x_bad).abs().max().item()
    bad = list(ours.inference(text, prompt_text, prompt_speech, greedy=True, fixed_new_tokens=steps))
    ours.task_id = task
    good = official_greedy(off, x_off, steps, 0, mask_all_stops=True)
    row(label, "negative control: task id on the eos row", f"LM input max abs {d:.2e}, greedy "
        f"{'differs at %s' % first_diff(good, bad) if good != bad else 'IDENTICAL'}", d > 0 and good != bad)
    torch.manual_seed(seeds[0])
    a = [int(t) for t in off.inference(**lm_args(text, prompt_text, prompt_speech, sampling=25,
                                                   max_token_text_ratio=max_r, min_token_text_ratio=0))]
    b = list(ours.inference(text, prompt_text, prompt_speech, seed=seeds[0] + 1000, min_token_text_ratio=0,
                            max_token_text_ratio=max_r))
    row(label, f"negative control: seed {seeds[0] + 1000} vs {seeds[0]}",
        f"{'differs at %s' % first_diff(a, b) if a != b else 'IDENTICAL'}", a != b)


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    for label in ("tiny", "full") if ARGS.full else ("tiny",):
        check(label, SIZES[label], ARGS.steps, ARGS.seeds)
    print(f"{'FAILED: ' + '; '.join(FAILURES) if FAILURES else 'all checks passed'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
