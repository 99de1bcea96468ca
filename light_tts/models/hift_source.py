"""F0 predictor and neural-source-filter (NSF) excitation for the HiFT vocoder.

HiFT turns a mel spectrogram into a waveform in two steps; this module holds the
first one: predict a frame-level F0 contour from the mel, then synthesise a
sample-level harmonic excitation ("source") from it. The generator in `hift.py`
consumes the source through its STFT.

Parameter names follow the official CosyVoice2 checkpoint (`f0_predictor.condnet.*`,
`f0_predictor.classifier.*`, `m_source.l_linear.*`).

Randomness. The official source module draws three random tensors per call from the
global RNG, in this order:
  1. a uniform initial phase per harmonic, shape [B, H+1] (fundamental zeroed);
  2. additive Gaussian noise per sample and harmonic, a [B, L, H+1] tensor whose
     memory is laid out as [B, H+1, L] (the draw fills memory order, so the layout
     changes the values);
  3. Gaussian noise for the (unused at inference) noise branch, shape [B, L, 1].
We draw exactly the same tensors in the same order and layout, either from the
global RNG (`generator=None`) or from a caller-supplied `torch.Generator`, so that
`torch.Generator().manual_seed(s)` reproduces the official output after
`torch.manual_seed(s)` on CPU. Only draw 2 changes the output; draw 1 only touches
sample 0, which the frame-rate phase computation never reads, and draw 3 is
discarded. Both are still drawn to keep the random stream aligned across calls.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class ConvRNNF0Predictor(nn.Module):
    """Five weight-normed 3-tap convolutions (ELU after each) and a linear head.

    Input mel [B, in_channels, T] -> non-negative F0 in Hz [B, T].
    The ELUs sit at the odd indices of `condnet` so the convolution indices
    (0, 2, 4, 6, 8) match the official state-dict keys.
    """

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        num_class, in_channels, cond_channels = int(num_class), int(in_channels), int(cond_channels)
        self.num_class = num_class
        layers = []
        for i in range(5):
            conv = nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, kernel_size=3, padding=1)
            layers += [weight_norm(conv), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)          # [B, T, C]
        return self.classifier(h).squeeze(-1).abs()    # [B, T] (num_class == 1)


def _draw_uniform(shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _draw_normal_like_layout(memory_shape, perm, generator: Optional[torch.Generator],
                             device: torch.device) -> torch.Tensor:
    """Standard normal tensor allocated as `memory_shape`, returned permuted by `perm`.

    The CPU normal sampler fills memory in order with a path that depends on
    contiguity, so we reproduce the official tensor's exact memory layout.
    """
    dev = device if generator is None else generator.device
    out = torch.empty(memory_shape, device=dev).permute(*perm)
    out.normal_(generator=generator)
    return out.to(device)


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise excitation from F0 (CosyVoice2's `SineGen2` variant).

    forward(f0 [B, T] in Hz at frame rate) -> source [B, 1, T * upsample_scale], fp32.

    Per harmonic k = 1..H+1 the per-sample phase increment is (k * f0 / sr) mod 1.
    It is accumulated at frame rate (one increment per frame, scaled by the hop
    length) and linearly interpolated back to sample rate, which is what the official
    module does after decimating the sample-rate increments by linear interpolation.
    The decimation reads the middle of each hop, where the nearest-upsampled F0 is
    constant, so computing the increment directly per frame gives bit-identical values.
    Voiced samples (f0 > voiced_threshold) get sine_amp * sin(phase) plus small noise
    (std add_noise_std); unvoiced samples get noise only (std sine_amp / 3). A linear
    layer merges the H+1 harmonics, followed by tanh.
    """

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 0,
                 sine_amp: float = 0.1, add_noise_std: float = 0.003, voiced_threshod: float = 0):
        super().__init__()
        self.sampling_rate = int(sampling_rate)
        self.upsample_scale = int(upsample_scale)
        self.harmonic_num = int(harmonic_num)
        self.sine_amp = float(sine_amp)
        self.noise_std = float(add_noise_std)
        self.voiced_threshold = float(voiced_threshod)
        self.l_linear = nn.Linear(self.harmonic_num + 1, 1)

    # How the frame-rate phase reaches sample rate. "linear" is CosyVoice2's SineGen2;
    # the causal variant (hift_causal.py) uses "nearest", which never looks ahead.
    phase_upsample_mode = "linear"

    def _unit_noise(self, batch: int, dims: int, length: int, generator: Optional[torch.Generator],
                    device: torch.device) -> torch.Tensor:
        """Unit noise [B, L, H+1] that `noise_amp` scales: draws 1-3 of the module docstring.

        Draw 1 (initial phase) would be added to sample 0 only, which the frame-rate
        accumulation never reads; draw 3 feeds the official noise branch, unused for
        synthesis. Both are drawn to keep the random stream aligned; draw 2 is returned.
        """
        _draw_uniform((batch, dims), generator, device)
        noise = _draw_normal_like_layout((batch, dims, length), (0, 2, 1), generator, device)
        _draw_normal_like_layout((batch, length, 1), (0, 1, 2), generator, device)
        return noise

    def forward(self, f0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        f0 = f0.float()
        batch, frames = f0.shape
        dims = self.harmonic_num + 1
        scale = self.upsample_scale
        device = f0.device

        # Sample-rate F0 via nearest upsampling (same call as the official nn.Upsample).
        f0_samples = F.interpolate(f0[:, None], scale_factor=float(scale), mode="nearest")  # [B, 1, L]
        length = f0_samples.shape[-1]

        # Phase per frame: increments multiplied then divided exactly as the official
        # (f0 * k) / sr, wrapped to [0, 1), accumulated, then scaled to radians.
        harmonics = torch.arange(1, dims + 1, dtype=torch.float32, device=device)
        increments = (f0[:, :, None] * harmonics / self.sampling_rate) % 1          # [B, T, H+1]
        phase = torch.cumsum(increments, dim=1) * 2 * math.pi                       # [B, T, H+1]
        # One frame advances `scale` samples: scale the accumulated phase by the hop,
        # then bring it to sample rate (linear: align_corners=False).
        phase = F.interpolate(phase.transpose(1, 2) * scale, scale_factor=float(scale),
                              mode=self.phase_upsample_mode)
        sines = torch.sin(phase).transpose(1, 2) * self.sine_amp                    # [B, L, H+1] (memory [B, H+1, L])

        voiced = (f0_samples.transpose(1, 2) > self.voiced_threshold).float()       # [B, L, 1]
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        noise = noise_amp * self._unit_noise(batch, dims, length, generator, device)
        excitation = sines * voiced + noise                                         # [B, L, H+1]

        weight = self.l_linear.weight.float()
        bias = self.l_linear.bias.float()
        merged = torch.tanh(F.linear(excitation, weight, bias))                     # [B, L, 1]
        return merged.transpose(1, 2)                                               # [B, 1, L]
