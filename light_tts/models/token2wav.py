"""Speech tokens -> 24 kHz audio for one request, plain PyTorch: the reference the batched decode
engine is checked against. Both families (official CosyVoice2Model / CosyVoice3Model) share the
flow call and the streaming schedule; they differ only in the vocoder step, one small object per
family (`VOCODERS`), and CosyVoice3 drops long runs of silent tokens from the LM's stream
(`drop_long_silences`, applied by the caller between the LM and this module).

Streaming follows the official schedule (CosyVoice3Model inherits CosyVoice2Model.tts): the first
chunk waits for `token_hop_len` tokens plus the padding that rounds the prompt up to a whole hop
(so the flow's 25-token causal chunks line up with the prompt) plus `pre_lookahead_len` (3)
lookahead tokens; later hops grow by `stream_scale_factor` up to `token_max_hop_len`; the final
chunk runs the flow with finalize=True and without chunk masks. Each chunk's flow output holds the
frames of its new tokens only (the lookahead tokens' frames come with the next chunk).

The vocoder step:
  CosyVoice2 (CrossFadeVocoder): HiFT runs on the new frames plus the last `mel_cache_len` frames
      of the previous chunk, its excitation continued from the cached source; the overlapping
      audio is cross-faded with a Hamming window and each non-final chunk holds its tail back.
  CosyVoice3 (CausalVocoder): the official re-vocodes ALL mel so far on every chunk (finalize
      only on the last) and slices off the samples already sent: no cache, no cross-fade. Its
      output up to a chunk's end never changes when more mel is appended, so the streamed audio
      equals one causal HiFT pass over the whole mel (to float rounding). Ours decodes only a
      bounded window before the new samples, with the same samples (CausalVocoder says why).
Speed (mel stretched by linear interpolation before the vocoder) works only without streaming in
both families, as the official asserts.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F


def conditioning_digest(*tensors: torch.Tensor) -> bytes:
    """A digest of a voice's flow conditioning (prompt tokens, prompt features, speaker embedding):
    the key of the decode engine's prompt cache."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu()
        t = (t.long() if not t.is_floating_point() else t.float()).contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.digest()


@dataclass(frozen=True)
class StreamSchedule:
    token_hop_len: int = 25
    token_max_hop_len: int = 100
    stream_scale_factor: int = 2
    pre_lookahead_len: int = 3
    mel_cache_len: int = 8          # mel frames carried into the next HiFT call
    samples_per_frame: int = 480    # 24 kHz / 50 Hz
    # 0: the official first hop. n > 0 (and smaller than the official one): a first chunk of n
    # tokens, then the rest up to the official first boundary, then the official growth. Costs:
    # the early chunks end inside a 25-token encoder chunk (50-frame estimator chunk), so their
    # frames see fewer in-chunk frames than the official schedule gives them: audio that differs
    # from the official (not wrong), and one more flow + HiFT call per sentence.
    first_hop_len: int = 0

    def __post_init__(self):
        if self.first_hop_len and self.first_hop_len * 2 <= self.mel_cache_len:
            raise ValueError(f"first_hop_len {self.first_hop_len}: must be 0 or more than "
                             f"{self.mel_cache_len // 2} tokens (HiFT holds back {self.mel_cache_len} mel frames)")

    @property
    def source_cache_len(self) -> int:
        return self.mel_cache_len * self.samples_per_frame

    def first_hop(self, prompt_tokens: int) -> int:
        pad = math.ceil(prompt_tokens / self.token_hop_len) * self.token_hop_len - prompt_tokens
        return self.token_hop_len + pad

    def hops(self, prompt_tokens: int):
        """Token counts of successive streaming chunks (infinite generator)."""
        first = self.first_hop(prompt_tokens)
        if 0 < self.first_hop_len < first:
            yield self.first_hop_len
            yield first - self.first_hop_len
        else:
            yield first
        hop = self.token_hop_len
        while True:
            hop = min(self.token_max_hop_len, hop * self.stream_scale_factor)
            yield hop


