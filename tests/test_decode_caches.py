"""The decode process bounds oneDNN's and ideep's caches of convolution setups (CPU memory growth
under varying shapes: docs/reliability.md, "Soak"); an operator's own value wins."""
from light_tts.server.decode.process import CPU_CACHE_ENV, bound_cpu_caches


def test_sets_both_capacities_when_unset():
    env = {}
    assert bound_cpu_caches(env) == CPU_CACHE_ENV == env
    assert set(env) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"}
    assert all(0 < int(v) < 1024 for v in env.values())   # below the libraries' default of 1024


def test_keeps_the_operators_values():
    env = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "OTHER": "x"}
    got = bound_cpu_caches(env)
    assert got == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": CPU_CACHE_ENV["LRU_CACHE_CAPACITY"]}
    assert env["OTHER"] == "x"
