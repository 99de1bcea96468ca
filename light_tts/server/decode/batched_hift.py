"""One HiFT call for mels of different lengths.

HiFT's convolutions are not causal ("same" padding, kernels up to 11 with dilation 5, transposed
upsampling), so a row padded on the right would read its neighbours' padding near its end. Here
every convolution input is zeroed past the row's own length first, which is exactly the zero
padding the row gets alone (transposed convs: a zero input adds nothing). The parts that are not
convolutions are done per row where the length matters: the excitation (per-request generator,
so the NSF noise equals the per-request path), the source STFT's reflect padding (a gather of
each row's own samples), and the inverse STFT's window normalisation (overlap-add of each row's
own frames).

When every row has the same length nothing is padded and HiFT's own `decode` runs on the stack
(that is the common streaming case: equal hops).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_len(conv: nn.Module, n: torch.Tensor) -> torch.Tensor:
    (k,), (s,), (p,), (d,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if isinstance(conv, nn.ConvTranspose1d):
        return (n - 1) * s - 2 * p + d * (k - 1) + conv.output_padding[0] + 1
    return torch.div(n + 2 * p - d * (k - 1) - 1, s, rounding_mode="floor") + 1


def _mask(lengths: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(size, device=lengths.device) < lengths[:, None]).to(dtype)[:, None, :]


def _resblock(block: nn.Module, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ResBlock.forward with every conv input masked (Snake(0) = 0)."""
    for conv1, act1, conv2, act2 in zip(block.convs1, block.activations1, block.convs2, block.activations2):
        x = conv2(act2(conv1(act1(x) * m)) * m) + x
    return x


