"""VoiceStore: registered voices on disk under hashed names, restored as they were saved."""
import os

import numpy as np

from light_tts.frontend.voice_cache import Voice
from light_tts.server.encode.voice_store import VoiceStore


def voice(seed):
    rng = np.random.default_rng(seed)
    return Voice(rng.integers(0, 100, 7).astype(np.int32), rng.integers(0, 100, 5).astype(np.int32),
                 rng.standard_normal(192).astype(np.float32), rng.standard_normal((10, 80)).astype(np.float32))


def test_save_load_delete(tmp_path):
    store = VoiceStore(str(tmp_path))
    a, b = voice(0), voice(1)
    store.save("../../etc/passwd", a)        # the id is never a path
    store.save("bob", b)
    assert sorted(os.listdir(store.dir)) == sorted(os.path.basename(store.path(v)) for v in ("../../etc/passwd", "bob"))
    assert oct(os.stat(store.dir).st_mode & 0o777) == "0o700"
    got = dict(VoiceStore(str(tmp_path)).load_all(10))
    assert set(got) == {"../../etc/passwd", "bob"}
    for name, v in (("../../etc/passwd", a), ("bob", b)):
        for field in ("prompt_text_ids", "speech_tokens", "embedding", "prompt_feat"):
            np.testing.assert_array_equal(getattr(got[name], field), getattr(v, field))
    assert len(store.load_all(1)) == 1
    store.delete("bob")
    store.delete("bob")                       # deleting twice is fine
    assert [n for n, _ in store.load_all(10)] == ["../../etc/passwd"]


def test_unreadable_file_is_skipped(tmp_path):
    store = VoiceStore(str(tmp_path))
    store.save("good", voice(2))
    with open(os.path.join(store.dir, "0" * 64 + ".npz"), "wb") as f:
        f.write(b"not a zip file")
    assert [n for n, _ in store.load_all(10)] == ["good"]
