"""Process lifecycle of the real server: names in ps, a dead stage fails fast, SIGTERM leaves
nothing behind, gunicorn shares one backend between workers."""
import concurrent.futures
import os
import signal
import sys
import time

import httpx
import pytest

from server_util import PROMPT_TEXT, PROMPT_WAV, Server, descendants, free_port

pytestmark = pytest.mark.server   # starts server processes: not in the fast tier

PROMPT = open(PROMPT_WAV, "rb").read()


def request(url, n=30, **extra):
    return httpx.post(url + "/inference_zero_shot", timeout=120,
                      data={"prompt_text": PROMPT_TEXT, "tts_text": "Lifecycle test sentence.",
                            "fixed_speech_tokens": str(n), **extra},
                      files={"prompt_wav": ("p.wav", PROMPT, "audio/wav")})


def max_batch(url) -> float:
    import re
    text = httpx.get(url + "/metrics").text
    return float(re.search(r"^lighttts_llm_max_batch_size (\S+)$", text, re.M).group(1))


def titles(pids):
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().split(b"\0")[0].decode()
        except OSError:
            pass
    return out


def test_dead_stage_fails_fast_and_sigterm_cleans_up(tiny_model_dir, tmp_path):
    srv = Server.api_server(tiny_model_dir, tmp_path).wait_healthy()
    try:
        names = titles(descendants(srv.proc.pid))
        # titles carry the instance's port: two servers on one machine stay apart in ps
        for stage in ("encode:0", "llm", "decode:0"):
            assert f"lighttts::{stage}@{srv.port}" in names.values(), names
        ipc_dirs = [d for d in os.listdir(tmp_path) if d.startswith("lighttts-")]
        assert len(ipc_dirs) == 1 and oct(os.stat(tmp_path / ipc_dirs[0]).st_mode & 0o777) == "0o700"
        assert request(srv.url).status_code == 200

        # a long streaming request in flight when the decode process is killed
        decode_pid = next(p for p, t in names.items() if t == f"lighttts::decode:0@{srv.port}")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(request, srv.url, 1500)
            time.sleep(1.0)
            os.kill(decode_pid, signal.SIGKILL)
            killed = time.time()
            r = inflight.result(timeout=30)
            assert r.status_code == 503 and "decode:0" in r.json()["detail"], r.text
            assert time.time() - killed < 3.0
        r = httpx.get(srv.url + "/healthz")
        assert r.status_code == 503 and "decode:0" in r.json()["detail"]
        t = time.time()
        r = request(srv.url)  # new requests fail fast too, never hang
        assert r.status_code == 503 and time.time() - t < 3.0
    finally:
        pids = descendants(srv.proc.pid)
        assert srv.stop() == 0, srv.tail()
    time.sleep(0.5)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}") and
                open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"], "processes left behind"
    assert not [d for d in os.listdir(tmp_path) if d.startswith("lighttts-") and not d.endswith(".lock")], \
        "IPC directory not removed"


def test_health_monitor_restarts_a_stage(tiny_model_dir, tmp_path):
    with Server.api_server(tiny_model_dir, tmp_path, "--health_monitor") as srv:
        names = titles(descendants(srv.proc.pid))
        llm = next(p for p, t in names.items() if t == f"lighttts::llm@{srv.port}")
        os.kill(llm, signal.SIGKILL)
        time.sleep(1.5)
        srv.wait_healthy(timeout=120)
        assert request(srv.url).status_code == 200


def test_four_http_workers_unique_routing(tiny_model_dir, tmp_path):
    with Server.api_server(tiny_model_dir, tmp_path, "--httpserver_workers", "4") as srv:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            # every reply must reach the worker that asked: different lengths tell requests apart
            lengths = [20 + 5 * i for i in range(8)]
            results = list(pool.map(lambda n: request(srv.url, n), lengths))
        for n, r in zip(lengths, results):
            assert r.status_code == 200, r.text
            assert len(r.content) == 44 + n * 960 * 2
        assert max_batch(srv.url) > 1, "the LLM never batched requests from different HTTP workers"


def test_gunicorn_four_workers_share_one_backend(tiny_model_dir, tmp_path):
    port = free_port()
    env_args = {"MODEL_DIR": tiny_model_dir, "PORT": str(port), "ZMQ_MODE": f"ipc://{tmp_path}/",
                "MAX_TOTAL_TOKEN_NUM": "8192", "MAX_REQ_TOTAL_LEN": "2048", "BATCH_MAX_TOKENS": "2048",
                "DATA_TYPE": "float32"}
    before = {p for p in os.listdir("/proc") if p.isdigit() and _title(p).startswith("lighttts::")}
    os.environ.update(env_args)
    try:
        srv = Server([sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "4",
                      "-b", f"127.0.0.1:{port}", "--timeout", "300", "wsgi_wrapper:app"],
                     port, str(tmp_path / "gunicorn.log"))
    finally:
        for k in env_args:
            os.environ.pop(k)
    try:
        srv.wait_healthy(timeout=240)
        lengths = [20 + 5 * i for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda n: request(srv.url, n), lengths))
        assert [len(r.content) for r in results] == [44 + n * 1920 for n in lengths]
        assert max_batch(srv.url) > 1, "the LLM never batched requests from different gunicorn workers"
        # this server's processes only (other servers may start meanwhile): the backend is a child of
        # a gunicorn worker (or of the master with --preload), the LLM a child of the backend
        new = [p for p in os.listdir("/proc") if p.isdigit() and p not in before]
        gunicorn = {str(srv.proc.pid)} | {p for p in new if _ppid(p) == str(srv.proc.pid)}
        backends = [p for p in new if _title(p) == f"lighttts::backend@{port}" and _ppid(p) in gunicorn]
        llms = [p for p in new if _title(p) == f"lighttts::llm@{port}" and _ppid(p) in backends]
        assert len(backends) == 1 and len(llms) == 1  # once for all workers, not once per worker
    finally:
        srv.stop()
    deadline = time.time() + 20
    while time.time() < deadline and any(_title(p) == f"lighttts::backend@{port}" for p in backends):
        time.sleep(0.3)
    assert not any(_title(p) == f"lighttts::backend@{port}" for p in backends), "backend outlived gunicorn"


def _title(pid) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode()
    except OSError:
        return ""


def _ppid(pid) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return ""


def test_the_readme_stop_recipe_stops_one_instance_only(tiny_model_dir, tmp_path):
    """Two servers on one machine: the README's stop command for one (its LLM stage's parent, found
    by the title that carries its port) ends that instance and leaves the other serving."""
    import subprocess
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Server.api_server(tiny_model_dir, tmp_path / "a")
    b = Server.api_server(tiny_model_dir, tmp_path / "b")
    try:
        a.wait_healthy()
        b.wait_healthy()
        subprocess.run(["bash", "-c", f"kill $(ps -o ppid= -p $(pgrep -fx 'lighttts::llm@{a.port}'))"], check=True)
        a.proc.wait(timeout=60)
        assert request(b.url).status_code == 200
        assert {t for t in titles(descendants(b.proc.pid)).values()} >= {f"lighttts::llm@{b.port}"}
    finally:
        a.stop()
        b.stop()
