"""--gpu_memory_limit_gb: the split of one instance's GPU memory limit into per-process caps
(light_tts/server/gpu_memory.py). CPU only: the split is arithmetic on the flags and the model's
files; applying it on a CPU must do nothing."""
import pytest
import torch

from light_tts.server import gpu_memory as gm
from light_tts.server.args import parse_args
from light_tts.server.gpu_memory import GB, MiB, GpuMemoryError, LLMNeed, plan_gpu

NEED = LLMNeed(weights=1000 * MiB, kv_pool=400 * MiB, prefill=600 * MiB)   # 2.5 GiB with the workspace


def test_llm_gets_its_need_and_decoders_share_the_rest():
    limit, ctx = 22 * GB, 700 * MiB
    p = plan_gpu(limit, has_llm=True, n_decode=2, llm_need=NEED, context=ctx)
    assert p.processes == 3 and p.llm == NEED.total == 1000 * MiB + 400 * MiB + 600 * MiB + gm.LLM_WORKSPACE_BYTES
    assert p.decode == (limit - 3 * ctx - NEED.total) // 2
    # everything handed out adds up to the limit (less the rounding of the equal split)
    assert 0 <= limit - p.used() < 2


def test_each_process_is_charged_one_context():
    without = plan_gpu(20 * GB, has_llm=True, n_decode=3, llm_need=NEED, context=0)
    ctx = 500 * MiB
    charged = plan_gpu(20 * GB, has_llm=True, n_decode=3, llm_need=NEED, context=ctx)
    assert charged.llm == without.llm   # the LLM's need does not shrink: the decoders pay for the contexts
    assert abs((without.decode - charged.decode) - 4 * ctx / 3) < 1   # 4 processes' contexts over 3 decoders


def test_a_gpu_without_the_llm_is_shared_by_its_decoders():
    p = plan_gpu(10 * GB, has_llm=False, n_decode=2, context=gm.CUDA_CONTEXT_BYTES)
    assert p.llm == 0 and p.decode == (10 * GB - 2 * gm.CUDA_CONTEXT_BYTES) // 2


def test_the_llm_alone_takes_what_is_left():
    p = plan_gpu(8 * GB, has_llm=True, n_decode=0, llm_need=NEED, context=gm.CUDA_CONTEXT_BYTES)
    assert p.llm == 8 * GB - gm.CUDA_CONTEXT_BYTES and p.used() == 8 * GB


def test_tensorrt_and_onnx_runtime_allowances_come_off_the_top():
    plain = plan_gpu(22 * GB, has_llm=True, n_decode=1, llm_need=NEED)
    trt = plan_gpu(22 * GB, has_llm=True, n_decode=1, llm_need=NEED, trt=True)
    assert plain.decode - trt.decode == gm.TRT_BYTES and trt.trt == gm.TRT_BYTES
    enc = plan_gpu(22 * GB, has_llm=True, n_decode=1, n_encode=2, llm_need=NEED)
    assert enc.encode == gm.ENCODE_ORT_BYTES
    assert plain.decode - enc.decode == 2 * (gm.ENCODE_ORT_BYTES + gm.CUDA_CONTEXT_BYTES)
    assert 0 <= 22 * GB - enc.used() < 1 and 0 <= 22 * GB - trt.used() < 1


def test_a_limit_too_small_for_the_llm_names_the_flags():
    with pytest.raises(GpuMemoryError) as e:
        plan_gpu(3 * GB, has_llm=True, n_decode=1, llm_need=NEED)
    msg = str(e.value)
    assert "--gpu_memory_limit_gb 3 is too small" in msg and "--max_total_token_num" in msg, msg
    assert "--batch_max_tokens" in msg and "KV pool 0.42 GB" in msg, msg


def test_a_limit_too_small_for_the_decoders_names_the_flags():
    # the LLM fits, the decoder's weights + minimal workspace do not
    with pytest.raises(GpuMemoryError) as e:
        plan_gpu(5 * GB, has_llm=True, n_decode=1, llm_need=NEED, decode_min=2 * GB)
    msg = str(e.value)
    assert "each of 1 decode process(es) gets" in msg and "needs at least 2.00 GB" in msg, msg
    assert "--max_total_token_num" in msg and "--decode_process_num" in msg and "raise --gpu_memory_limit_gb" in msg
    with pytest.raises(ValueError):
        plan_gpu(0, has_llm=False, n_decode=1)   # 0 means no cap: there is nothing to plan


