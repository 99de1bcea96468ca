"""Offline synthesis: the CLI writes 24 kHz mono PCM16; streaming follows the official schedule."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from light_tts.frontend.frontend import Frontend
from light_tts.models.cosyvoice2 import CosyVoice2Model
from light_tts.synthesize import main, synthesize_piece
from light_tts.models.token2wav import StreamSchedule, Token2Wav, stream_chunks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PROMPT_WAV = os.path.join(FIXTURES, "prompt_en.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model = CosyVoice2Model.from_pretrained(tiny_model_dir)
    fe = Frontend(tiny_model_dir)
    voice = fe.encode_voice(open(PROMPT_WAV, "rb").read(), PROMPT_TEXT)
    return model, fe, voice


def _t2w(model, voice, seed=0):
    return Token2Wav(model.flow, model.hift, torch.from_numpy(voice.speech_tokens), torch.from_numpy(voice.prompt_feat),
                     torch.from_numpy(voice.embedding), seed=seed)


def test_cli_writes_24k_mono_pcm16(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.wav"
    rc = main(["--model_dir", tiny_model_dir, "--prompt_wav", PROMPT_WAV, "--prompt_text", PROMPT_TEXT,
               "--tts_text", "Hello there, this is a test.", "--out", str(out), "--max_speech_tokens", "60"])
    assert rc == 0
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames == 60 * 2 * 480   # 60 speech tokens -> 120 mel frames -> 480 samples each
    assert "RTF" in capsys.readouterr().out


def test_cli_streaming_prints_chunks(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s.wav"
    rc = main(["--model_dir", tiny_model_dir, "--prompt_wav", PROMPT_WAV, "--prompt_text", PROMPT_TEXT,
               "--tts_text", "Hello there, this is a test.", "--out", str(out), "--stream", "--max_speech_tokens", "100"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("chunk ") >= 3
    assert sf.info(str(out)).frames == 100 * 2 * 480


def test_cli_errors_are_clear(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"garbage" * 100)
    assert main(["--model_dir", tiny_model_dir, "--prompt_wav", str(bad), "--prompt_text", "x",
                 "--tts_text", "hi", "--out", str(tmp_path / "o.wav")]) == 2
    assert "could not decode" in capsys.readouterr().err
    assert main(["--model_dir", str(tmp_path / "nope"), "--prompt_wav", PROMPT_WAV, "--prompt_text", "x",
                 "--tts_text", "hi", "--out", str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err   # the family is read from the directory (pretrained.load_model)
    assert "no model found (neither cosyvoice2.yaml nor cosyvoice3.yaml)" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["--model_dir", tiny_model_dir, "--prompt_wav", PROMPT_WAV, "--prompt_text", "x", "--tts_text", "hi",
              "--out", "o.wav", "--stream", "--speed", "1.5"])
    # refused before the model loads: an output directory that is not there, a GPU that is not there
    args = ["--model_dir", tiny_model_dir, "--prompt_wav", PROMPT_WAV, "--prompt_text", "x", "--tts_text", "hi"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "missing" / "o.wav")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            main(args + ["--out", str(tmp_path / "o.wav"), "--device", "cuda"])
        assert e.value.code == 2 and "sees no CUDA GPU" in capsys.readouterr().err


def test_stream_schedule_matches_the_official():
    s = StreamSchedule()
    hops = s.hops(prompt_tokens=82)
    # first hop rounds the prompt up to whole 25-token chunks: 82 -> 100, so 25 + 18
    assert [next(hops) for _ in range(5)] == [43, 50, 100, 100, 100]
    assert s.first_hop(100) == 25 and s.source_cache_len == 3840


def test_streaming_and_offline_differ_only_as_designed(setup):
    model, fe, voice = setup
    tokens = torch.randint(0, 6561, (160,), generator=torch.Generator().manual_seed(3)).tolist()
    offline = list(stream_chunks(iter(tokens), _t2w(model, voice), stream=False))
    streamed = list(stream_chunks(iter(tokens), _t2w(model, voice), stream=True))
    # same total length: every token becomes 2 mel frames = 960 samples in both modes
    assert len(offline) == 1 and sum(map(len, streamed)) == len(offline[0]) == 160 * 960
    # chunk sizes follow the schedule: hops 43, 50 (then the rest); each non-final chunk holds back
    # the HiFT cache (8 frames) that the next chunk cross-fades over
    sizes = [len(c) for c in streamed]
    assert sizes[0] == 43 * 960 - 3840 and sizes[1] == 50 * 960 and sizes[-1] == 160 * 960 - sum(sizes[:-1])
    # the two differ (chunk masks and cache joins are the official design) but not wildly: both are the
    # same model's rendering of the same tokens
    joined = np.concatenate(streamed)
    assert not np.array_equal(joined, offline[0])
    assert np.isfinite(joined).all() and np.abs(joined).max() <= 0.99 + 1e-6


def test_streaming_chunks_depend_only_on_tokens_so_far(setup):
    # causality: the first chunk needs hop + lookahead tokens and does not change when more come later
    model, fe, voice = setup
    tokens = torch.randint(0, 6561, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    short = list(stream_chunks(iter(tokens[:100]), _t2w(model, voice), stream=True))
    long = list(stream_chunks(iter(tokens), _t2w(model, voice), stream=True))
    assert np.array_equal(short[0], long[0])
    assert np.array_equal(short[1], long[1])


def test_same_seed_same_audio_and_modes(setup):
    model, fe, voice = setup
    ids = fe.tokenize("A short sentence to speak.")
    a = np.concatenate(list(synthesize_piece(model, voice, ids, seed=7, max_speech_tokens=40)))
    b = np.concatenate(list(synthesize_piece(model, voice, ids, seed=7, max_speech_tokens=40)))
    c = np.concatenate(list(synthesize_piece(model, voice, ids, seed=8, max_speech_tokens=40)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for mode, extra in (("cross_lingual", {}), ("instruct2", {"instruct_ids": fe.tokenize("Speak slowly.")})):
        audio = np.concatenate(list(synthesize_piece(model, voice, ids, mode=mode, seed=7, max_speech_tokens=40, **extra)))
        assert audio.shape == a.shape and not np.array_equal(audio, a)
    fast = np.concatenate(list(synthesize_piece(model, voice, ids, seed=7, max_speech_tokens=40, speed=2.0)))
    assert len(fast) == len(a) // 2
