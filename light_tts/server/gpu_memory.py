"""--gpu_memory_limit_gb: one instance's GPU memory limit, turned into a cap per process.

The limit is in GB (10^9 bytes, the unit a "24 GB" card is sold in; nvidia-smi shows MiB, so
22 GB = 20981 MiB). It bounds ALL processes of this instance together on EACH GPU they run on,
counted as nvidia-smi counts them, so CUDA contexts count too. 0 means no cap.

How the limit is split on one GPU (`plan_gpu`):
  1. each process of the instance on that GPU is charged CUDA_CONTEXT_BYTES for memory that
     PyTorch's allocator neither sees nor caps (CUDA context, loaded kernels);
  2. each encode process that runs ONNX Runtime's CUDA provider gets ENCODE_ORT_BYTES (its
     arena cap; with the plain onnxruntime package encode runs on the CPU and gets nothing);
  3. the LLM process (always on GPU 0) gets what it can use: weights + its KV pool
     (--max_total_token_num slots x layers x 2 (K, V) x KV heads x head dim x KV dtype bytes) +
     prefill activations for --batch_max_tokens tokens + LLM_WORKSPACE_BYTES. The KV pool is
     allocated once at start, so memory past this need would sit idle in the LLM;
  4. the decode processes on that GPU (decode i runs on GPU i % num_gpus) share the rest
     equally: their memory grows with --decode_max_batch_size and sentence length. With
     --load_trt each first sets TRT_BYTES aside, because TensorRT allocates outside PyTorch;
     with CUDA graphs (the default) DECODE_GRAPHS_BYTES, for the same reason (with --load_trt the
     small encoder and HiFT graphs it still captures are left to TRT_BYTES' margin). A decode
     process's share must hold its weights, DECODE_MIN_WORKSPACE_BYTES and its prompt cache
     (--decode_prompt_cache_gb, allocated once at start).
Each process then caps PyTorch's caching allocator at its share with
torch.cuda.set_per_process_memory_fraction(share / device total).

The allowances are estimates: check them against `nvidia-smi --query-compute-apps` on the GPU
(`scripts/gpu.sh report` prints it). LIGHTTTS_CUDA_CONTEXT_MIB overrides CUDA_CONTEXT_BYTES.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("lighttts")

GB = 10**9
MiB = 2**20

# Estimate, to check against nvidia-smi: what a process of ours holds on the GPU beyond PyTorch's
# allocator (CUDA context plus the kernels of torch, cuBLAS, cuDNN and Triton loaded into it).
CUDA_CONTEXT_BYTES = 768 * MiB
CONTEXT_ENV = "LIGHTTTS_CUDA_CONTEXT_MIB"
# Estimate: the LLM's memory besides weights, KV pool and prefill activations (CUDA graphs of
# the decode step, the sampler, req_to_token, cuBLAS workspaces, allocator slack).
LLM_WORKSPACE_BYTES = 512 * MiB
# The least a decode process needs besides its weights to serve at all (one small batch).
DECODE_MIN_WORKSPACE_BYTES = 512 * MiB
# Estimate: a TensorRT estimator engine's own memory (weights + activations for its profile).
TRT_BYTES = 2048 * MiB
# Measured (H200, --decode_max_batch_size 64, docs/benchmarks.md): a decode process with CUDA
# graphs holds ~1.35 GiB outside PyTorch's allocator beyond its CUDA context (the instantiated
# graphs of every batch x frame bucket, cuDNN/cuBLAS/Triton state). Charged per decode process.
DECODE_GRAPHS_BYTES = 1536 * MiB
# ONNX Runtime CUDA arena of one encode process (the speech tokenizer's weights + activations).
ENCODE_ORT_BYTES = 1024 * MiB

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


class GpuMemoryError(ValueError):
    """The limit cannot hold what the flags ask for; the message names the flags to change."""


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def context_bytes() -> int:
    value = os.environ.get(CONTEXT_ENV)
    return int(float(value) * MiB) if value else CUDA_CONTEXT_BYTES


# ---- what the processes need (pure) -----------------------------------------------------------

def kv_pool_bytes(tokens: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                  int8: bool = False) -> int:
    """KV pool of mem_manager.KVPool: tokens + 1 padding slot, K and V, every layer (int8: +scales)."""
    slots = (tokens + 1) * layers * kv_heads
    if int8:
        return 2 * slots * (head_dim + 4)   # int8 codes + one fp32 scale per head
    return 2 * slots * head_dim * dtype_bytes


def prefill_activation_bytes(tokens: int, hidden: int, ffn: int, dtype_bytes: int) -> int:
    """The largest live set of one packed prefill of `tokens` tokens: in a layer's MLP the
    residual, its norm, gate+up (2 x ffn) and the activation (ffn), plus the gathered inputs."""
    return tokens * (3 * ffn + 4 * hidden) * dtype_bytes


@dataclass(frozen=True)
class LLMNeed:
    weights: int
    kv_pool: int
    prefill: int
    workspace: int = LLM_WORKSPACE_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_pool + self.prefill + self.workspace

    def describe(self) -> str:
        return (f"weights {gb(self.weights)} + KV pool {gb(self.kv_pool)} (--max_total_token_num) + prefill "
                f"{gb(self.prefill)} (--batch_max_tokens) + workspace {gb(self.workspace)}")


@dataclass(frozen=True)
class GpuPlan:
    """Byte budgets of one instance's processes on one GPU (0 where a process is absent)."""
    limit: int
    context: int        # charged per process
    has_llm: bool
    n_decode: int
    n_encode: int
    llm: int            # the LLM's allocator cap
    decode: int         # each decode process's allocator cap
    encode: int         # each encode process's ONNX Runtime arena cap
    trt: int            # each decode process's TensorRT allowance
    graphs: int = 0     # each decode process's CUDA-graph allowance (outside the allocator)

    @property
    def processes(self) -> int:
        return int(self.has_llm) + self.n_decode + self.n_encode

    def used(self) -> int:
        """What the plan hands out; never more than `limit`."""
        return (self.processes * self.context + self.llm + self.n_decode * (self.decode + self.trt + self.graphs)
                + self.n_encode * self.encode)

    def describe(self) -> str:
        parts = [f"{self.processes} CUDA context(s) x {gb(self.context)}"]
        if self.has_llm:
            parts.append(f"llm {gb(self.llm)}")
        if self.n_decode:
            parts.append(f"{self.n_decode} decode x {gb(self.decode)}"
                         + (f" (+ TensorRT {gb(self.trt)} each)" if self.trt else "")
                         + (f" (+ CUDA graphs {gb(self.graphs)} each)" if self.graphs else ""))
        if self.n_encode:
            parts.append(f"{self.n_encode} encode (ONNX Runtime) x {gb(self.encode)}")
        return ", ".join(parts)


