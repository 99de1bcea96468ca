"""HiFT vocoder of CosyVoice2: mel [B, 80, T] -> 24 kHz waveform [B, T * 480].

HiFTNet = neural source filter + iSTFTNet. A predicted F0 drives a harmonic
excitation (see `hift_source.py`); the mel is upsampled by transposed convolutions
(8 * 5 * 3 = 120x) while the excitation's STFT is injected at every resolution; the
network finally predicts an (n_fft/2 + 1)-bin magnitude/phase spectrogram at hop 4
that an inverse STFT turns into samples (120 * 4 = 480 samples per mel frame).

Keys of `state_dict()` equal the official `cosyvoice.hifigan.generator.HiFTGenerator`
built with the same kwargs (weight norm via `torch.nn.utils.parametrizations`, so
keys read `X.parametrizations.weight.original0/original1`). Use
`normalize_hift_state_dict` on a raw `hift.pt` before `load_state_dict`, and
`fold_weight_norm()` after loading for faster inference.

Precision: the convolutions run in the module dtype; the excitation, the STFT, the
exp/iSTFT and the output are fp32.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from light_tts.models.hift_source import ConvRNNF0Predictor, SourceModuleHnNSF


def _init_conv(module: nn.Module) -> None:
    # Training init of the official code (N(0, 0.01)); only matters before loading.
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        nn.init.normal_(module.weight, 0.0, 0.01)


def _wn(module: nn.Module) -> nn.Module:
    """Initialise, then weight-normalise (g/v split along dim 0, torch's default)."""
    _init_conv(module)
    return weight_norm(module)


class Snake(nn.Module):
    """x + sin^2(alpha * x) / alpha, alpha per channel (linear scale, starts at 1)."""

    _EPS = 1e-9  # keeps 1/alpha finite; same constant as the official activation

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + self._EPS)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Residual stack: per dilation d, x += conv_1(snake(conv_d(snake(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList()
        self.convs2 = nn.ModuleList()
        self.activations1 = nn.ModuleList()
        self.activations2 = nn.ModuleList()
        for d in dilations:
            d = int(d)
            self.convs1.append(_wn(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                             padding=d * (kernel_size - 1) // 2)))
            self.convs2.append(_wn(nn.Conv1d(channels, channels, kernel_size,
                                             padding=(kernel_size - 1) // 2)))
        for _ in dilations:
            self.activations1.append(Snake(channels))
        for _ in dilations:
            self.activations2.append(Snake(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, act1, conv2, act2 in zip(self.convs1, self.activations1, self.convs2, self.activations2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class HiFTGenerator(nn.Module):
    """CosyVoice2 HiFT generator. Keyword names follow the official yaml.

    The layer stack (its sizes, registration order and state-dict keys) is built here for the
    causal CosyVoice3 generator too (`hift_causal.CausalHiFTGenerator`): it overrides the layer
    factories `_source_module`, `_conv_pre`, `_upsample`, `_source_down`, `_conv_post` and
    `resblock`.
    """

    resblock = ResBlock
    f0_predictor_class = ConvRNNF0Predictor  # what `build` makes of the yaml's f0_predictor kwargs

    def __init__(
        self,
        f0_predictor: nn.Module,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 24000,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 5, 3),
        upsample_kernel_sizes: Sequence[int] = (16, 11, 7),
        istft_params: Optional[Dict[str, int]] = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes: Sequence[int] = (7, 7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        **_unused,  # training-only options are accepted and ignored
    ):
        super().__init__()
        istft_params = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        self.n_fft = int(istft_params["n_fft"])
        self.hop_len = int(istft_params["hop_len"])
        self.istft_params = {"n_fft": self.n_fft, "hop_len": self.hop_len}
        self.sampling_rate = int(sampling_rate)
        if self.sampling_rate == 22050:
            # The official code switches to the older `SineGen` (CosyVoice 1) at 22.05 kHz.
            raise ValueError(f"{type(self).__name__}: only the SineGen2 source (sampling_rate != 22050) "
                             f"is implemented")
        self.lrelu_slope = float(lrelu_slope)
        self.audio_limit = float(audio_limit)
        upsample_rates = [int(u) for u in upsample_rates]
        upsample_kernel_sizes = [int(k) for k in upsample_kernel_sizes]
        base_channels = int(base_channels)
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        # Source-STFT frames (hop_len samples each) per mel frame: every upsampling stage;
        # samples per mel frame: that times the iSTFT hop.
        self.stft_frames_per_frame = 1
        for u in upsample_rates:
            self.stft_frames_per_frame *= u
        self.samples_per_frame = self.stft_frames_per_frame * self.hop_len

        # Registration order matches the official module so state_dict() orders alike.
        self.m_source = self._source_module(
            sampling_rate=self.sampling_rate, upsample_scale=self.samples_per_frame,
            harmonic_num=int(nb_harmonics), sine_amp=float(nsf_alpha),
            add_noise_std=float(nsf_sigma), voiced_threshod=float(nsf_voiced_threshold))

        self.conv_pre = self._conv_pre(int(in_channels), base_channels)

        self.ups = nn.ModuleList(
            self._upsample(base_channels >> i, base_channels >> (i + 1), k, u)
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)))

        # Source branch: the source STFT (n_fft + 2 channels: real and imaginary
        # halves, hop_len resolution) is strided down to each stage's frame rate.
        # Stage i runs at (product of remaining upsample rates) times coarser than
        # the final resolution.
        spec_channels = self.n_fft + 2
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (k, d) in enumerate(zip(source_resblock_kernel_sizes, source_resblock_dilation_sizes)):
            stride = 1
            for u in upsample_rates[i + 1:]:
                stride *= u
            ch = base_channels >> (i + 1)
            if stride == 1:
                self.source_downs.append(nn.Conv1d(spec_channels, ch, 1))
            else:
                self.source_downs.append(self._source_down(spec_channels, ch, stride))
            self.source_resblocks.append(self.resblock(ch, int(k), d))

        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base_channels >> (i + 1)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(self.resblock(ch, int(k), d))

        self.conv_post = self._conv_post(base_channels >> self.num_upsamples, spec_channels)

        # Periodic Hann window (scipy get_window('hann', n, fftbins=True)), kept fp32
        # and outside the state dict / module dtype casts.
        self._window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float()
        self.f0_predictor = f0_predictor

    # ------------------------------------------------------------ layer factories
    def _source_module(self, **kwargs) -> nn.Module:
        return SourceModuleHnNSF(**kwargs)

    def _conv_pre(self, in_channels: int, out_channels: int) -> nn.Module:
        return _wn(nn.Conv1d(in_channels, out_channels, 7, padding=3))

    def _upsample(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> nn.Module:
        return _wn(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, rate, padding=(kernel_size - rate) // 2))

    def _source_down(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return nn.Conv1d(in_channels, out_channels, stride * 2, stride, padding=stride // 2)

    def _conv_post(self, in_channels: int, out_channels: int) -> nn.Module:
        return _wn(nn.Conv1d(in_channels, out_channels, 7, padding=3))

    # ------------------------------------------------------------------ helpers
    def _window_on(self, device: torch.device) -> torch.Tensor:
        if self._window.device != device:
            self._window = self._window.to(device)
        return self._window

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L] fp32 -> [B, n_fft + 2, L // hop + 1] (real bins then imaginary bins)."""
        spec = torch.stft(x, self.n_fft, self.hop_len, self.n_fft, window=self._window_on(x.device),
                          center=True, pad_mode="reflect", return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = magnitude.clamp(max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.hop_len, self.n_fft, window=self._window_on(magnitude.device),
                           center=True)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T] (module dtype) + source [B, 1, T*480] (fp32) -> waveform [B, T*480] fp32."""
        dtype = self.m_source.l_linear.weight.dtype  # the module dtype (a plain parameter)
        source_spec = self._stft(source.squeeze(1).float()).to(dtype)
        return self._decode_from(self.conv_pre(mel.to(dtype)), source_spec)

    def _decode_from(self, x: torch.Tensor, source_spec: torch.Tensor) -> torch.Tensor:
        """The stages after conv_pre: x [B, C, T] + source STFT -> clamped waveform fp32."""
        for i in range(self.num_upsamples):
            x = self.ups[i](F.leaky_relu(x, self.lrelu_slope))
            if i == self.num_upsamples - 1:
                # One sample of left reflection aligns with the STFT's L // hop + 1 frames.
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source_spec))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / self.num_kernels

        x = self.conv_post(F.leaky_relu(x)).float()  # default slope 0.01 here, as the official
        bins = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins])
        phase = torch.sin(x[:, bins:])  # the official feeds sin(.) as the phase angle; kept for parity
        wav = self._istft(magnitude, phase)
        return wav.clamp(-self.audio_limit, self.audio_limit)

    # ---------------------------------------------------------------- inference
    def forward(self, speech_feat: torch.Tensor, cache_source: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        f0 = self.f0_predictor(speech_feat.to(self.m_source.l_linear.weight.dtype)).float()  # [B, T]
        source = self.m_source(f0, generator)                                               # [B, 1, T*480]
        if cache_source is not None and cache_source.shape[-1] != 0:
            # Streaming: reuse the previous chunk's excitation over the overlapping
            # (re-vocoded) mel frames so the phase continues without a glitch.
            n = cache_source.shape[-1]
            source[:, :, :n] = cache_source.to(source)
        return self.decode(speech_feat, source), source

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor, cache_source: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """speech_feat [B, 80, T] -> (speech [B, T*480] fp32, source [B, 1, T*480] fp32).

        cache_source: the `source` returned for the previous chunk's tail (or None /
        empty); it overwrites the beginning of this call's excitation.
        generator: RNG for the excitation noise; None uses the global RNG (as the official).
        """
        return self.forward(speech_feat, cache_source, generator)

    def fold_weight_norm(self) -> "HiFTGenerator":
        """Bake every weight-norm parametrization into a plain `.weight` (same math).

        Call after loading the checkpoint; afterwards state_dict keys read `X.weight`.
        """
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self

    @classmethod
    def build(cls, hift_kwargs: dict, f0_kwargs: dict) -> "HiFTGenerator":
        """Build from the yaml's `hift` kwargs and its `f0_predictor` kwargs (numbers may be strings)."""
        kwargs = dict(hift_kwargs)
        kwargs.pop("f0_predictor", None)
        for key in ("nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope", "audio_limit"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        for key in ("in_channels", "base_channels", "nb_harmonics", "sampling_rate", "conv_pre_look_right"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        return cls(cls.f0_predictor_class(**dict(f0_kwargs)), **kwargs)

    @classmethod
    def from_config(cls, cfg) -> "HiFTGenerator":
        """Built from a family's light_tts.models.config.ModelConfig (its hift and f0_predictor)."""
        return cls.build(cfg.hift, cfg.f0_predictor)


def build_hift(hift_kwargs: dict, f0_kwargs: dict) -> HiFTGenerator:
    """Build from the yaml's `hift` kwargs and its `f0_predictor` kwargs."""
    return HiFTGenerator.build(hift_kwargs, f0_kwargs)


_LEGACY_SUFFIX = {".weight_g": ".parametrizations.weight.original0",
                  ".weight_v": ".parametrizations.weight.original1"}


def normalize_hift_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the key spellings found in official hift.pt files onto this module's keys.

    - `generator.` prefix (checkpoints saved from the HiFiGan training wrapper): stripped.
    - legacy `torch.nn.utils.weight_norm` keys `X.weight_g` / `X.weight_v`: renamed to
      the parametrization keys `X.parametrizations.weight.original0` / `original1`
      (same tensors: g is the per-output-channel norm, v the direction).
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("generator."):
            key = key[len("generator."):]
        for old, new in _LEGACY_SUFFIX.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


__all__ = ["HiFTGenerator", "ResBlock", "Snake", "ConvRNNF0Predictor", "SourceModuleHnNSF",
           "build_hift", "normalize_hift_state_dict"]