def test_processes_on_each_gpu_follow_the_placement():
    # 3 decoders on 2 GPUs: decode 0 and 2 on GPU 0 with the LLM, decode 1 on GPU 1
    assert gm.processes_on_gpu(0, 2, 3, 2, encode_cuda=False) == (True, 2, 0)
    assert gm.processes_on_gpu(1, 2, 3, 2, encode_cuda=False) == (False, 1, 0)
    # encode counts only where its ONNX Runtime uses CUDA, and only on GPU 0
    assert gm.processes_on_gpu(0, 2, 3, 2, encode_cuda=True) == (True, 2, 2)
    assert gm.processes_on_gpu(1, 2, 3, 2, encode_cuda=True) == (False, 1, 0)


def test_kv_pool_estimate_is_the_pools_real_size():
    from light_tts.server.llm.mem_manager import KVPool
    for int8 in (False, True):
        pool = KVPool(100, 3, 2, 8, torch.float16, "cpu", int8=int8)
        assert gm.kv_pool_bytes(100, 3, 2, 8, 2, int8=int8) == pool.bytes()


def test_plan_from_the_flags_and_the_model(tiny_model_dir):
    from light_tts.models.cosyvoice2 import CosyVoice2Model
    flags = ["--model_dir", tiny_model_dir, "--gpu_memory_limit_gb", "6", "--data_type", "bf16",
             "--max_total_token_num", "4096", "--max_req_total_len", "2048", "--batch_max_tokens", "2048"]
    # the decode share must hold the prompt cache: 2 GB does not fit beside the rest
    with pytest.raises(gm.GpuMemoryError, match="--decode_prompt_cache_gb"):
        gm.plan_for(parse_args(flags + ["--decode_prompt_cache_gb", "2"]), 0, 1)
    assert gm.prompt_cache_bytes(parse_args(flags + ["--decode_prompt_cache_gb", "2", "--load_trt", "True"])) == 0
    args = parse_args(flags + ["--decode_prompt_cache_gb", "1"])
    need = gm.llm_need_for(args, 2)
    llm = CosyVoice2Model.from_pretrained(tiny_model_dir, components=("llm",)).llm
    assert need.weights == 2 * sum(p.numel() for p in llm.parameters())
    cfg = llm.llm.model.model.config
    assert need.kv_pool == gm.kv_pool_bytes(4096, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 2)
    plan = gm.plan_for(args, 0, 1)
    assert plan.llm == need.total and plan.n_decode == 1 and 0 <= 6 * GB - plan.used() < 1


def test_the_flag_parses(tmp_path):
    base = ["--model_dir", str(tmp_path)]
    assert parse_args(base).gpu_memory_limit_gb == 0.0
    assert parse_args(base + ["--gpu_memory_limit_gb", "22"]).gpu_memory_limit_gb == 22.0
    assert parse_args(base + ["--gpu_memory_limit_gb", "10.5"]).gpu_memory_limit_gb == 10.5
    assert parse_args(base + ["--gpu_memory_limit_gb", ""]).gpu_memory_limit_gb == 0.0   # an empty env-file key
    for flag in ("--gpu_memory_limit_gb", "--decode_prompt_cache_gb"):
        for bad in ("-1", "lots", "nan"):
            with pytest.raises(SystemExit):
                parse_args(base + [flag, bad])


def test_no_cap_at_zero_or_on_a_cpu(tmp_path):
    # returns before touching CUDA (this torch has none: any CUDA call would raise)
    zero = parse_args(["--model_dir", str(tmp_path)])
    assert gm.apply_memory_cap(zero, "llm", "cuda:0") is None
    capped = parse_args(["--model_dir", str(tmp_path), "--gpu_memory_limit_gb", "22"])
    assert gm.apply_memory_cap(capped, "decode:0", "cpu") is None
    assert gm.encode_cuda_budget(zero) == 0


def test_context_allowance_can_be_calibrated(monkeypatch):
    monkeypatch.setenv(gm.CONTEXT_ENV, "512")
    assert gm.context_bytes() == 512 * MiB
    monkeypatch.delenv(gm.CONTEXT_ENV)
    assert gm.context_bytes() == gm.CUDA_CONTEXT_BYTES


def test_out_of_memory_hint_names_the_batch_size(tmp_path):
    args = parse_args(["--model_dir", str(tmp_path), "--decode_max_batch_size", "32", "--gpu_memory_limit_gb", "10"])
    plan = plan_gpu(10 * GB, has_llm=True, n_decode=1, llm_need=NEED)
    msg = gm.out_of_memory_hint(args, "decode:0", plan)
    assert "too little for --decode_max_batch_size 32" in msg and "raise --gpu_memory_limit_gb" in msg, msg
    assert "--max_total_token_num" in gm.out_of_memory_hint(args, "llm", None)