def plan_gpu(limit: int, *, has_llm: bool, n_decode: int, n_encode: int = 0, llm_need: Optional[LLMNeed] = None,
             decode_min: int = DECODE_MIN_WORKSPACE_BYTES, trt: bool = False, graphs: bool = False,
             context: int = CUDA_CONTEXT_BYTES) -> GpuPlan:
    """Split `limit` bytes between the processes on one GPU (rule in the module doc); raises
    GpuMemoryError naming the flags to change when the LLM's need or a decode process's minimum
    (`decode_min`: its weights + DECODE_MIN_WORKSPACE_BYTES) does not fit."""
    if limit <= 0:
        raise ValueError("plan_gpu needs a positive limit (0 means no cap: do not plan)")
    if has_llm and llm_need is None:
        raise ValueError("the LLM's need is required on the LLM's GPU")
    processes = int(has_llm) + n_decode + n_encode
    encode = ENCODE_ORT_BYTES if n_encode else 0
    trt_each = TRT_BYTES if (trt and n_decode) else 0
    graphs_each = DECODE_GRAPHS_BYTES if (graphs and n_decode) else 0
    left = limit - processes * context - n_encode * encode - n_decode * (trt_each + graphs_each)
    fixed = (f"{processes} CUDA context(s) x {gb(context)}" + (f", {n_encode} encode x {gb(encode)}" if n_encode else "")
             + (f", TensorRT {n_decode} x {gb(trt_each)}" if trt_each else "")
             + (f", decode CUDA graphs {n_decode} x {gb(graphs_each)}" if graphs_each else ""))
    llm = 0
    if has_llm:
        if llm_need.total > left:
            raise GpuMemoryError(
                f"--gpu_memory_limit_gb {limit / GB:g} is too small: after {fixed}, {gb(max(left, 0))} is left, "
                f"but the LLM needs {gb(llm_need.total)} ({llm_need.describe()}). Lower --max_total_token_num "
                f"or --batch_max_tokens, or raise --gpu_memory_limit_gb")
        # with no decode process here the LLM takes the rest (nothing else would use it)
        llm = llm_need.total if n_decode else left
    decode = (left - llm) // n_decode if n_decode else 0
    if n_decode and decode < decode_min:
        raise GpuMemoryError(
            f"--gpu_memory_limit_gb {limit / GB:g} is too small: after {fixed}"
            + (f" and the LLM's {gb(llm)} ({llm_need.describe()})" if has_llm else "")
            + f", each of {n_decode} decode process(es) gets {gb(max(decode, 0))} but needs at least "
              f"{gb(decode_min)} (weights + {gb(DECODE_MIN_WORKSPACE_BYTES)} + the prompt cache). "
            + ("Lower --max_total_token_num or --batch_max_tokens, " if has_llm else "")
            + "use fewer --decode_process_num per GPU, a smaller --decode_prompt_cache_gb, or raise "
              "--gpu_memory_limit_gb")
    return GpuPlan(limit=limit, context=context, has_llm=has_llm, n_decode=n_decode, n_encode=n_encode,
                   llm=llm, decode=decode, encode=encode, trt=trt_each, graphs=graphs_each)