class BatchedHift:
    def __init__(self, hift: nn.Module):
        self.hift = hift
        # the network parts (no RNG, no per-row Python): what light_tts.server.decode.compile replaces
        self.decode_equal = hift.decode
        self.decode_masked = self._decode_masked

    @property
    def dtype(self) -> torch.dtype:
        return self.hift.m_source.l_linear.weight.dtype

    def f0(self, mel: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        pred = self.hift.f0_predictor
        if m is None:
            return pred(mel).float()
        h = mel
        for layer in pred.condnet:
            h = layer(h * m) if isinstance(layer, nn.Conv1d) else layer(h)
        return pred.classifier(h.transpose(1, 2)).squeeze(-1).abs().float()

    def _stft_rows(self, source: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """Per-row center=True reflect-padded STFT of a right-padded (B, L) source, frames past a
        row's own count zeroed: gather each row's reflect padding, then one center=False STFT."""
        h = self.hift
        half = h.n_fft // 2
        length = source.size(1)
        pos = torch.arange(-half, length + half, device=source.device)[None, :].expand(source.size(0), -1)
        last = (samples - 1)[:, None]
        idx = torch.where(pos < 0, -pos, torch.where(pos > last, 2 * last - pos, pos))
        idx = idx.clamp(0, length - 1)
        padded = torch.gather(source, 1, idx)
        spec = torch.stft(padded, h.n_fft, h.hop_len, h.n_fft, window=h._window_on(source.device),
                          center=False, return_complex=True)
        spec = torch.cat([spec.real, spec.imag], dim=1)
        frames = torch.div(samples, h.hop_len, rounding_mode="floor") + 1
        return spec * _mask(frames, spec.size(2), spec.dtype)

    def _istft_rows(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """HiFT's magnitude/phase -> inverse STFT (center=True) per row, by overlap-add in one go."""
        h = self.hift
        bins = h.n_fft // 2 + 1
        fm = _mask(frames, x.size(2), x.dtype)
        x = x * fm
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        window = h._window_on(x.device)
        seg = torch.fft.irfft(spec, n=h.n_fft, dim=1) * window[None, :, None] * fm   # (B, n_fft, F)
        n_frames = x.size(2)
        out_len = h.n_fft + h.hop_len * (n_frames - 1)
        fold = lambda t: F.fold(t, (1, out_len), (1, h.n_fft), stride=(1, h.hop_len))[:, 0, 0]
        wav = fold(seg)
        env = fold((window ** 2)[None, :, None] * fm)
        half = h.n_fft // 2
        wav = wav[:, half:out_len - half]
        env = env[:, half:out_len - half]
        return wav / torch.where(env > 1e-11, env, torch.ones_like(env))

    def _decode_masked(self, mel: torch.Tensor, source_spec: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """HiFTGenerator.decode over right-padded rows: mel (B, 80, T), source STFT, mel lengths (B,)."""
        h = self.hift
        dtype = self.dtype
        n = lengths
        m = _mask(n, mel.size(2), dtype)
        x = h.conv_pre(mel.to(dtype) * m)
        n = _conv_len(h.conv_pre, n)
        spec = source_spec.to(dtype)
        spec_len = torch.div(lengths * h.samples_per_frame, h.hop_len, rounding_mode="floor") + 1
        for i in range(h.num_upsamples):
            x = h.ups[i](F.leaky_relu(x, h.lrelu_slope) * _mask(n, x.size(2), dtype))
            n = _conv_len(h.ups[i], n)
            if i == h.num_upsamples - 1:
                x = F.pad(x, (1, 0), mode="reflect")
                n = n + 1
            m = _mask(n, x.size(2), dtype)
            down = h.source_downs[i]
            s = down(spec * _mask(spec_len, spec.size(2), dtype))
            x = x + _resblock(h.source_resblocks[i], s * m, m)
            blocks = h.resblocks[i * h.num_kernels:(i + 1) * h.num_kernels]
            x = x * m
            acc = _resblock(blocks[0], x, m)
            for block in blocks[1:]:
                acc = acc + _resblock(block, x, m)
            x = acc / h.num_kernels
        x = h.conv_post(F.leaky_relu(x) * m).float()
        wav = self._istft_rows(x, n)
        return wav.clamp(-h.audio_limit, h.audio_limit)

    @torch.inference_mode()
    def __call__(self, mels: Sequence[torch.Tensor], cache_sources: Sequence[torch.Tensor],
                 generators: Sequence[torch.Generator]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: mel (1, 80, T_i) -> (speech (1, T_i*480) fp32, source (1, 1, T_i*480) fp32),
        as hift.inference(mel, cache_source, generator) gives it."""
        h, dtype = self.hift, self.dtype
        frames = [m.size(2) for m in mels]
        t = max(frames)
        equal = all(f == t for f in frames)
        mel = torch.cat([F.pad(m.to(dtype), (0, t - m.size(2))) for m in mels], dim=0)
        lengths = torch.tensor(frames, device=mel.device)
        m = None if equal else _mask(lengths, t, dtype)
        f0 = self.f0(mel, m)
        scale = h.samples_per_frame
        source = torch.zeros(len(mels), 1, t * scale, device=mel.device)
        sources = []
        for i, (gen, cache) in enumerate(zip(generators, cache_sources)):
            s = h.m_source(f0[i:i + 1, :frames[i]], gen)
            if cache is not None and cache.shape[-1] != 0:
                s[:, :, :cache.shape[-1]] = cache.to(s)
            source[i, :, :s.size(2)] = s[0]
            sources.append(s)
        wav = self.network(mel, source, lengths, equal)
        return [(wav[i:i + 1, :frames[i] * scale], sources[i]) for i in range(len(mels))]

    def network(self, mel: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor, equal: bool) -> torch.Tensor:
        """The vocoder network after the excitation: mel (B, 80, T), source (B, 1, T * 480),
        lengths (B,) mel frames per row (all T when `equal`) -> (B, T * 480) audio; row i is valid
        up to lengths[i] * 480. cuda_graph.GraphHift replays it from CUDA graphs."""
        if equal:
            return self.decode_equal(mel, source)
        return self.masked(mel, source, lengths)

    def masked(self, mel: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """network() for right-padded rows: no host sync, so it can be captured at fixed shapes."""
        spec = self._stft_rows(source.squeeze(1), lengths * self.hift.samples_per_frame)
        return self.decode_masked(mel, spec, lengths)
