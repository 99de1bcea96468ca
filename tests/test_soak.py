"""The soak script for real, briefly: a tiny model on the CPU, four clients, about a minute of mixed
streaming / non-streaming / abandoned / bad requests, then the leak checks (docs/reliability.md has
the recorded 10-minute runs)."""
import os
import subprocess
import sys

import pytest

from server_util import ROOT, server_env

pytestmark = pytest.mark.server   # starts server processes: not in the fast tier

SOAK = os.path.join(ROOT, "scripts", "soak.py")


def test_soak_refuses_other_hosts():
    for url in ("http://10.0.0.5:8080", "http://example.com:8080", "http://0.0.0.0:8080"):
        r = subprocess.run([sys.executable, SOAK, "--url", url], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "this machine only" in r.stderr, (url, r.stderr)


def test_soak_one_minute(tiny_model_dir):
    r = subprocess.run([sys.executable, SOAK, "--model_dir", tiny_model_dir, "--minutes", "0.75", "--concurrency", "4",
                        "--max_tokens", "60", "--settle", "15"],
                       capture_output=True, text=True, timeout=300, env=server_env(), cwd=ROOT)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0 and "SOAK PASSED" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    # every kind of traffic actually ran
    for kind in ("stream", "nonstream", "abort", "bad"):
        assert any(line.startswith(kind + " ") for line in r.stdout.splitlines()), r.stdout
    assert "lighttts_llm_kv_used=[0.0]" in r.stdout


def test_live_tensor_floor_rises_only_with_a_leak():
    """The GPU leak check: per stage, the lowest live-tensor sample of the last third vs. the first third."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    steady = [{"decode:0": 1600 + (37 * i) % 40, "llm": 1244} for i in range(12)]   # in-flight tensors come and go
    assert all(abs(v) < 40 for v in soak.live_growth(steady).values())
    leak = [{"decode:0": 1600 + 30 * i, "llm": 1244} for i in range(12)]
    assert soak.live_growth(leak) == {"decode:0": 240, "llm": 0}
    assert soak.live_growth([{"llm": 1}, {"llm": 2}]) == {}      # too few samples to tell
    assert soak.live_growth([{}, {}, {}]) == {}                  # CPU: no GPU stages
