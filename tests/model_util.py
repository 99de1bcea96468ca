"""What the network tests share with each other and with the checks against the official code
(scripts/bench/check_cv3_*.py import this module from tests/): the vocoder kwargs the official
records were made at, the recorded official state-dict keys, a random mel, a speech-like random HiFT,
the legacy hift.pt spelling."""
import os

import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# cosyvoice2.yaml's hift kwargs (HiFTGenerator) and its f0_predictor's; cosyvoice3.yaml's causal
# generator takes the same plus conv_pre_look_right.
HIFT_KW = {
    "in_channels": 80, "base_channels": 512, "nb_harmonics": 8, "sampling_rate": 24000,
    "nsf_alpha": 0.1, "nsf_sigma": 0.003, "nsf_voiced_threshold": 10,
    "upsample_rates": [8, 5, 3], "upsample_kernel_sizes": [16, 11, 7],
    "istft_params": {"n_fft": 16, "hop_len": 4},
    "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "source_resblock_kernel_sizes": [7, 7, 11], "source_resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "lrelu_slope": 0.1, "audio_limit": 0.99,
}
F0_KW = {"num_class": 1, "in_channels": 80, "cond_channels": 512}
CAUSAL_HIFT_KW = dict(HIFT_KW, conv_pre_look_right=4)

# Tiny: 32 channels. The causal one also has two resblock kernels per stage and short kernels; its
# structure (3 stages, strides 15/3/1, lookaheads 3 + 4) is the real one.
TINY_F0_KW = dict(F0_KW, cond_channels=32)
TINY_HIFT_KW = dict(HIFT_KW, base_channels=32)
TINY_CAUSAL_HIFT_KW = dict(CAUSAL_HIFT_KW, base_channels=32, resblock_kernel_sizes=[3, 5],
                           resblock_dilation_sizes=[[1, 3]] * 2, source_resblock_kernel_sizes=[5, 5, 3],
                           source_resblock_dilation_sizes=[[1, 3]] * 3)


def key_shapes(state_dict) -> list:
    """state_dict() as "key AxBxC" lines, in order: the format of the recorded official keys."""
    return [f"{k} {'x'.join(map(str, v.shape))}" for k, v in state_dict.items()]


def official_keys(name: str) -> list:
    """The state-dict keys of an official module, recorded once with the official code by the check
    script that prints them (fixtures/official_keys/<name>.txt, the key_shapes format)."""
    with open(os.path.join(FIXTURES, "official_keys", f"{name}.txt"), encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def random_mel(frames: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """[batch, 80, frames] around the log-mel range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, frames, generator=g) * 2 - 5


def speech_like_hift(model, f0_bias: float, f0_weight_scale: float = 1.0):
    """A freshly built HiFT made to exercise its sine path: the F0 head moved into a speech range
    (classifier weight scaled, bias set) and the Snake alphas spread over 0.5..1.5 (global RNG)."""
    with torch.no_grad():
        model.f0_predictor.classifier.weight.mul_(f0_weight_scale)
        model.f0_predictor.classifier.bias.fill_(f0_bias)
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
    return model


def legacy_hift_state_dict(sd: dict) -> dict:
    """A HiFT state dict as older official hift.pt files spell it: a `generator.` prefix and the
    torch.nn.utils.weight_norm names weight_g / weight_v."""
    legacy = {}
    for k, v in sd.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        legacy["generator." + k] = v.clone()
    return legacy
