"""The decode warm-up covers the HiFT lengths of a stream's first two chunks, official or with a short first
hop, for every prompt length (a final chunk's length depends on the sentence and is not covered)."""
import pytest

from light_tts.models.token2wav import StreamSchedule
from light_tts.server.decode.compile import WARM_HIFT_FRAMES, first_hop_hift_frames
from light_tts.server.decode.cuda_graph import HIFT_FRAME_BUCKET


def bucket(frames: int) -> int:
    return -(-frames // HIFT_FRAME_BUCKET) * HIFT_FRAME_BUCKET


@pytest.mark.parametrize("first_hop", [5, 10, 24, 30, 48])
def test_short_first_hop_lengths_are_warmed(first_hop):
    schedule = StreamSchedule(first_hop_len=first_hop)
    warmed = {bucket(t) for t in WARM_HIFT_FRAMES} | set(first_hop_hift_frames(first_hop))
    for prompt_tokens in range(1, 120):
        hops = schedule.hops(prompt_tokens)
        first, second = next(hops), next(hops)
        # the first chunk has no cached frames; later ones carry mel_cache_len frames in
        lengths = (2 * first, 2 * second + schedule.mel_cache_len)
        assert {bucket(n) for n in lengths} <= warmed, (prompt_tokens, lengths)


def test_official_schedule_adds_nothing():
    assert first_hop_hift_frames(0) == () and first_hop_hift_frames(49) == ()
    schedule = StreamSchedule()
    warmed = {bucket(t) for t in WARM_HIFT_FRAMES}
    for prompt_tokens in range(1, 120):
        hops = schedule.hops(prompt_tokens)
        assert bucket(2 * next(hops)) in warmed and bucket(2 * next(hops) + 8) in warmed
