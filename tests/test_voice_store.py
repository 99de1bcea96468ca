"""VoiceStore: registered voices on disk under hashed names, restored as they were saved, and safe
to share between processes and instances (--voice_dir): atomic replacement, a delete or a
replacement seen at the next lookup, check-then-write under one lock, owner tags and quotas."""
import multiprocessing
import os
import stat

import numpy as np
import pytest

from light_tts.frontend.voice_cache import Voice
from light_tts.server.encode.voice_store import VoiceDirError, VoiceStore, owner_of, prepare_dir
from light_tts.server.io_struct import RequestError

FIELDS = ("prompt_text_ids", "speech_tokens", "embedding", "prompt_feat")


def voice(seed, n=5):
    rng = np.random.default_rng(seed)
    return Voice(rng.integers(0, 100, 7).astype(np.int32), rng.integers(0, 100, n).astype(np.int32),
                 rng.standard_normal(192).astype(np.float32), rng.standard_normal((2 * n, 80)).astype(np.float32))


def same(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_save_load_delete(tmp_path):
    store = VoiceStore(str(tmp_path / "voices"))
    a, b = voice(0), voice(1)
    store.save("../../etc/passwd", a)        # the id is never a path
    store.save("bob", b)
    assert sorted(os.listdir(store.dir)) == sorted(os.path.basename(store.path(v)) for v in ("../../etc/passwd", "bob"))
    assert oct(os.stat(store.dir).st_mode & 0o777) == "0o700"
    assert all(os.stat(store.path(v)).st_mode & 0o077 == 0 for v in ("bob", "../../etc/passwd"))
    got = dict(VoiceStore(store.dir).load_all(10))
    assert set(got) == {"../../etc/passwd", "bob"}
    for name, v in (("../../etc/passwd", a), ("bob", b)):
        assert same(got[name], v)
    assert len(store.load_all(1)) == 1
    assert store.delete("bob") is True
    assert store.delete("bob") is False       # deleting twice is fine
    assert [n for n, _ in store.load_all(10)] == ["../../etc/passwd"]


def test_unreadable_file_is_skipped(tmp_path):
    store = VoiceStore(str(tmp_path))
    store.save("good", voice(2))
    with open(os.path.join(store.dir, "0" * 64 + ".npz"), "wb") as f:
        f.write(b"not a zip file")
    assert [n for n, _ in store.load_all(10)] == ["good"]


def test_voice_dir_created_private_and_refused_when_world_writable(tmp_path):
    d = tmp_path / "a" / "b"
    assert prepare_dir(str(d)) == str(d) and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o757)
    with pytest.raises(VoiceDirError, match=r"world-writable \(mode 0757\)"):
        VoiceStore(str(d))
    os.chmod(d, 0o770)                        # group-writable (a k8s fsGroup volume): accepted
    VoiceStore(str(d))
    (tmp_path / "f").write_text("")
    with pytest.raises(VoiceDirError, match="not a directory"):
        prepare_dir(str(tmp_path / "f"))


def test_another_process_sees_a_replacement_or_a_delete_at_the_next_lookup(tmp_path):
    writer, reader = VoiceStore(str(tmp_path)), VoiceStore(str(tmp_path))   # two instances on one directory
    assert reader.get("dave") is None
    writer.save("dave", voice(1))
    first = reader.get("dave")
    assert same(first.voice, voice(1))
    assert reader.get("dave", first) is first           # unchanged file: not read again
    writer.save("dave", voice(2, n=5))                  # same shapes, so the same size: the identity still differs
    second = reader.get("dave", first)
    assert second is not first and same(second.voice, voice(2))
    writer.delete("dave")
    assert reader.get("dave", second) is None


def _hammer(directory, seed, rounds):
    store = VoiceStore(directory)
    for i in range(rounds):
        store.save("dave", voice(seed * 1000 + i % 3))


def test_concurrent_writers_of_one_id_leave_one_whole_voice(tmp_path):
    """Two processes (two instances) replace one id 40 times each while this one reads it: every read
    is one of the written voices, whole; at the end one file, no temporary left."""
    written = [voice(s * 1000 + i) for s in (1, 2) for i in range(3)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), s, 40)) for s in (1, 2)]
    for p in procs:
        p.start()
    reader, reads = VoiceStore(str(tmp_path)), 0
    while any(p.is_alive() for p in procs):
        e = reader.get("dave")
        if e is not None:
            assert any(same(e.voice, w) for w in written)
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reads > 0
    assert os.listdir(tmp_path) == [os.path.basename(reader.path("dave"))]
    assert any(same(reader.get("dave").voice, w) for w in written)


def _register_many(directory, tag, n, max_voices, out):
    store = VoiceStore(directory)
    ok = 0
    for i in range(n):
        try:
            with store.lock():
                store.check_register(f"{tag}{i}", "", max_voices, 0)
                store.save(f"{tag}{i}", voice(i))
            ok += 1
        except RequestError as e:
            assert e.status == 507
    out.put(ok)


def test_the_lock_lets_no_two_instances_take_the_last_place(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_register_many, args=(str(tmp_path), tag, 12, 7, out)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert out.get() + out.get() == 7 and VoiceStore(str(tmp_path)).count() == 7


def test_limit_quota_and_ownership(tmp_path):
    store = VoiceStore(str(tmp_path))
    k1, k2 = owner_of("key-one"), owner_of("key-two")
    assert k1 != k2 and "key-one" not in k1
    for i in range(2):
        store.check_register(f"a{i}", k1, 5, 2)
        store.save(f"a{i}", voice(i), k1)
    with pytest.raises(RequestError) as e:               # k1 is at its quota ...
        store.check_register("a2", k1, 5, 2)
    assert e.value.status == 429 and "--voice_quota 2" in str(e.value)
    store.check_register("a1", k1, 5, 2)                # ... re-registering its own id is fine
    store.check_register("b0", k2, 5, 2)                # ... and k2 still registers
    store.save("b0", voice(5), k2)
    for vid, status in (("a0", 403),):                   # k2 cannot replace or delete k1's voice
        with pytest.raises(RequestError) as e:
            store.check_register(vid, k2, 5, 2)
        assert e.value.status == status
        with pytest.raises(RequestError) as e:
            store.check_delete(vid, k2)
        assert e.value.status == status
    store.check_delete("a0", k1)
    store.save("free", voice(9))                         # registered without a key: anyone's
    store.check_delete("free", k2)
    store.check_register("free", k2, 5, 2)
    store.save("c", voice(7), k2)                        # 5 stored: a new id is refused for everyone
    with pytest.raises(RequestError) as e:
        store.check_register("new", "", 5, 0)
    assert e.value.status == 507 and "--max_voices 5" in str(e.value)
    assert {(x.voice_id, x.owner) for x in store.entries()} == {("a0", k1), ("a1", k1), ("b0", k2), ("free", ""),
                                                                ("c", k2)}
