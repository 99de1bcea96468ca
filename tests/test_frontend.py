"""The encode stage end to end on the tiny model: prompt audio -> Voice, text -> ids, voice cache."""
import io
import os
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from light_tts.frontend.audio import AudioError
from light_tts.frontend.features import kaldi_fbank, whisper_log_mel
from light_tts.frontend.frontend import Frontend, PromptLimits
from light_tts.frontend.voice_cache import Voice, VoiceCache, load_spk2info, save_spk2info, upload_key

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PROMPT = open(os.path.join(FIXTURES, "prompt_en.wav"), "rb").read()
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def frontend(tiny_model_dir):
    return Frontend(tiny_model_dir, cache_capacity=4)


def test_encode_voice_shapes_and_alignment(frontend):
    voice = frontend.encode_voice(PROMPT, PROMPT_TEXT, use_cache=False)
    seconds = sf.info(io.BytesIO(PROMPT)).duration
    # 25 Hz tokens from the 100 Hz whisper mel (ceil(T/4)), trimmed so feat frames = 2 x tokens
    assert abs(len(voice.speech_tokens) - seconds * 25) <= 2
    assert voice.prompt_feat.shape == (2 * len(voice.speech_tokens), 80)
    assert voice.embedding.shape == (192,) and np.isfinite(voice.embedding).all()
    assert voice.speech_tokens.dtype == np.int32 and (0 <= voice.speech_tokens).all() and (voice.speech_tokens < 6561).all()
    assert list(voice.prompt_text_ids) == frontend.tokenize(frontend.normalize(PROMPT_TEXT, split=False))


def test_features_reach_the_onnx_networks_unchanged(frontend):
    # the same features computed by hand and fed to the sessions give the same voice
    from light_tts.frontend.audio import load_audio
    audio16k = load_audio(PROMPT, 16000)
    mel = whisper_log_mel(audio16k).numpy()
    names = [i.name for i in frontend.speech_tokenizer.get_inputs()]
    assert names == ["feats", "feats_length"]
    tokens = frontend.speech_tokenizer.run(None, {"feats": mel, "feats_length": np.array([mel.shape[2]], np.int32)})[0]
    assert np.array_equal(np.asarray(tokens).reshape(-1), frontend.speech_tokens(audio16k))
    emb = frontend.campplus.run(None, {"input": kaldi_fbank(audio16k).numpy()[None]})[0].reshape(-1)
    assert np.allclose(emb, frontend.speaker_embedding(audio16k))


def test_mp3_prompt_encodes(frontend, tmp_path):
    wav, mp3 = tmp_path / "p.wav", tmp_path / "p.mp3"
    wav.write_bytes(PROMPT)
    subprocess.run(["lame", "--quiet", "-b", "64", str(wav), str(mp3)], check=True)
    voice = frontend.encode_voice(mp3.read_bytes(), PROMPT_TEXT, use_cache=False)
    assert len(voice.speech_tokens) > 50


def test_cache_hits_and_keys(frontend):
    frontend.cache = VoiceCache(4)
    a = frontend.encode_voice(PROMPT, PROMPT_TEXT)
    b = frontend.encode_voice(PROMPT, PROMPT_TEXT)
    assert a is b and frontend.cache.hits == 1 and frontend.cache.misses == 1
    c = frontend.encode_voice(PROMPT, "another transcript")  # same audio, other text: another key
    assert c is not a and len(frontend.cache) == 2


@pytest.mark.parametrize("data,limits,message", [
    (b"", PromptLimits(), "empty"),
    (b"not audio at all" * 10, PromptLimits(), "could not decode"),
    (PROMPT, PromptLimits(min_seconds=5.0), "too short"),
    (PROMPT, PromptLimits(max_seconds=2.0), "too long"),
])
def test_bad_prompts_are_rejected_with_a_reason(tiny_model_dir, data, limits, message):
    fe = Frontend(tiny_model_dir, limits=limits)
    with pytest.raises(AudioError, match=message):
        fe.encode_voice(data, PROMPT_TEXT)


def _voice(i):
    return Voice(np.array([i], np.int32), np.array([i, i], np.int32), np.full(192, i, np.float32),
                 np.full((4, 80), i, np.float32))


def test_voice_cache_is_lru_bounded():
    cache = VoiceCache(capacity=2)
    cache.put("a", _voice(1))
    cache.put("b", _voice(2))
    assert cache.get("a") is not None      # a is now most recent
    cache.put("c", _voice(3))              # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2
    cache.register("alice", _voice(4))     # registered voices are outside the LRU bound
    for k in "defg":
        cache.put(k, _voice(5))
    assert cache.voice("alice") is not None and cache.voice_ids() == ["alice"]
    assert cache.unregister("alice") and cache.voice("alice") is None and not cache.unregister("alice")
    assert upload_key(b"x", "t") != upload_key(b"x", "u") != upload_key(b"y", "t")


def test_spk2info_round_trip_in_the_official_shape(tmp_path, frontend, tiny_model_dir):
    voice = frontend.encode_voice(PROMPT, PROMPT_TEXT, use_cache=False)
    path = str(tmp_path / "spk2info.pt")
    save_spk2info(path, {"speaker1": voice})
    raw = torch.load(path, weights_only=True)
    entry = raw["speaker1"]  # the keys CosyVoice2.add_zero_shot_spk writes
    assert set(entry) == {"prompt_text", "prompt_text_len", "llm_prompt_speech_token", "llm_prompt_speech_token_len",
                          "flow_prompt_speech_token", "flow_prompt_speech_token_len", "prompt_speech_feat",
                          "prompt_speech_feat_len", "llm_embedding", "flow_embedding"}
    assert entry["prompt_speech_feat"].shape == (1, 2 * len(voice.speech_tokens), 80)
    back = load_spk2info(path)["speaker1"]
    for field in ("prompt_text_ids", "speech_tokens", "embedding", "prompt_feat"):
        assert np.array_equal(getattr(back, field), getattr(voice, field))
    # a model directory with spk2info.pt registers its voices at start
    import shutil
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    shutil.copy(path, d / "spk2info.pt")
    assert Frontend(str(d)).registered_voice("speaker1") is not None