def fade_in_out(new: torch.Tensor, old: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade the start of `new` with the end of `old` (overlap = half the window)."""
    n = window.shape[0] // 2
    new = new.clone()
    new[..., :n] = new[..., :n] * window[:n] + old[..., -n:] * window[n:]
    return new


class SilenceFilter:
    """The official CosyVoice3Model.llm_job filter on the LM's speech tokens, one token at a time:
    of each run of consecutive silent tokens (any mix of `silent_tokens`) the first `max_run` pass
    and the rest are dropped; any other token ends the run. The LM itself still sees every token it
    drew (the official filters after the LM); CosyVoice2 has no silent tokens: everything passes."""

    def __init__(self, silent_tokens: Collection[int], max_run: int = 5):
        self.silent = frozenset(int(t) for t in silent_tokens)
        self.max_run = int(max_run)
        self.run = 0

    def passes(self, token: int) -> bool:
        if token not in self.silent:
            self.run = 0
            return True
        self.run += 1
        return self.run <= self.max_run


def drop_long_silences(tokens: Iterable[int], silent_tokens: Collection[int], max_run: int = 5) -> Iterator[int]:
    """`tokens` through a SilenceFilter; lazy, so streaming is unchanged."""
    keep = SilenceFilter(silent_tokens, max_run)
    return (token for token in tokens if keep.passes(token))


class CrossFadeVocoder:
    """CosyVoice2's vocoder step (official CosyVoice2Model.token2wav) and its state for one
    sentence: HiFT on the new frames behind the previous chunk's last `mel_cache_len` frames, the
    excitation continued from the cached source, the overlap cross-faded."""

    def __init__(self, hift, device: torch.device, dtype: torch.dtype, schedule: StreamSchedule,
                 seed: Optional[int]):
        self.hift, self.device, self.dtype, self.schedule = hift, device, dtype, schedule
        self.window = torch.from_numpy(np.hamming(2 * schedule.source_cache_len)).float()
        # the NSF noise is drawn where the model runs: on a GPU a CPU generator would make and copy
        # ~1 MB of noise per chunk and request (the official draws from the device's global RNG)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0 if seed is None else seed)
        self.cache: Optional[dict] = None

    def __call__(self, mel: torch.Tensor, finalize: bool, speed: float = 1.0) -> torch.Tensor:
        mel, cache_source = self.hift_input(mel, finalize, speed)
        speech, source = self.hift.inference(speech_feat=mel.to(self.dtype), cache_source=cache_source,
                                             generator=self.generator)
        return self.hift_output(speech, source, mel, finalize)

    # The two halves around the network, shared with the batched engine (light_tts.server.decode.engine).

    def hift_input(self, mel: torch.Tensor, finalize: bool, speed: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """This chunk's new frames (1, 80, n) float32 -> (HiFT input mel float32 with the cached
        frames in front, cache_source (1, 1, n) for the excitation)."""
        if self.cache is not None:
            mel = torch.cat([self.cache["mel"], mel.to(self.cache["mel"].dtype)], dim=2)
            cache_source = self.cache["source"]
        else:
            cache_source = torch.zeros(1, 1, 0, device=self.device)
        if finalize and speed != 1.0:
            if self.cache is not None:
                raise ValueError("speed other than 1.0 works only without streaming")
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        return mel, cache_source

    def hift_output(self, speech: torch.Tensor, source: torch.Tensor, mel: torch.Tensor,
                    finalize: bool) -> torch.Tensor:
        """HiFT output (1, samples), its source (1, 1, samples) and input mel -> this chunk's audio
        (float32 [1, samples], CPU): cross-faded with the previous tail, own tail held back."""
        s = self.schedule
        speech = speech.float().cpu()
        if self.cache is not None:
            speech = fade_in_out(speech, self.cache["speech"], self.window)
        if not finalize:
            self.cache = {"mel": mel[:, :, -s.mel_cache_len:], "source": source[:, :, -s.source_cache_len:],
                          "speech": speech[:, -s.source_cache_len:]}
            speech = speech[:, :-s.source_cache_len]
        return speech


@dataclass
class VocoderWindow:
    """What one CosyVoice3 chunk hands the causal HiFT's decode stage: the vocoded mel from a few
    frames before the first new sample, the excitation over the same span, and how many leading
    samples of the result are context only."""
    mel: torch.Tensor       # (1, 80, frames) model dtype
    source: torch.Tensor    # (1, 1, frames * samples_per_frame) fp32
    finalize: bool
    skip: int               # samples at the start of the decode output that were already emitted
    end: Optional[int] = None   # samples of the decode output that count (None: all); the rest
    #                             come from zero frames padded on the right to a bucket length


class CausalVocoder:
    """CosyVoice3's vocoder step (official CosyVoice3Model.token2wav) and its state for one
    sentence. The official re-vocodes all mel so far on every chunk (finalize only on the last;
    finalize=False holds back the frames whose samples later mel could still change) and slices off
    the samples already emitted.

    Bounded (the default, `context_frames` = CONTEXT_FRAMES): the F0 predictor and the excitation
    still run over all mel so far (their cost is small, and the excitation's phase is a running sum
    over every frame), but the decode network, nearly all the cost, runs only from `context_frames`
    frames before the first new sample: every layer of it is causal or looks ahead, so a sample
    depends on at most LEFT_RECEPTIVE_FRAMES earlier frames and the window's left edge (zero conv
    padding, the STFT's reflect padding) changes only samples that are sliced off. The samples equal
    the official schedule's to float rounding (tests/test_synthesize_cv3.py); each chunk's decode
    cost is flat in the sentence's length. The lengths the networks see are rounded up to buckets
    (F0_BUCKET, WINDOW_BUCKET; zero frames on the right where no kept sample depends on them, more
    left context on a final window), so shapes repeat across chunks and requests: a conv shape
    seen before reuses its cuDNN plans (`warm_up` runs them at start), and several streams'
    windows share one decode call. `context_frames=None`: the official schedule exactly.

    The HiFT noise is a fixed table indexed by sample, so `seed` changes nothing here."""

    generator = None            # the causal HiFT takes no generator
    CONTEXT_FRAMES = 32         # > the decode network's left receptive field (~23 frames with the yaml)
    # Lengths the networks see are rounded up to these (bounded mode): a conv shape seen before
    # reuses its cuDNN plan (a new shape builds plans for every conv, on the request that brings
    # it), and windows of one length share a batched call (light_tts.server.decode.engine).
    F0_BUCKET = 64              # the F0 predictor's mel, zero frames padded on the right
    WINDOW_BUCKET = 32          # the decode network's window: padded on the right (not final) or
    #                             extended to the left (final)

    def __init__(self, hift, device: torch.device, dtype: torch.dtype, schedule: StreamSchedule,
                 seed: Optional[int], context_frames: Optional[int] = CONTEXT_FRAMES):
        self.hift, self.dtype = hift, dtype
        self.context_frames = context_frames
        self.mel: Optional[torch.Tensor] = None   # every frame so far (1, 80, frames) float32
        self.emitted = 0                           # samples already returned

    def __call__(self, mel: torch.Tensor, finalize: bool, speed: float = 1.0) -> torch.Tensor:
        window = self.window(mel, finalize, speed)
        return self.emit(self.hift.decode(window.mel, window.source, window.finalize), window)

    # The two halves around the decode network, shared with the batched engine, which decodes the
    # windows of several sentences in one call (light_tts.server.decode.engine).

    @torch.inference_mode()
    def window(self, mel: torch.Tensor, finalize: bool, speed: float = 1.0) -> VocoderWindow:
        """This chunk's new frames (1, 80, n) -> the decode network's input for them."""
        first = self.mel is None
        self.mel = mel if first else torch.cat([self.mel, mel.to(self.mel.dtype)], dim=2)
        mel = self.mel
        if speed != 1.0:
            if not (first and finalize):
                raise ValueError("speed other than 1.0 works only without streaming")
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        hift = self.hift
        frames = mel.shape[2]
        if not finalize and frames < hift.right_context:
            raise ValueError(f"finalize=False needs at least {hift.right_context} mel frames, got {frames}")
        mel = mel.to(self.dtype)
        bounded = self.context_frames is not None
        lookahead = hift.f0_predictor.lookahead
        # F0 at frame t reads mel frames up to t + lookahead only (zeros past the end when
        # finalizing), so zero frames after the last one change no F0 that is kept
        f0_in = _pad_frames(mel, self.F0_BUCKET) if bounded else mel
        f0 = hift.f0_predictor(f0_in.double(), finalize=finalize)[:, :frames if finalize else frames - lookahead]
        source = hift.m_source(f0.to(mel.dtype))                     # (1, 1, frames' * spf) fp32
        if not finalize:
            mel = mel[:, :, :frames - lookahead]
        spf = hift.samples_per_frame
        if not bounded:
            return VocoderWindow(mel, source, finalize, self.emitted)
        n = mel.shape[2]
        start = max(0, self.emitted // spf - self.context_frames)
        end = None
        if finalize:
            # a longer left context changes only samples that are sliced off (the argument above)
            if start > 0:
                start = max(0, n - _round_up(n - start, self.WINDOW_BUCKET))
            mel, source = mel[:, :, start:], source[:, :, start * spf:]
        else:
            # finalize=False keeps only samples that no later mel frame changes: zero frames padded
            # on the right change none of them; the output is cut back to the unpadded length
            mel, source = mel[:, :, start:], source[:, :, start * spf:]
            end = (mel.shape[2] - hift.conv_pre_look_right - 1) * spf
            mel = _pad_frames(mel, self.WINDOW_BUCKET)
            source = F.pad(source, (0, mel.shape[2] * spf - source.shape[2]))
        return VocoderWindow(mel, source, finalize, self.emitted - start * spf, end)

    @classmethod
    @torch.inference_mode()
    def warm_up(cls, hift, device: torch.device, dtype: torch.dtype, max_window: int = 288,
                max_f0: int = 1536) -> int:
        # 288: a 4 s hop's window (32 context + 200 new + 8 held-back frames) rounded up, and a bucket
        # more for a final window extended to the left; 1536 frames: sentences up to ~30 s
        """Run the causal HiFT's networks once at the bucket lengths bounded windows use (one row):
        the decode network at window lengths up to `max_window` frames, the F0 predictor over
        sentences up to `max_f0` frames, each finalizing or not, so a request does not pay for
        their first calls at these shapes. Returns the calls made."""
        calls = 0
        spf = hift.samples_per_frame
        for finalize in (False, True):
            for frames in range(cls.WINDOW_BUCKET, max_window + 1, cls.WINDOW_BUCKET):
                if frames > hift.right_context:
                    hift.decode(torch.zeros(1, 80, frames, device=device, dtype=dtype),
                                torch.zeros(1, 1, frames * spf, device=device), finalize)
                    calls += 1
            for frames in range(cls.F0_BUCKET, max_f0 + 1, cls.F0_BUCKET):
                hift.f0_predictor(torch.zeros(1, 80, frames, device=device, dtype=torch.float64), finalize=finalize)
                calls += 1
        return calls

    def emit(self, speech: torch.Tensor, window: VocoderWindow) -> torch.Tensor:
        """The decode output of `window` (1, samples) -> this chunk's new samples (float32 CPU)."""
        speech = speech[:, window.skip:window.end].float().cpu()
        self.emitted += speech.shape[1]
        return speech


