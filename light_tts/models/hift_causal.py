"""Causal HiFT vocoder of CosyVoice3: mel [B, 80, T] -> 24 kHz waveform, streamable.

Same network as `hift.py` (neural source filter + iSTFTNet, 480 samples per mel
frame) made causal, as the official `cosyvoice.hifigan.generator.CausalHiFTGenerator`:

- every convolution pads on the left only, except two lookahead convolutions: the
  F0 predictor's first conv (kernel 4, reads mel frames t..t+3) and conv_pre
  (kernel conv_pre_look_right + 1, reads t..t+4 with the yaml's 4);
- the transposed upsampling convs become nearest upsampling + a left-causal conv, and
  the source STFT is strided down by left-padded convs;
- the F0 predictor runs in float64 (its parameters are kept fp64 whatever the module
  dtype: small F0 errors accumulate in the phase over a long utterance);
- the excitation phase is brought to sample rate by nearest (not linear) upsampling,
  and its noise is read from a fixed table, so a sample's excitation never depends on
  later frames or on the call (see "Noise" below).

Streaming (`inference(mel, finalize=False)`, as CosyVoice3Model.token2wav calls it on
the whole mel received so far, then drops the samples it already emitted): the last
3 frames feed only the F0 predictor's lookahead, the 4 before them only conv_pre's,
and one more frame is dropped because the iSTFT overlap (n_fft / 2 samples) and the
STFT reflect padding at the end are not final. Output: (T - 8) * 480 samples, each
equal (to fp32 rounding) to what any longer mel, or finalize=True on the complete
mel, gives there.
With finalize=True the lookaheads read zeros past the end and all T * 480 samples
come out. The true right receptive field is smaller: changing mel frame k changes
no sample before 480 * (k - conv_pre_look_right) - n_fft / 2.

Noise. The official causal source draws, when the module is built, from the global
RNG: torch.rand(1, 9) (an initial phase that only touches sample 0, never read) and
then a uniform [0, 1) table torch.rand(1, 300 * 24000, 9); sample n of every call
uses row n. We draw the same stream lazily from a private generator seeded with
`noise_seed`: equal to the official built right after torch.manual_seed(noise_seed)
(the F0 predictor is built before the generator, as hyperpyyaml does). The official
loader builds the LLM and flow first, so its production table is not reproducible
without it; any seed gives the same statistics. The official table ends at 300 s;
ours keeps growing.

Keys of `state_dict()` equal the official module built with the same kwargs (weight
norm via parametrizations; `normalize_hift_state_dict` maps legacy weight_g/weight_v
keys and the `generator.` prefix, as for CosyVoice2).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from light_tts.models.hift import HiFTGenerator, ResBlock, Snake, _wn, normalize_hift_state_dict
from light_tts.models.hift_source import ConvRNNF0Predictor, SourceModuleHnNSF


class CausalConv1d(nn.Conv1d):
    """Stride-1 conv with (kernel_size - 1) * dilation zeros on the left: output t reads inputs <= t.

    (The official computes its padding with a formula that equals this for every
    kernel/dilation it accepts.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class CausalUpsampleConv1d(CausalConv1d):
    """Nearest upsampling by `scale`, then a left-causal conv (official CausalConv1dUpsample)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, scale: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.scale = int(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=float(self.scale), mode="nearest"))


class CausalDownsampleConv1d(nn.Conv1d):
    """Kernel 2 * stride, stride `stride`, stride - 1 zeros on the left (official CausalConv1dDownSample).

    Output frame m reads input frames m*stride - stride + 1 .. m*stride + stride: the
    input is the hop-rate source STFT, which is final wherever it is kept.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 2 * stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


class CausalResBlock(ResBlock):
    """`hift.ResBlock` with left-causal convolutions; same keys, same forward."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        nn.Module.__init__(self)
        kernel_size = int(kernel_size)
        self.convs1 = nn.ModuleList(_wn(CausalConv1d(channels, channels, kernel_size, int(d))) for d in dilations)
        self.convs2 = nn.ModuleList(_wn(CausalConv1d(channels, channels, kernel_size)) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)


class CausalConvRNNF0Predictor(ConvRNNF0Predictor):
    """F0 from mel, reading `lookahead` future frames (official CausalConvRNNF0Predictor).

    forward(mel [B, C, T], finalize): finalize=True pads `lookahead` zero frames and
    returns [B, T]; finalize=False uses the last `lookahead` frames as lookahead only
    and returns [B, T - lookahead].
    """

    lookahead = 3  # the first conv has kernel 4, padded on the right only

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        nn.Module.__init__(self)
        num_class, in_channels, cond_channels = int(num_class), int(in_channels), int(cond_channels)
        self.num_class = num_class
        layers = [weight_norm(nn.Conv1d(in_channels, cond_channels, self.lookahead + 1)), nn.ELU()]
        for _ in range(4):
            layers += [weight_norm(CausalConv1d(cond_channels, cond_channels, 3)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        if finalize:
            mel = F.pad(mel, (0, self.lookahead))
        return super().forward(mel)


class _NoiseTable:
    """Rows of the official causal source's uniform noise table, drawn on demand.

    CPU uniform draws are serial, so drawing the table in pieces gives the same
    values as the official single torch.rand(1, N, dims) call.
    """

    _GROW_ROWS = 240000  # draw at least 10 s of rows at a time

    def __init__(self, dims: int, seed: int):
        self.dims = dims
        self._gen = torch.Generator().manual_seed(int(seed))
        torch.rand(1, dims, generator=self._gen)  # the official rand_ini: reaches sample 0 only, never read
        self._rows = torch.empty(0, dims)
        self._on_device: Optional[torch.Tensor] = None

    def rows(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, length, dims] fp32 on `device`."""
        have = self._rows.shape[0]
        if have < length:
            extra = torch.rand(max(length - have, self._GROW_ROWS), self.dims, generator=self._gen)
            self._rows = torch.cat([self._rows, extra])
            self._on_device = None
        if self._on_device is None or self._on_device.device != device:
            self._on_device = self._rows.to(device)
        return self._on_device[None, :length]


class CausalSourceModuleHnNSF(SourceModuleHnNSF):
    """The shared NSF source with the causal choices: nearest phase upsampling, fixed noise.

    `generator` is accepted and ignored: the noise is a function of the sample index.
    """

    phase_upsample_mode = "nearest"

    def __init__(self, *args, noise_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._noise = _NoiseTable(self.harmonic_num + 1, noise_seed)

    def _unit_noise(self, batch: int, dims: int, length: int, generator: Optional[torch.Generator],
                    device: torch.device) -> torch.Tensor:
        return self._noise.rows(length, device)  # [1, L, H+1]: the same noise for every batch row


class CausalHiFTGenerator(HiFTGenerator):
    """CosyVoice3 causal HiFT generator. Keyword names and defaults follow cosyvoice3.yaml.

    The layer stack is `HiFTGenerator`'s with the causal layers (the factories below); inherits
    the STFT/iSTFT, the stages after conv_pre (`_decode_from`) and `fold_weight_norm`;
    `inference` takes `finalize` instead of a source cache. The keyword arguments besides the
    two here are `HiFTGenerator`'s (same names and defaults).
    """

    resblock = CausalResBlock
    f0_predictor_class = CausalConvRNNF0Predictor

    def __init__(self, f0_predictor: nn.Module, *args, conv_pre_look_right: int = 4, noise_seed: int = 0,
                 **kwargs):
        # Read by the layer factories, which HiFTGenerator.__init__ calls.
        self.conv_pre_look_right = int(conv_pre_look_right)
        self.noise_seed = int(noise_seed)
        super().__init__(f0_predictor.double(), *args, **kwargs)

    def _source_module(self, **kwargs) -> nn.Module:
        return CausalSourceModuleHnNSF(**kwargs, noise_seed=self.noise_seed)

    def _conv_pre(self, in_channels: int, out_channels: int) -> nn.Module:
        # Lookahead conv: the caller pads (finalize) or passes real future frames.
        return _wn(nn.Conv1d(in_channels, out_channels, self.conv_pre_look_right + 1))

    def _upsample(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> nn.Module:
        return _wn(CausalUpsampleConv1d(in_channels, out_channels, kernel_size, rate))

    def _source_down(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return CausalDownsampleConv1d(in_channels, out_channels, stride)

    def _conv_post(self, in_channels: int, out_channels: int) -> nn.Module:
        return _wn(CausalConv1d(in_channels, out_channels, 7))

    def _apply(self, fn, recurse=True):
        # Invariant: the F0 predictor holds fp64 parameters whatever dtype the rest
        # is cast to (the official casts it to fp64 at every inference call).
        super()._apply(fn, recurse)
        self.f0_predictor.double()
        return self

    @property
    def right_context(self) -> int:
        """Mel frames that finalize=False consumes as lookahead only (8 with the yaml)."""
        return self.f0_predictor.lookahead + self.conv_pre_look_right + 1

    def decode(self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, 80, T] + source [B, 1, T*480] -> waveform fp32.

        finalize=True: conv_pre reads zeros past the end; [B, T*480].
        finalize=False: the last conv_pre_look_right frames are lookahead only, and the
        last remaining frame is dropped (its iSTFT overlap is not final);
        [B, (T - conv_pre_look_right - 1) * 480].
        """
        dtype = self.m_source.l_linear.weight.dtype
        source_spec = self._stft(source.squeeze(1).float()).to(dtype)
        x = mel.to(dtype)
        if finalize:
            x = F.pad(x, (0, self.conv_pre_look_right))
        else:
            keep = source_spec.shape[-1] - self.conv_pre_look_right * self.stft_frames_per_frame
            source_spec = source_spec[:, :, :keep]
        wav = self._decode_from(self.conv_pre(x), source_spec)
        if not finalize:
            wav = wav[:, :wav.shape[-1] - self.samples_per_frame]
        return wav

    def forward(self, speech_feat: torch.Tensor, finalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        frames = speech_feat.shape[-1]
        if not finalize and frames < self.right_context:
            raise ValueError(f"finalize=False needs at least {self.right_context} mel frames, got {frames}")
        f0 = self.f0_predictor(speech_feat.double(), finalize=finalize).to(speech_feat.dtype)
        source = self.m_source(f0)                                       # [B, 1, T' * 480], fp32
        mel = speech_feat if finalize else speech_feat[:, :, :frames - self.f0_predictor.lookahead]
        return self.decode(mel, source, finalize), source

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor, finalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """speech_feat [B, 80, T] -> (speech fp32, source [B, 1, T' * 480] fp32), as the official.

        finalize=True: speech [B, T*480], T' = T.
        finalize=False: speech [B, (T - right_context) * 480] (every sample final),
        T' = T - 3 (the F0 predictor's lookahead frames are not vocoded).
        """
        return self.forward(speech_feat, finalize)


def build_causal_hift(hift_kwargs: dict, f0_kwargs: dict) -> CausalHiFTGenerator:
    """Build from the yaml's `hift` kwargs and its `f0_predictor` kwargs (as `build_hift`)."""
    return CausalHiFTGenerator.build(hift_kwargs, f0_kwargs)


__all__ = ["CausalHiFTGenerator", "CausalConvRNNF0Predictor", "CausalSourceModuleHnNSF",
           "build_causal_hift", "normalize_hift_state_dict"]