def processes_on_gpu(gpu: int, num_gpus: int, decode_process_num: int, encode_process_num: int,
                     encode_cuda: bool) -> tuple[bool, int, int]:
    """(LLM here?, decode processes here, encode processes here): the LLM and the encode stage
    use GPU 0 (stage_device(0)); decode i uses GPU i % num_gpus (light_tts.server.decode.placement)."""
    from light_tts.server.decode.placement import decode_device
    here = f"cuda:{gpu}"
    n_decode = sum(decode_device(i, num_gpus) == here for i in range(decode_process_num))
    return gpu == 0, n_decode, encode_process_num if (encode_cuda and gpu == 0) else 0


# ---- reading the model and the machine ------------------------------------------------------------

def checkpoint_elements(path: str) -> int:
    """Parameters stored in a .pt state dict, shared storages counted once (memory-mapped: no
    weights are read)."""
    from light_tts.models.loading import read_state_dict
    seen, n = set(), 0
    for t in read_state_dict(path).values():
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        n += storage.nbytes() // t.element_size()
    return n


def llm_need_for(args, dtype_bytes: int) -> LLMNeed:
    from light_tts.models.config import Qwen2Config
    cfg = Qwen2Config.from_json(os.path.join(args.model_dir, "CosyVoice-BlankEN", "config.json"))
    int8 = any(m in ("triton_int8kv", "ppl_int8kv") for m in args.mode)
    return LLMNeed(weights=checkpoint_elements(os.path.join(args.model_dir, "llm.pt")) * dtype_bytes,
                   kv_pool=kv_pool_bytes(args.max_total_token_num, cfg.num_hidden_layers, cfg.num_key_value_heads,
                                         cfg.head_dim, dtype_bytes, int8),
                   prefill=prefill_activation_bytes(args.batch_max_tokens, cfg.hidden_size, cfg.intermediate_size,
                                                    dtype_bytes))


def decode_weight_bytes(model_dir: str, dtype_bytes: int) -> int:
    return sum(checkpoint_elements(os.path.join(model_dir, f)) for f in ("flow.pt", "hift.pt")) * dtype_bytes


def onnx_cuda_available() -> bool:
    """Whether the encode stage's ONNX speech tokenizer runs on the GPU (onnxruntime-gpu installed)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def limit_bytes(args) -> int:
    return int(args.gpu_memory_limit_gb * GB)


def prompt_cache_bytes(args) -> int:
    """The decode prompt cache's allocation (decode/prompt_cache.py): only with the fused estimator."""
    if args.load_trt or args.disable_fused_estimator:
        return 0
    return int(args.decode_prompt_cache_gb * GB)


def plan_for(args, gpu: int, num_gpus: int) -> GpuPlan:
    """The plan of GPU `gpu` for this instance's flags and model (every process computes the same)."""
    dtype_bytes = DTYPE_BYTES[args.data_type if args.data_type in DTYPE_BYTES else "fp32"]
    has_llm, n_decode, n_encode = processes_on_gpu(gpu, num_gpus, args.decode_process_num,
                                                   args.encode_process_num, onnx_cuda_available())
    return plan_gpu(limit_bytes(args), has_llm=has_llm, n_decode=n_decode, n_encode=n_encode,
                    llm_need=llm_need_for(args, dtype_bytes) if has_llm else None,
                    decode_min=decode_weight_bytes(args.model_dir, dtype_bytes) + DECODE_MIN_WORKSPACE_BYTES
                    + prompt_cache_bytes(args),
                    trt=bool(args.load_trt), graphs=not (args.disable_cudagraph or args.load_trt),
                    context=context_bytes())