def _round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def _pad_frames(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """(B, C, T) with zero frames after the last, to a multiple of `bucket` frames."""
    return F.pad(x, (0, _round_up(x.shape[2], bucket) - x.shape[2]))


# The vocoder step of each family (light_tts.models.pretrained.FAMILIES).
VOCODERS = {"cosyvoice2": CrossFadeVocoder, "cosyvoice3": CausalVocoder}


def vocoder_family(hift) -> str:
    """The family whose vocoder step drives this HiFT network."""
    from light_tts.models.hift_causal import CausalHiFTGenerator
    return "cosyvoice3" if isinstance(hift, CausalHiFTGenerator) else "cosyvoice2"


class Token2Wav:
    """Decode state of one request: prompt conditioning and the vocoder state between chunks.

    `family` ("cosyvoice2" / "cosyvoice3") picks the vocoder step (`VOCODERS`); None: the family of
    the `hift` network given."""

    def __init__(self, flow, hift, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, schedule: StreamSchedule = StreamSchedule(),
                 seed: Optional[int] = None, voice: Optional[bytes] = None, family: Optional[str] = None):
        p = next(flow.parameters())
        self.flow, self.hift, self.schedule = flow, hift, schedule
        self.device, self.dtype = p.device, p.dtype
        self.prompt_tokens = prompt_tokens.reshape(1, -1).to(self.device, torch.int32)
        self.prompt_feat = prompt_feat.reshape(1, -1, prompt_feat.shape[-1]).to(self.device, self.dtype)
        self.embedding = embedding.reshape(1, -1).to(self.device, self.dtype)
        self.family = vocoder_family(hift) if family is None else family
        if self.family not in VOCODERS:
            raise ValueError(f"unknown model family {self.family!r}; choose from {tuple(VOCODERS)}")
        self.vocoder = VOCODERS[self.family](hift, self.device, self.dtype, schedule, seed)
        if voice is not None:   # the caller hashed the voice already (the decode process: once per request)
            self.conditioning_key = voice

    @functools.cached_property
    def conditioning_key(self) -> bytes:
        """The voice's identity for the decode engine's prompt cache (light_tts/server/decode/prompt_cache.py);
        computed on first use, so a server without the cache never hashes prompts."""
        return conditioning_digest(self.prompt_tokens, self.prompt_feat, self.embedding)

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The NSF noise generator of this request's HiFT calls (None: the network's noise is fixed)."""
        return self.vocoder.generator

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
        return self.vocoder(self.new_frames(mel, token_offset), finalize, speed)

    def run(self, chunk: "Chunk") -> torch.Tensor:
        return self(chunk.tokens, chunk.offset, chunk.finalize, chunk.streaming, chunk.speed)

    def new_frames(self, mel: torch.Tensor, token_offset: int) -> torch.Tensor:
        """Flow output (1, 80, frames after the prompt) -> the frames of tokens[token_offset:]."""
        return mel[:, :, token_offset * self.flow.token_mel_ratio:]

    # CosyVoice2's halves around the vocoder network, for the batched engine (light_tts.server.decode.engine).

    def hift_input(self, mel: torch.Tensor, token_offset: int, finalize: bool,
                   speed: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow output (1, 80, frames after the prompt) float32 -> (HiFT input mel float32 with the
        cached frames in front, cache_source (1, 1, n) for the excitation)."""
        return self.vocoder.hift_input(self.new_frames(mel, token_offset), finalize, speed)

    def hift_output(self, speech: torch.Tensor, source: torch.Tensor, mel: torch.Tensor,
                    finalize: bool) -> torch.Tensor:
        """HiFT output, its source and input mel -> this chunk's audio (CrossFadeVocoder.hift_output)."""
        return self.vocoder.hift_output(speech, source, mel, finalize)


