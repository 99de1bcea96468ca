"""lighttts_gpu_memory_bytes: what each GPU stage's allocator holds reaches /metrics (the soak's GPU checks read it)."""
import os
import sys

from prometheus_client import CollectorRegistry, generate_latest

from light_tts.server.gpu_memory import allocator_stats
from light_tts.server.http.metrics import StageCollector
from light_tts.server.ipc import Endpoints, write_stats
from light_tts.tools.client_util import parse_prometheus


def test_stage_allocator_stats_become_labelled_gauges(tmp_path):
    endpoints = Endpoints(root=str(tmp_path), encode_num=1, decode_num=1)
    os.makedirs(endpoints.root, exist_ok=True)
    write_stats(endpoints, "decode:0", {"active": 0, "gpu_allocated_bytes": 3 * 2 ** 20,
                                        "gpu_reserved_bytes": 8 * 2 ** 20, "gpu_max_reserved_bytes": 9 * 2 ** 20})
    write_stats(endpoints, "encode:0", {"requests": 1})   # a CPU stage publishes none
    registry = CollectorRegistry()
    registry.register(StageCollector(endpoints))
    samples = parse_prometheus(generate_latest(registry).decode())["lighttts_gpu_memory_bytes"]
    got = {(labels["stage"], labels["kind"]): value for labels, value in samples}
    assert got == {("decode:0", "allocated"): 3 * 2 ** 20, ("decode:0", "reserved"): 8 * 2 ** 20,
                   ("decode:0", "max_reserved"): 9 * 2 ** 20}


def test_allocator_stats_reach_the_gauge(monkeypatch, tmp_path):
    """What allocator_stats reads from torch.cuda is what /metrics shows (a stand-in torch: no GPU here)."""
    from types import SimpleNamespace
    cuda = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                           memory_allocated=lambda: 5 * 2 ** 20, memory_reserved=lambda: 7 * 2 ** 20,
                           max_memory_reserved=lambda: 11 * 2 ** 20)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    stats = allocator_stats()
    monkeypatch.undo()
    endpoints = Endpoints(root=str(tmp_path), encode_num=1, decode_num=1)
    os.makedirs(endpoints.root, exist_ok=True)
    write_stats(endpoints, "llm", {"running": 0, **stats})
    registry = CollectorRegistry()
    registry.register(StageCollector(endpoints))
    samples = parse_prometheus(generate_latest(registry).decode())["lighttts_gpu_memory_bytes"]
    assert {labels["kind"]: value for labels, value in samples if labels["stage"] == "llm"} == {
        "allocated": 5 * 2 ** 20, "reserved": 7 * 2 ** 20, "max_reserved": 11 * 2 ** 20}


def test_no_numbers_without_cuda(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(
        is_available=lambda: False, is_initialized=lambda: False)))
    assert allocator_stats() == {}