# ---- applying it in a process -------------------------------------------------------------------

def apply_memory_cap(args, stage: str, device: str) -> Optional[GpuPlan]:
    """Cap this process's PyTorch allocator at its share of --gpu_memory_limit_gb (stage "llm" or
    "decode:i"); call it on the process's device before anything is allocated there. Nothing on
    a CPU or without a limit. Raises GpuMemoryError when the limit is too small."""
    if limit_bytes(args) <= 0 or not str(device).startswith("cuda"):
        return None
    import torch
    dev = torch.device(device)
    plan = plan_for(args, dev.index or 0, torch.cuda.device_count())
    budget = plan.llm if stage == "llm" else plan.decode
    total = torch.cuda.get_device_properties(dev).total_memory
    if plan.limit > total:
        log.warning("--gpu_memory_limit_gb %g is more than %s has (%s): the limit cannot bind",
                    plan.limit / GB, device, gb(total))
    with torch.cuda.device(dev):   # the allocator reads the total of the *current* device
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), dev)
    log.info("GPU memory cap: %s may allocate %s on %s (--gpu_memory_limit_gb %g for the instance on this GPU: %s)",
             stage, gb(budget), device, plan.limit / GB, plan.describe())
    return plan


def cap_memory_or_exit(args, stage: str, device: str) -> Optional[GpuPlan]:
    """apply_memory_cap, or end the start with one log line naming what to change."""
    try:
        return apply_memory_cap(args, stage, device)
    except GpuMemoryError as e:
        log.error("%s", e)
        raise SystemExit(2)


def log_reserved(stage: str, device: str, plan: Optional[GpuPlan]) -> None:
    """Once ready (capped processes only): what PyTorch's allocator holds. nvidia-smi's figure for
    the process less this is its CUDA context etc., the number CUDA_CONTEXT_BYTES estimates."""
    if plan is None:
        return
    import torch
    share = plan.llm if stage == "llm" else plan.decode
    log.info("GPU memory at ready: %s holds %.0f MiB in PyTorch's allocator (cap %.0f MiB)", stage,
             torch.cuda.memory_reserved(torch.device(device)) / MiB, share / MiB)


def allocator_stats() -> dict:
    """What PyTorch's CUDA allocator holds in this process, for /metrics and the soak: live tensors
    (gpu_allocated_bytes), what it keeps reserved from the driver (gpu_reserved_bytes; nvidia-smi's
    figure less the CUDA context) and its high-water mark. Empty where CUDA is not in use."""
    import sys
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu_allocated_bytes": torch.cuda.memory_allocated(),
            "gpu_reserved_bytes": torch.cuda.memory_reserved(),
            "gpu_max_reserved_bytes": torch.cuda.max_memory_reserved()}


def encode_cuda_budget(args) -> int:
    """The ONNX Runtime arena cap of an encode process on GPU 0 (0: no cap)."""
    if limit_bytes(args) <= 0:
        return 0
    import torch
    if not (torch.cuda.is_available() and onnx_cuda_available()):
        return 0
    try:
        plan = plan_for(args, 0, torch.cuda.device_count())
    except GpuMemoryError as e:
        log.error("%s", e)
        raise SystemExit(2)
    log.info("GPU memory cap: ONNX Runtime arena %s (--gpu_memory_limit_gb %g: %s)",
             gb(plan.encode), plan.limit / GB, plan.describe())
    return plan.encode


def out_of_memory_hint(args, stage: str, plan: Optional[GpuPlan]) -> str:
    """What to change after an out-of-memory error while `stage` ("llm", "decode:i") starts."""
    if plan is None:
        where, fix = "", "free GPU memory (nvidia-smi: other processes?)"
    else:
        share = plan.llm if stage == "llm" else plan.decode
        where = f" within its {gb(share)} share of --gpu_memory_limit_gb {plan.limit / GB:g}"
        fix = "raise --gpu_memory_limit_gb"
    if stage == "llm":
        return (f"llm ran out of GPU memory while starting{where} (weights, KV pool of --max_total_token_num "
                f"{args.max_total_token_num}, prefill warm-up within --batch_max_tokens {args.batch_max_tokens}): "
                f"lower those, or {fix}")
    return (f"{stage} ran out of GPU memory while starting{where} (weights and the warm-up of every batch up to "
            f"--decode_max_batch_size {args.decode_max_batch_size}): too little for --decode_max_batch_size "
            f"{args.decode_max_batch_size}; lower it, or {fix}")