@dataclass(frozen=True)
class Chunk:
    """One flow + HiFT call of one sentence: audio for tokens[offset:] given `tokens` (all so far)."""
    tokens: torch.Tensor    # (T,) int64, CPU
    offset: int
    finalize: bool
    streaming: bool
    speed: float = 1.0


class StreamingDecoder:
    """The official streaming loop of one sentence, turned inside out so an event loop can drive it.

    Tokens arrive with `feed` (no model work); `ready` says whether a chunk can be computed and
    `step` computes exactly one. Streaming: a chunk is ready once a whole hop plus the lookahead
    has arrived, and only the prefix `tokens[:offset + hop + lookahead]` enters it, so the audio
    does not depend on how the tokens were split into messages. After `end`, whole hops that are
    still waiting are drained first, then the final chunk runs with finalize=True and
    streaming=False (as the official). Non-streaming: one chunk of everything, at `speed`, after
    `end`. `push` and `finish` run every chunk that became ready (the plain reference path).

    A sentence without tokens yields no audio (the flow cannot run on zero tokens).
    """

    def __init__(self, t2w: Token2Wav, stream: bool, speed: float = 1.0):
        if stream and speed != 1.0:
            raise ValueError("speed other than 1.0 works only without streaming")
        self.t2w, self.stream, self.speed = t2w, stream, speed
        self.tokens: list[int] = []
        self.offset = 0                 # tokens already turned into audio
        self._hops = t2w.schedule.hops(t2w.prompt_tokens.shape[1])
        self.hop = next(self._hops)     # tokens in the next streaming chunk
        self.ended = False              # no more tokens will come
        self.done = False               # the final chunk has been computed

    def feed(self, tokens) -> None:
        if self.ended:
            raise RuntimeError("tokens after the end of the sentence")
        self.tokens.extend(int(t) for t in tokens)

    def end(self) -> None:
        self.ended = True

    def _hop_ready(self) -> bool:
        return self.stream and len(self.tokens) - self.offset >= self.hop + self.t2w.schedule.pre_lookahead_len

    @property
    def ready(self) -> bool:
        """A chunk can be computed now."""
        return not self.done and (self.ended or self._hop_ready())

    def next_chunk(self) -> Optional[Chunk]:
        """Take the next chunk off the schedule (advancing it); None for a sentence without tokens.
        The caller computes it with `t2w.run` (or the batched engine) before the next call."""
        if self._hop_ready():
            end = self.offset + self.hop + self.t2w.schedule.pre_lookahead_len
            chunk = Chunk(torch.tensor(self.tokens[:end]), self.offset, finalize=False, streaming=True)
            self.offset += self.hop
            self.hop = next(self._hops)
            return chunk
        if not self.ended or self.done:
            raise RuntimeError("no chunk is ready")
        self.done = True
        if not self.tokens:
            return None
        # As the official: the final chunk runs the flow without chunk masks (streaming=False).
        speed = 1.0 if self.stream else self.speed
        return Chunk(torch.tensor(self.tokens), self.offset, finalize=True, streaming=False, speed=speed)

    def step(self) -> Optional[np.ndarray]:
        """Compute the next chunk: float32 [samples], or None for a sentence without tokens."""
        chunk = self.next_chunk()
        return None if chunk is None else self.t2w.run(chunk)[0].numpy()

    def _drain(self) -> list[np.ndarray]:
        out = []
        while self.ready:
            chunk = self.step()
            if chunk is not None:
                out.append(chunk)
        return out

    def push(self, tokens) -> list[np.ndarray]:
        """Add tokens; return the chunks that became ready."""
        self.feed(tokens)
        return self._drain()

    def finish(self) -> list[np.ndarray]:
        """End the sentence; return the remaining chunks (the last one finalised)."""
        self.end()
        return self._drain()


def stream_chunks(token_iter, t2w: Token2Wav, stream: bool, speed: float = 1.0):
    """Consume speech tokens as they are produced; yield audio chunks (float32 [samples] numpy).

    Non-streaming yields once at the end. Streaming yields a chunk each time a whole hop plus the
    lookahead is available, then the remainder when the token stream ends."""
    decoder = StreamingDecoder(t2w, stream, speed)
    for tok in token_iter:
        yield from decoder.push((tok,))
    yield from decoder.finish()
