"""Triton kernels (light_tts/kernels/*) against their plain-PyTorch references, on CPU under
TRITON_INTERPRET=1, at small sizes, fp32 and fp16.

Every output a kernel should write is poisoned (NaN, or -128 for int8 codes, which quantisation
never produces) before the run, so a missed element fails; memory it must NOT touch (unused pool
slots, the padding slot, the v part of a fused qkv buffer, rows of q outside every request,
scratch blocks past a request's length) is poisoned too, so a stray read shows up as NaN and a
stray write as a changed value.
"""
import importlib
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported (its own helpers such as tl.cdiv are jit
# functions too), when @triton.jit decorates our kernels and at launch; tests/conftest.py sets it
# before anything imports triton. test_kernels_are_interpreted checks it took effect.
import triton  # noqa: E402,F401  (a hard dependency of these tests: see pyproject's test extra)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

_MODULES = {name: importlib.import_module(f"light_tts.kernels.{name}")
            for name in ("store_kv", "rotary", "rms_norm", "silu_mul", "context_attention", "decode_attention",
                         "int8_kv")}
from light_tts.kernels import reference as ref  # noqa: E402

K = {name: getattr(_MODULES[mod], name) for mod, names in (
    ("store_kv", ["store_kv"]), ("rotary", ["rotary"]), ("rms_norm", ["rms_norm", "add_rms_norm"]),
    ("silu_mul", ["silu_mul"]),
    ("context_attention", ["context_attention", "context_attention_int8"]),
    ("decode_attention", ["decode_attention", "decode_attention_int8"]),
    ("int8_kv", ["store_kv_int8"])) for name in names}

DTYPES = [torch.float32, torch.float16]
# Attention outputs are weighted means of O(1) values: fp16 rounds them at ~1e-3.
ATTN_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
POISON_CODE = -128


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more than they save

def test_kernels_are_interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1"
    mods = _MODULES
    for kernel in (mods["store_kv"]._store_kv_kernel, mods["rotary"]._rotary_kernel,
                   mods["rms_norm"]._rms_norm_kernel, mods["rms_norm"]._add_rms_norm_kernel,
                   mods["silu_mul"]._silu_mul_kernel, mods["context_attention"]._context_attention_kernel,
                   mods["decode_attention"]._decode_stage1_kernel, mods["decode_attention"]._decode_stage2_kernel,
                   mods["int8_kv"]._store_kv_int8_kernel):
        assert isinstance(kernel, InterpretedFunction), kernel


def _fused_qkv(n, hq, hkv, d, dtype, g):
    """q, k, v as views of one [n, (hq + 2 hkv) d] projection output (strided, like the engine's)."""
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    assert not k.is_contiguous()
    return qkv, q, k, v


def _assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ---- KV store -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv(dtype):
    g = torch.Generator().manual_seed(1)
    n, hq, hkv, d, num_slots = 7, 4, 2, 32, 20
    _, _, k, v = _fused_qkv(n, hq, hkv, d, dtype, g)
    slots = torch.randperm(num_slots, generator=g)[:n]
    slots[-1] = num_slots  # a padding token writes the padding slot
    k_cache = torch.full((num_slots + 1, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    K["store_kv"](k, v, k_cache, v_cache, slots)
    ref.store_kv(k, v, k_ref, v_ref, slots)
    _assert_same(k_cache, k_ref)
    _assert_same(v_cache, v_ref)
    assert not k_cache[slots].isnan().any()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_int8(dtype, scale_dtype):
    g = torch.Generator().manual_seed(2)
    n, hq, hkv, d, num_slots = 6, 4, 2, 16, 16
    _, _, k, v = _fused_qkv(n, hq, hkv, d, dtype, g)
    # Token 0, head 0: scale exactly 1, so x / scale lands on .5 ties (round half to even) and on
    # the clamp bound; token 1, head 1: all zeros (scale 0, codes 0).
    k[0, 0] = torch.tensor([127, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, -1.5, 126.5, -127] + [0.25] * 6, dtype=dtype)
    v[1, 1] = 0
    slots = torch.randperm(num_slots, generator=g)[:n]
    codes = torch.full((num_slots + 1, hkv, d), POISON_CODE, dtype=torch.int8)
    scale = torch.full((num_slots + 1, hkv), float("nan"), dtype=scale_dtype)
    k_codes, v_codes, k_scale, v_scale = codes.clone(), codes.clone(), scale.clone(), scale.clone()
    r_k_codes, r_v_codes, r_k_scale, r_v_scale = codes.clone(), codes.clone(), scale.clone(), scale.clone()
    K["store_kv_int8"](k, v, k_codes, k_scale, v_codes, v_scale, slots)
    ref.store_kv_int8(k, v, r_k_codes, r_k_scale, r_v_codes, r_v_scale, slots)
    _assert_same(k_codes, r_k_codes)
    _assert_same(v_codes, r_v_codes)
    _assert_same(k_scale, r_k_scale)
    _assert_same(v_scale, r_v_scale)
    s0 = slots[0]
    assert k_codes[s0, 0, :10].tolist() == [127, 2, -2, 4, 0, 0, 2, -2, 126, -127]
    assert v_scale[slots[1], 1].item() == 0 and (v_codes[slots[1], 1] == 0).all()


# ---- norm and rotary ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(3)
    n, h = 5, 96  # not a power of two: the row is masked
    wide = (torch.randn(n, h + 32, generator=g) * 3).to(dtype)
    x = wide[:, 16:16 + h]  # strided rows
    weight = (torch.rand(h, generator=g) + 0.5).to(dtype)
    out = torch.full((n, h), float("nan"), dtype=dtype)
    y = K["rms_norm"](x, weight, 1e-6, out=out)
    assert y is out
    expected = ref.rms_norm(x, weight, 1e-6)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(y, expected, **tol)
    y2 = K["rms_norm"](x, weight, 1e-6)  # allocating path
    assert y2.dtype == dtype and y2.shape == (n, h)
    torch.testing.assert_close(y2, expected, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    g = torch.Generator().manual_seed(4)
    n, h = 5, 96
    wide = (torch.randn(n, h + 32, generator=g) * 3).to(dtype)
    delta = (torch.randn(n, h, generator=g) * 3).to(dtype)
    weight = (torch.rand(h, generator=g) + 0.5).to(dtype)
    x, x_ref = wide[:, 16:16 + h], wide.clone()[:, 16:16 + h]   # strided rows, updated in place
    x0 = x.clone()
    y = K["add_rms_norm"](x, delta, weight, 1e-6)
    expected = ref.add_rms_norm(x_ref, delta, weight, 1e-6)
    _assert_same(x, x0 + delta)                    # the residual: one rounding of x + delta
    _assert_same(x_ref, x0 + delta)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(y, expected, **tol)
    untouched = wide.clone()
    K["add_rms_norm"](wide[:, 16:16 + h], delta, weight, 1e-6)
    _assert_same(wide[:, :16], untouched[:, :16])  # columns outside the view are not written
    _assert_same(wide[:, 16 + h:], untouched[:, 16 + h:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    g = torch.Generator().manual_seed(5)
    n, i = 3, 1500                                 # two column blocks, the second one masked
    gate_up = (torch.randn(n, 2 * i + 8, generator=g) * 4).to(dtype)[:, :2 * i]   # strided rows
    y = K["silu_mul"](gate_up)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(y, ref.silu_mul(gate_up), **tol)
    assert y.shape == (n, i) and y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype):
    g = torch.Generator().manual_seed(4)
    n, hq, hkv, d = 6, 6, 2, 32  # 6 q heads: the head block is masked
    qkv, q, k, _ = _fused_qkv(n, hq, hkv, d, dtype, g)
    positions = torch.tensor([0, 1, 2, 37, 500, 1999])
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions[:, None].float() * inv_freq[None, :]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = qkv.clone()
    ref.rotary(expected[:, :hq * d].view(n, hq, d), expected[:, hq * d:(hq + hkv) * d].view(n, hkv, d), cos, sin)
    K["rotary"](q, k, cos, sin)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(qkv, expected, **tol)
    _assert_same(qkv[:, (hq + hkv) * d:], expected[:, (hq + hkv) * d:])  # v untouched


# ---- attention ------------------------------------------------------------------------------------

class Pool:
    """A poisoned single-layer pool holding `lengths[r]` tokens for request row r at scattered slots."""

    def __init__(self, lengths, hkv, d, dtype, g, num_slots=128, max_req_len=64, int8=False):
        self.num_slots = num_slots
        pad = num_slots
        self.req_to_token = torch.full((len(lengths) + 1, max_req_len), pad, dtype=torch.int32)
        order = torch.randperm(num_slots, generator=g)
        used = 0
        for r, n in enumerate(lengths):
            self.req_to_token[r, :n] = order[used:used + n].int()
            used += n
        assert used <= num_slots
        shape = (num_slots + 1, hkv, d)
        k_all = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
        v_all = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
        live = order[:used]
        if int8:
            self.k = torch.full(shape, POISON_CODE, dtype=torch.int8)
            self.v = self.k.clone()
            self.k_scale = torch.full(shape[:2], float("nan"), dtype=torch.float32)
            self.v_scale = self.k_scale.clone()
            ref.store_kv_int8(k_all[live], v_all[live], self.k, self.k_scale, self.v, self.v_scale, live)
        else:
            self.k = torch.full(shape, float("nan"), dtype=dtype)
            self.v = self.k.clone()
            ref.store_kv(k_all[live], v_all[live], self.k, self.v, live)

    def caches(self, int8):
        return (self.k, self.k_scale, self.v, self.v_scale) if int8 else (self.k, self.v)


def _i32(xs):
    return torch.tensor(xs, dtype=torch.int32)


# (Hq, Hkv, D): GQA groups of 2 and of 3 (not a power of two: padded group rows).
HEADS = [(4, 2, 16), (6, 2, 32)]


@pytest.mark.parametrize("int8", [False, True], ids=["fp", "int8"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_context_attention(dtype, heads, int8):
    hq, hkv, d = heads
    g = torch.Generator().manual_seed(5)
    # (prefix, new) per batch entry: fresh prompt over two query blocks, a cached prefix with new
    # tokens, one new token after a long prefix, an entry with nothing new. Request rows shuffled.
    spec = [(0, 19), (13, 5), (30, 1), (4, 0)]
    req_rows = [2, 0, 3, 1]
    lengths = [0] * len(spec)
    for (prefix, new), row in zip(spec, req_rows):
        lengths[row] = prefix + new
    pool = Pool(lengths, hkv, d, dtype, g, int8=int8)
    news = [new for _, new in spec]
    starts = [sum(news[:i]) for i in range(len(news))]
    n_tok = sum(news) + 2  # two trailing rows of q that belong to no request
    q = torch.randn(n_tok, hq, d, generator=g).to(dtype)
    args = (pool.req_to_token, _i32(req_rows), _i32(starts), _i32(news),
            _i32([p + n for p, n in spec]), max(news), d ** -0.5)
    out = torch.full_like(q, float("nan"))
    if int8:
        o = K["context_attention_int8"](q, *pool.caches(True), *args, out=out, block_m=16, block_n=16)
        expected = ref.context_attention_int8(q, *pool.caches(True), *args)
    else:
        o = K["context_attention"](q, *pool.caches(False), *args, out=out, block_m=16, block_n=16)
        expected = ref.context_attention(q, *pool.caches(False), *args)
    assert o is out
    rows = sum(news)
    torch.testing.assert_close(o[:rows], expected[:rows], **ATTN_TOL[dtype])
    assert o[rows:].isnan().all()  # rows of no request are left alone


@pytest.mark.parametrize("int8", [False, True], ids=["fp", "int8"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(dtype, heads, int8):
    hq, hkv, d = heads
    g = torch.Generator().manual_seed(6)
    # Lengths 1, one short of / exactly / one past a 16-token block, and 3 blocks minus a bit;
    # max_len 56 gives 4 blocks, so every request has blocks past its length.
    seq = [1, 15, 16, 17, 45]
    req_rows = [4, 1, 0, 3, 2]
    lengths = [0] * len(seq)
    for n, row in zip(seq, req_rows):
        lengths[row] = n
    pool = Pool(lengths, hkv, d, dtype, g, int8=int8)
    bsz, max_len, block_seq = len(seq), 56, 16
    q = torch.randn(bsz, hq, d, generator=g).to(dtype)
    nblk = -(-max_len // block_seq)
    scratch = (torch.full((bsz, hq, nblk, d), float("nan")), torch.full((bsz, hq, nblk), float("nan")))
    out = torch.full_like(q, float("nan"))
    args = (pool.req_to_token, _i32(req_rows), _i32(seq), max_len, d ** -0.5)
    name = "decode_attention_int8" if int8 else "decode_attention"
    o = K[name](q, *pool.caches(int8), *args, out=out, block_seq=block_seq, block_n=8, scratch=scratch)
    assert o is out
    expected = getattr(ref, name)(q, *pool.caches(int8), *args)
    torch.testing.assert_close(o, expected, **ATTN_TOL[dtype])
    # Blocks at or past a request's length are never written (so stage 2 must not read them).
    for b, n in enumerate(seq):
        written = -(-n // block_seq)
        assert not scratch[1][b, :, :written].isnan().any()
        assert scratch[1][b, :, written:].isnan().all()
    # The default block choice (one block per request here) agrees too.
    o2 = K[name](q, *pool.caches(int8), *args)
    torch.testing.assert_close(o2, expected, **ATTN_TOL[dtype])


def test_bad_arguments_raise():
    q = torch.zeros(2, 4, 16)
    cache = torch.zeros(9, 2, 16)
    r2t = torch.zeros(2, 8, dtype=torch.int32)
    idx = _i32([0, 1])
    with pytest.raises(ValueError, match="k_cache must be"):
        K["decode_attention"](q, torch.zeros(9, 2, 32), cache, r2t, idx, idx, 8, 0.25)
    with pytest.raises(ValueError, match="b_seq_len must be"):
        K["decode_attention"](q, cache, cache, r2t, idx, _i32([1, 2, 3]), 8, 0.25)
    with pytest.raises(ValueError, match="head_dim"):
        K["context_attention"](torch.zeros(2, 4, 12), torch.zeros(9, 2, 12), torch.zeros(9, 2, 12), r2t,
                               idx, idx, idx, idx, 1, 0.25)
    with pytest.raises(ValueError, match="q's dtype"):
        K["decode_attention"](q.half(), cache, cache, r2t, idx, idx, 8, 0.25)
    with pytest.raises(ValueError, match="slots must be"):
        K["store_kv"](cache[:2], cache[:2], cache, cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="k_scale must be"):
        K["store_kv_int8"](cache[:2], cache[:2], cache.to(torch.int8), torch.zeros(9, 3), cache.to(torch.int8),
                           torch.zeros(9, 2), torch.zeros(2, dtype=torch.int64))
