"""Speech tokens -> 24 kHz audio for one request, plain PyTorch: the reference the batched decode
engine is checked against.

Streaming follows the official CosyVoice2 schedule: the first chunk waits for `token_hop_len`
tokens plus the padding that rounds the prompt up to a whole hop (so the flow encoder's 25-token
causal chunks line up with the prompt) plus `pre_lookahead_len` (3) lookahead tokens; later hops
grow by `stream_scale_factor` up to `token_max_hop_len`. Joins are seamless because HiFT keeps the
last `mel_cache_len` mel frames and their source excitation and the overlapping audio is
cross-faded with a Hamming window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StreamSchedule:
    token_hop_len: int = 25
    token_max_hop_len: int = 100
    stream_scale_factor: int = 2
    pre_lookahead_len: int = 3
    mel_cache_len: int = 8          # mel frames carried into the next HiFT call
    samples_per_frame: int = 480    # 24 kHz / 50 Hz

    @property
    def source_cache_len(self) -> int:
        return self.mel_cache_len * self.samples_per_frame

    def first_hop(self, prompt_tokens: int) -> int:
        pad = math.ceil(prompt_tokens / self.token_hop_len) * self.token_hop_len - prompt_tokens
        return self.token_hop_len + pad

    def hops(self, prompt_tokens: int):
        """Token counts of successive streaming chunks (infinite generator)."""
        yield self.first_hop(prompt_tokens)
        hop = self.token_hop_len
        while True:
            hop = min(self.token_max_hop_len, hop * self.stream_scale_factor)
            yield hop


def pcm16_bytes(audio: np.ndarray) -> bytes:
    """float [-1, 1] -> little-endian int16 bytes (the wire and WAV format)."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def fade_in_out(new: torch.Tensor, old: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade the start of `new` with the end of `old` (overlap = half the window)."""
    n = window.shape[0] // 2
    new = new.clone()
    new[..., :n] = new[..., :n] * window[:n] + old[..., -n:] * window[n:]
    return new


class Token2Wav:
    """Decode state of one request: prompt conditioning and the HiFT cache between chunks."""

    def __init__(self, flow, hift, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, schedule: StreamSchedule = StreamSchedule(),
                 seed: Optional[int] = None):
        p = next(flow.parameters())
        self.flow, self.hift, self.schedule = flow, hift, schedule
        self.device, self.dtype = p.device, p.dtype
        self.prompt_tokens = prompt_tokens.reshape(1, -1).to(self.device, torch.int32)
        self.prompt_feat = prompt_feat.reshape(1, -1, prompt_feat.shape[-1]).to(self.device, self.dtype)
        self.embedding = embedding.reshape(1, -1).to(self.device, self.dtype)
        self.window = torch.from_numpy(np.hamming(2 * schedule.source_cache_len)).float()
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(0 if seed is None else seed)
        self.cache: Optional[dict] = None

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, token_offset: int, finalize: bool, streaming: bool,
                 speed: float = 1.0) -> torch.Tensor:
        """Audio (float32 [1, samples], CPU) for tokens[token_offset:] given all tokens so far."""
        tokens = tokens.reshape(1, -1).to(self.device, torch.int32)
        lens = lambda t: torch.tensor([t.shape[1]], dtype=torch.int32, device=self.device)
        mel, _ = self.flow.inference(token=tokens, token_len=lens(tokens), prompt_token=self.prompt_tokens,
                                     prompt_token_len=lens(self.prompt_tokens), prompt_feat=self.prompt_feat,
                                     prompt_feat_len=lens(self.prompt_feat), embedding=self.embedding,
                                     streaming=streaming, finalize=finalize)
        mel = mel[:, :, token_offset * self.flow.token_mel_ratio:]
        s = self.schedule
        if self.cache is not None:
            mel = torch.cat([self.cache["mel"], mel.to(self.cache["mel"].dtype)], dim=2)
            cache_source = self.cache["source"]
        else:
            cache_source = torch.zeros(1, 1, 0, device=self.device)
        if finalize and speed != 1.0:
            if self.cache is not None:
                raise ValueError("speed other than 1.0 works only without streaming")
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        speech, source = self.hift.inference(speech_feat=mel.to(self.dtype), cache_source=cache_source,
                                             generator=self.generator)
        speech = speech.float().cpu()
        if self.cache is not None:
            speech = fade_in_out(speech, self.cache["speech"], self.window)
        if not finalize:
            self.cache = {"mel": mel[:, :, -s.mel_cache_len:], "source": source[:, :, -s.source_cache_len:],
                          "speech": speech[:, -s.source_cache_len:]}
            speech = speech[:, :-s.source_cache_len]
        return speech


def stream_chunks(token_iter, t2w: Token2Wav, stream: bool, speed: float = 1.0):
    """Consume speech tokens as they are produced; yield audio chunks (float32 [samples] numpy).

    Non-streaming yields once at the end. Streaming yields a chunk each time a whole hop plus the
    lookahead is available, then the remainder when the token stream ends."""
    tokens: list[int] = []
    if not stream:
        tokens.extend(token_iter)
        yield t2w(torch.tensor(tokens), 0, finalize=True, streaming=False, speed=speed)[0].numpy()
        return
    s = t2w.schedule
    hops = s.hops(t2w.prompt_tokens.shape[1])
    hop, offset = next(hops), 0
    for tok in token_iter:
        tokens.append(tok)
        if len(tokens) - offset >= hop + s.pre_lookahead_len:
            chunk = torch.tensor(tokens[:offset + hop + s.pre_lookahead_len])
            yield t2w(chunk, offset, finalize=False, streaming=True)[0].numpy()
            offset += hop
            hop = next(hops)
    # The official loop also drains whole hops that arrived with the last tokens before finalising.
    while len(tokens) - offset >= hop + s.pre_lookahead_len:
        yield t2w(torch.tensor(tokens[:offset + hop + s.pre_lookahead_len]), offset, finalize=False,
                  streaming=True)[0].numpy()
        offset += hop
        hop = next(hops)
    # As the official: the final chunk runs the flow without chunk masks (streaming=False).
    yield t2w(torch.tensor(tokens), offset, finalize=True, streaming=False)[0].numpy()
