"""What the checks against the official CosyVoice code share (check_against_official.py, check_cv3_*.py).

Each check runs as `python scripts/bench/<check>.py` (so this folder is on sys.path) with the official
code's venv; importing this module puts the official checkout ($OFFICIAL_COSYVOICE, default
/tmp/CosyVoice), Matcha-TTS ($MATCHA_TTS, default its third_party/Matcha-TTS submodule), this
repository and its tests/ (for tests/model_util.py) on sys.path. A check imports it after parsing its command line, so that --help answers
without the official venv.

  stub_torchaudio, stub_training_imports   import-only stand-ins for what the official modules import
                                           but never use for inference (the official venv lacks them)
  lm_args, official_lm_input, official_greedy
                                           the official LM (Qwen2LM or CosyVoice3LM) driven as a check
                                           needs it: its LM input, and its own decode loop with argmax
  maxabs, first_diff, verdict              comparison numbers and words for the printed rows
"""
import importlib.machinery
import logging
import os
import sys
import types

MAIN = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(MAIN, "tests")  # model_util: the configs and official records the tests share
OFFICIAL = os.environ.get("OFFICIAL_COSYVOICE", "/tmp/CosyVoice")
MATCHA = os.environ.get("MATCHA_TTS", os.path.join(OFFICIAL, "third_party", "Matcha-TTS"))
for _p in (TESTS, MATCHA, OFFICIAL, MAIN):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402


# ---------------------------------------------------------------- import-only stubs
def stub(name, **attrs):
    """sys.modules[name]: a new empty module (or the stub made before) given `attrs`."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # libraries probe find_spec()
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


def unused(*a, **k):
    raise RuntimeError("import-only stub called")


class UnusedModule(torch.nn.Module):
    """Stands for a torchaudio transform that the official yaml builds into training-only members
    (the HiFiGan discriminators' Spectrogram); never called."""

    def __init__(self, *a, **k):
        super().__init__()

    def forward(self, *a, **k):
        raise RuntimeError("stub torchaudio transform must not be used")


def stub_torchaudio(load=unused, fbank=unused, resample=UnusedModule):
    """torchaudio (the official venv has none for its torch): import-only by default; a check that
    runs the official frontend passes working stand-ins for load, kaldi.fbank and transforms.Resample."""
    import transformers  # noqa: F401  (first: it probes torchaudio's import spec)
    stub("torchaudio", load=load)
    stub("torchaudio.compliance")
    stub("torchaudio.compliance.kaldi", fbank=fbank)
    stub("torchaudio.transforms", Spectrogram=UnusedModule, MelSpectrogram=UnusedModule, Resample=resample)


def stub_matcha_utils():
    """matcha.utils without its __init__ (which imports hydra and lightning): its real submodules."""
    import matcha
    utils = stub("matcha.utils")
    utils.__path__ = [os.path.join(os.path.dirname(matcha.__file__), "utils")]
    stub("matcha.utils.pylogger", get_pylogger=logging.getLogger)


def stub_training_imports():
    """Everything the official cosyvoice package imports for training only (it pulls in the whole
    package through cosyvoice.utils.class_utils): torchaudio, whisper, pyarrow, pyworld, librosa,
    matplotlib, matcha.utils' __init__."""
    stub_torchaudio()
    stub("whisper", log_mel_spectrogram=unused)
    stub("whisper.tokenizer", Tokenizer=object)
    for name in ("pyarrow", "pyarrow.parquet", "pyworld"):
        stub(name)
    stub("librosa")
    stub("librosa.filters", mel=unused)
    stub("librosa.util", normalize=unused)
    stub("matplotlib", use=lambda *a, **k: None)
    stub("matplotlib.pylab")
    stub_matcha_utils()


# ---------------------------------------------------------------- the official LM
def lm_args(text, prompt_text, prompt_speech, **kw):
    """The official LM's `inference` kwargs for id lists (no speaker embedding)."""
    ids = lambda x: torch.tensor([x], dtype=torch.int32)  # noqa: E731
    n = lambda x: torch.tensor([len(x)], dtype=torch.int32)  # noqa: E731
    return dict(text=ids(text), text_len=n(text), prompt_text=ids(prompt_text), prompt_text_len=n(prompt_text),
                prompt_speech_token=ids(prompt_speech), prompt_speech_token_len=n(prompt_speech),
                embedding=torch.zeros(0, 192), **kw)


def official_lm_input(llm, text, prompt_text, prompt_speech):
    """The LM input the official `inference` builds (captured at its inference_wrapper)."""
    got = {}

    def capture(lm_input, sampling, min_len, max_len, uuid):
        got["x"] = lm_input
        return iter(())

    llm.inference_wrapper = capture
    try:
        list(llm.inference(**lm_args(text, prompt_text, prompt_speech)))
    finally:
        del llm.inference_wrapper
    return got["x"]


@torch.inference_mode()
def official_greedy(llm, lm_input, max_len, min_len, mask_all_stops=False):
    """The official inference_wrapper (non-vLLM) loop, argmax in place of the sampling call: id S
    masked for the first min_len steps (what the official sampling_ids masks), or every stop id."""
    cache, out = None, []
    for i in range(max_len):
        masks = torch.tril(torch.ones((1, lm_input.shape[1], lm_input.shape[1]))).to(torch.bool)
        y, cache = llm.llm.forward_one_step(lm_input, masks=masks, cache=cache)
        logp = llm.llm_decoder(y[:, -1]).log_softmax(dim=-1).squeeze(0)
        if mask_all_stops:
            logp[llm.speech_token_size:] = -float("inf")
        elif i < min_len:
            logp[llm.speech_token_size] = -float("inf")
        top = int(logp.argmax())
        if top in llm.stop_token_ids:
            break
        out.append(top)
        lm_input = llm.speech_embedding.weight[top].reshape(1, 1, -1)
    return out


# ---------------------------------------------------------------- comparisons
def maxabs(a, b):
    """max |a - b| over tensors, arrays or lists of the same shape (0 when empty), in float64."""
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).double()
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def first_diff(a, b):
    """The first index where two token lists differ (the shorter length if one is a prefix), or None."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def verdict(a, b):
    return "identical" if a == b else f"MISMATCH at {first_diff(a, b)}"
