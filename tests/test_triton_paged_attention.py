"""CPU tests (TRITON_INTERPRET=1) for vllm_overlay/triton_paged_attention.py.

Tolerances:
- bf16/fp16 output vs float64 reference: ||out - ref|| / ||ref|| < 1e-2 (bf16 P and output rounding
  give ~4e-3).
- fp8 output vs static_fp8_quant_reference(our own bf16 output): bit-exact (the documented semantics).
- fp8 output vs static_fp8_quant_reference(reference.to(bf16)): at most 1 fp8 ulp (adjacent code),
  or an absolute difference <= 1% of max|ref / scale| for elements near zero. A few % of elements
  differ by one ulp because the kernel's bf16 value can sit a bf16 ulp away from the correctly
  rounded one and cross an fp8 rounding boundary; near zero the fp8 grid is finer than the attention's
  own (bf16 P) error.
The module is loaded by file path so the test does not depend on vllm_overlay/__init__.py.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HAVE_TRITON_TARGET = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not _HAVE_TRITON_TARGET, reason="no CUDA and TRITON_INTERPRET!=1: triton kernels cannot run")

# Imports torch + triton only; with vLLM installed the package also
# installs the overlay, which changes nothing here.
import vllm_overlay.triton_paged_attention as tpa  # noqa: E402
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def make_batch(q_lens, kv_lens, Hq, Hkv, D, bs, dtype=torch.bfloat16, kv_fp8=False, t_pad=0, seed=0):
    """Random paged batch: query [T, Hq, D], caches [nb, bs, Hkv, D] with shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    T = sum(q_lens) + t_pad
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(kv_lens, dtype=torch.int32)
    maxb = max((k + bs - 1) // bs for k in kv_lens) + 1  # one spare column (garbage ids are fine)
    nb = B * maxb + 5
    bt = torch.randperm(nb, generator=g)[: B * maxb].reshape(B, maxb).to(torch.int32)
    q = (torch.randn(T, Hq, D, generator=g) + 0.1).to(dtype)
    kc = torch.randn(nb, bs, Hkv, D, generator=g) + 0.1
    vc = torch.randn(nb, bs, Hkv, D, generator=g) + 0.1
    if kv_fp8:
        kc, vc = (kc * 16).to(FP8), (vc * 16).to(FP8)
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
    return [x.to(DEV) for x in (q, kc, vc, qsl, sl, bt)]


def poison(shape, dtype):
    if dtype == FP8:
        return torch.full(shape, 0xFF, dtype=torch.uint8, device=DEV).view(FP8)  # 0xFF is NaN in e4m3fn
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def fp8_code_distance(a, b):
    """Distance in representable e4m3fn steps (sign-magnitude bytes mapped onto a line)."""
    def line(x):
        u = x.view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u >= 0x80, -mag, mag)
    return (line(a) - line(b)).abs()


def new_token_kv(kc, vc, q_lens, kv_lens, bt, dtype, t_pad=0, seed=0):
    """The new tokens' K/V [T, Hkv, D] as the caller has them (= what was written into the cache);
    padding rows get garbage (they must never be read)."""
    bs = kc.shape[1]
    T = sum(q_lens) + t_pad
    g = torch.Generator().manual_seed(seed + 7)
    key = (torch.randn((T,) + tuple(kc.shape[2:]), generator=g) * 100).to(dtype).to(DEV)
    value = (torch.randn((T,) + tuple(kc.shape[2:]), generator=g) * 100).to(dtype).to(DEV)
    t = 0
    for s, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        pos = torch.arange(kl - ql, kl)
        blk = bt[s].cpu().long()[pos // bs].to(DEV)
        slot = (pos % bs).to(DEV)
        rows = torch.arange(ql, device=DEV)
        key[t:t + ql] = tpa._gather(kc, blk).float()[rows, slot].to(dtype)
        value[t:t + ql] = tpa._gather(vc, blk).float()[rows, slot].to(dtype)
        t += ql
    return key, value


def run_case(q_lens, kv_lens, Hq, Hkv, D, bs, sw=None, kv_fp8=False, dtype=torch.bfloat16, t_pad=0,
             splits=None, scales_as_float=False, seed=0, check_fp8=True, dense=False, prefill_cfg=None,
             narrow_from=None):
    q, kc, vc, qsl, sl, bt = make_batch(q_lens, kv_lens, Hq, Hkv, D, bs, dtype, kv_fp8, t_pad, seed)
    kv_in = {}
    if dense:
        kv_in = dict(zip(("key", "value"), new_token_kv(kc, vc, q_lens, kv_lens, bt, dtype, t_pad, seed)))
    if kv_fp8:
        ks, vs = torch.tensor([0.06], device=DEV), torch.tensor([0.05], device=DEV)
        if scales_as_float:
            ks, vs = 0.06, 0.05
    else:
        ks = vs = None
    scale = 1.0 / math.sqrt(D)
    args = (qsl, sl, bt, max(q_lens), max(kv_lens), scale, sw, ks, vs)
    ref = tpa.reference_paged_attention(q, kc, vc, *args)
    tpa.CONFIG_OVERRIDE.clear()
    if splits is not None:
        tpa.CONFIG_OVERRIDE["num_splits"] = splits
    if prefill_cfg is not None:
        tpa.CONFIG_OVERRIDE["prefill"] = dict(prefill_cfg)
    if narrow_from is not None:
        tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = narrow_from
    try:
        out = poison(q.shape, dtype)
        tpa.paged_attention(q, kc, vc, out, *args, **kv_in)
        assert not out.isnan().any(), "unwritten / NaN output elements"
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-2, f"rel err {err}"
        if check_fp8:
            os_ = torch.tensor([0.02], device=DEV)
            if scales_as_float:
                os_ = 0.02
            out8 = poison(q.shape, FP8)
            tpa.paged_attention(q, kc, vc, out8, *args, output_scale=os_, **kv_in)
            assert not out8.float().isnan().any(), "unwritten / NaN fp8 output elements"
            own = tpa.static_fp8_quant_reference(out, os_)
            assert torch.equal(out8.view(torch.uint8), own.view(torch.uint8)), "fused != quant(own bf16)"
            r8 = tpa.static_fp8_quant_reference(ref.to(dtype), os_)
            dist = fp8_code_distance(out8, r8)
            a, b = out8.double(), r8.double()
            atol = 1e-2 * b.abs().max().item()  # near-zero elements: attention's own bf16-level error
            ok = (dist <= 1) | ((a - b).abs() <= atol)
            assert ok.all(), f"fp8 differs by > 1 ulp: {a[~ok][:5].tolist()} vs {b[~ok][:5].tolist()}"
        if dense and not kv_fp8:
            # same tiles, same values: bit-identical to the paged-only path
            out_p = poison(q.shape, dtype)
            tpa.paged_attention(q, kc, vc, out_p, *args)
            assert torch.equal(out_p, out), "dense new-token path != paged path"
            # and the dense inputs are really read: corrupt the new tokens' K in the inputs
            if max(q_lens) > 1:
                out_c = poison(q.shape, dtype)
                tpa.paged_attention(q, kc, vc, out_c, *args, key=kv_in["key"] * 0 + 3, value=kv_in["value"])
                assert not torch.equal(out_c, out), "key/value inputs were not read"
    finally:
        tpa.CONFIG_OVERRIDE.clear()
    return err


# --------------------------------------------------------------------------------------------------
# fp8 rounding
# --------------------------------------------------------------------------------------------------

def _fp8_grid():
    g = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    return torch.sort(g[torch.isfinite(g)].unique()).values


def test_e4m3_rounding_helper_bit_exact():
    g = _fp8_grid()
    mids = (g[:-1] + g[1:]) / 2  # exact ties in fp32
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    dn = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    gen = torch.Generator().manual_seed(1)
    special = torch.tensor([0.0, -0.0, 7.93, -7.93, 447.9, 448.0, 448.1, 449.0, 463.9, 464.0, 465.0, 1e6, -1e6,
                            2.0 ** -9, 2.0 ** -10, 1.5 * 2.0 ** -9, 2.5 * 2.0 ** -9, 2.0 ** -7, 2.0 ** -6,
                            2.0 ** -6 - 2.0 ** -10, 1e-30, -1e-30, 15.5, 15.75, 31.0, 0.9999])
    x = torch.cat([g, mids, -mids, up, dn, -up, -dn, special,
                   torch.randn(20000, generator=gen) * 64, torch.randn(5000, generator=gen) * 0.02,
                   (torch.rand(5000, generator=gen) - 0.5) * 1000]).to(DEV)
    y = tpa.fp8_round_via_triton(x)
    ref = x.clamp(-448, 448).to(FP8)
    bad = (y.view(torch.uint8) != ref.view(torch.uint8))
    assert not bad.any(), f"{bad.sum().item()} mismatches, e.g. {x[bad][:8].tolist()}"


@pytest.mark.parametrize("n,dtype", [(4096 * 3 + 17, torch.bfloat16), (1000, torch.float16), (5000, torch.float32)])
def test_static_fp8_quant_kernel(n, dtype):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 20).to(dtype).to(DEV)
    x[:4] = torch.tensor([1e4, -1e4, 0.0, 3.0], dtype=dtype)
    for scale in (torch.tensor([0.037], device=DEV), 0.5):
        out = poison((n,), FP8)
        tpa.static_fp8_quant(out, x, scale)
        ref = tpa.static_fp8_quant_reference(x, scale)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def test_static_fp8_quant_reference_semantics():
    x = torch.tensor([1.0, 100.0, -1000.0, 0.3], dtype=torch.bfloat16)
    y = tpa.static_fp8_quant_reference(x, torch.tensor([0.5]))
    assert y.float().tolist() == [2.0, 192.0, -448.0, 0.625]


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------

CASES = [
    # q_lens, kv_lens, Hq, Hkv, D, bs, extra
    ([5, 1, 17, 1], [5, 40, 80, 3], 4, 2, 64, 16, {}),                   # prefill, decode, chunked prefill
    ([5, 1, 17, 1], [5, 40, 80, 3], 4, 2, 64, 16, {"t_pad": 3}),         # padding rows past QSL[B]
    ([3, 1, 9], [30, 70, 9], 8, 1, 96, 32, {}),                          # MQA, D=96 (padded to 128)
    ([2, 1, 1], [20, 33, 17], 4, 4, 128, 16, {"sw": 7}),                 # MHA, sliding window
    ([3, 20, 1], [30, 20, 70], 4, 2, 128, 16, {"sw": 16}),
    ([3, 1], [25, 40], 2, 1, 256, 32, {}),                               # D=256
    ([3, 20, 1], [30, 20, 70], 4, 2, 128, 16, {"kv_fp8": True}),         # fp8 KV cache
    ([2, 1], [30, 70], 4, 2, 64, 32, {"kv_fp8": True, "scales_as_float": True}),
    ([4, 1], [9, 50], 4, 2, 64, 16, {"dtype": torch.float16}),
    ([1, 1, 1], [30, 20, 70], 6, 2, 64, 16, {"splits": 3, "t_pad": 2}),  # pure decode, split-KV + reduce
    ([1, 1], [100, 5], 10, 2, 128, 16, {"splits": 4, "sw": 20}),         # split-KV + window, G=5
    ([1, 1], [50, 64], 4, 1, 96, 32, {"kv_fp8": True, "splits": 2}),
    ([3, 1, 1], [40, 50, 64], 4, 2, 64, 16, {"splits": 2}),              # mixed batch, split decodes
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_paged_attention(case):
    q_lens, kv_lens, Hq, Hkv, D, bs, extra = case
    run_case(q_lens, kv_lens, Hq, Hkv, D, bs, seed=hash(str(case)) % 1000, **extra)


_SMALL = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
DENSE_CASES = [
    # new tokens' K/V from the key/value inputs, context from the cache
    ([70], [70], 4, 2, 64, 16, {"prefill_cfg": _SMALL}),                         # pure prefill, all dense
    ([40, 1, 50, 1], [40, 90, 117, 3], 4, 2, 64, 16, {"prefill_cfg": _SMALL, "t_pad": 3}),  # ctx 67: split tile
    ([33, 20], [97, 20], 8, 2, 96, 32, {"prefill_cfg": _SMALL, "sw": 40}),       # window, D=96
    ([150, 1], [150, 40], 4, 2, 128, 16, {}),                                    # version's own config
    ([20, 1], [50, 30], 4, 2, 64, 16, {"kv_fp8": True, "prefill_cfg": _SMALL}),  # fp8 cache: inputs ignored
    ([40, 1], [50, 20], 4, 2, 64, 16, {"dtype": torch.float16, "prefill_cfg": _SMALL}),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[f"d{i}" for i in range(len(DENSE_CASES))])
def test_paged_attention_dense_new_tokens(case):
    q_lens, kv_lens, Hq, Hkv, D, bs, extra = case
    run_case(q_lens, kv_lens, Hq, Hkv, D, bs, seed=hash(str(case)) % 1000, dense=True, **extra)


_SQUARE = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)  # BLOCK_N == BLOCK_M: where narrowing acts
NARROW_CASES = [
    ([40, 1, 50, 1], [40, 90, 117, 3], 4, 2, 64, 16, {"dense": True, "prefill_cfg": _SQUARE, "t_pad": 3}),
    ([33, 20, 1], [97, 20, 60], 8, 2, 96, 32, {"prefill_cfg": _SQUARE, "sw": 40}),
    ([3, 20, 1], [30, 20, 70], 4, 2, 128, 16, {"kv_fp8": True}),
    ([1, 1, 1], [30, 20, 70], 6, 2, 64, 16, {"splits": 3, "t_pad": 2}),
]


@pytest.mark.parametrize("case", NARROW_CASES, ids=[f"n{i}" for i in range(len(NARROW_CASES))])
def test_narrow_fp8_store(case):
    """Narrow fp8 stores forced on (any max_query_len): the same bytes as quant(own bf16 out) (padding
    rows included, every element written), within 1 fp8 step of the float64 reference."""
    q_lens, kv_lens, Hq, Hkv, D, bs, extra = case
    run_case(q_lens, kv_lens, Hq, Hkv, D, bs, seed=hash(str(case)) % 1000, narrow_from=0, **extra)


def test_narrow_fp8_store_into_strided_out():
    """out as a head slice of a wider tensor (not contiguous): narrow stores write only its elements."""
    q, kc, vc, qsl, sl, bt = make_batch([30, 1], [30, 60], 4, 2, 64, 16, seed=5)
    args = (qsl, sl, bt, 30, 60, 0.125)
    os_ = torch.tensor([0.02], device=DEV)
    want = poison(q.shape, FP8)
    tpa.paged_attention(q, kc, vc, want, *args, output_scale=os_)  # wide stores
    wide = poison((q.shape[0], 6, 64), FP8)
    tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = 0
    try:
        tpa.paged_attention(q, kc, vc, wide[:, 1:5], *args, output_scale=os_)
    finally:
        tpa.CONFIG_OVERRIDE.clear()
    assert torch.equal(wide[:, 1:5].view(torch.uint8), want.view(torch.uint8))
    for h in (0, 5):
        assert (wide[:, h].view(torch.uint8) == 0xFF).all(), "narrow store wrote outside out"


@pytest.mark.parametrize("family", ["3.2", "3.6"])
def test_narrow_fp8_store_rule(family, monkeypatch):
    """Narrow stores by default for FP8 output of d128 prefills from 2048 query tokens, where the fp8
    kernel then runs the bf16 kernel's config: static scale on both tritons, group scale on triton 3.2
    only; elsewhere (and where CONFIG_OVERRIDE says) it keeps its own."""
    monkeypatch.setattr(tpa, "_version_family", lambda: family)
    monkeypatch.setattr(tpa, "CONFIG_OVERRIDE", {})
    for d_pad, max_q, narrow in ((128, 2048, True), (128, 16384, True), (128, 2047, False), (64, 4096, False),
                                 (256, 4096, False)):
        assert tpa._narrow_fp8_store(d_pad, max_q) == narrow, (d_pad, max_q)
        assert tpa._narrow_fp8_store(d_pad, max_q, group=True) == (narrow and family == "3.2"), (d_pad, max_q)
    # wide fp8 stores of a long d128 prefill: triton 3.2 keeps the fp8 kernel's 128x64, not bf16's 128x128
    bf16, wide = (tpa._prefill_config(128, 4, False, 4096, 4096, wide_fp8_store=w) for w in (False, True))
    assert (bf16 == wide) == (family == "3.6"), (bf16, wide)
    tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = 0
    assert tpa._narrow_fp8_store(64, 16) and tpa._narrow_fp8_store(128, 16, group=True)
    tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = 1 << 62
    assert not tpa._narrow_fp8_store(128, 4096) and not tpa._narrow_fp8_store(128, 4096, group=True)


def test_narrow_fp8_store_wiring(monkeypatch):
    """paged_attention picks the bf16 kernel's config exactly when its FP8 stores are narrow: static and
    group-scale output each where _NARROW_FROM (or CONFIG_OVERRIDE) covers the prefill."""
    seen = []
    pick = tpa._prefill_config
    monkeypatch.setattr(tpa, "_prefill_config", lambda *a, **k: (seen.append(k["wide_fp8_store"]), pick(*a, **k))[1])
    q, kc, vc, qsl, sl, bt = make_batch([8, 1], [8, 20], 4, 2, 64, 16, seed=3)
    args = (qsl, sl, bt, 8, 20, 0.125)

    def run(static_from, group_from):  # -> wide_fp8_store of a static-FP8, a group-FP8 and a bf16 call
        fam = tpa._version_family()
        monkeypatch.setitem(tpa._NARROW_FROM, fam, {False: {64: static_from}, True: {64: group_from}})
        tpa.paged_attention(q, kc, vc, poison(q.shape, FP8), *args, output_scale=torch.tensor([0.02]))
        tpa.paged_attention(q, kc, vc, poison(q.shape, FP8), *args, output_group_scale=torch.empty(q.shape[:2]))
        tpa.paged_attention(q, kc, vc, poison(q.shape, torch.bfloat16), *args)
        return [seen.pop(0) for _ in range(3)]

    assert run(8, 9) == [False, True, False]
    assert run(9, 8) == [True, False, False]
    monkeypatch.setitem(tpa.CONFIG_OVERRIDE, "narrow_fp8_store", 8)
    assert run(9, 9) == [False, False, False]
    monkeypatch.setitem(tpa.CONFIG_OVERRIDE, "narrow_fp8_store", 1 << 62)
    assert run(8, 8) == [True, True, False]


def test_zero_query_seq_and_pure_decode_padding():
    # pure decode with T > B (CUDA-graph padding): rows [B, T) must be zero-filled
    q, kc, vc, qsl, sl, bt = make_batch([1, 1], [10, 20], 4, 2, 64, 16, t_pad=3)
    out8 = poison(q.shape, FP8)
    tpa.paged_attention(q, kc, vc, out8, qsl, sl, bt, 1, 20, 0.125, output_scale=torch.tensor([0.1], device=DEV))
    assert (out8[2:].view(torch.uint8) == 0).all()
    assert not out8.float().isnan().any()


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------

def _err_args():
    q, kc, vc, qsl, sl, bt = make_batch([2], [4], 4, 2, 64, 16)
    return q, kc, vc, qsl, sl, bt


def test_errors():
    q, kc, vc, qsl, sl, bt = _err_args()
    meta = (qsl, sl, bt, 2, 4, 0.125)
    with pytest.raises(ValueError, match="output_scale"):
        tpa.paged_attention(q, kc, vc, torch.empty(q.shape, dtype=FP8, device=DEV), *meta)
    with pytest.raises(ValueError, match="output_scale"):
        tpa.paged_attention(q, kc, vc, torch.empty_like(q), *meta, output_scale=torch.tensor([1.0], device=DEV))
    with pytest.raises(ValueError, match="float32"):
        tpa.paged_attention(q, kc, vc, torch.empty(q.shape, dtype=FP8, device=DEV), *meta,
                            output_scale=torch.tensor([1.0], dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="out dtype"):
        tpa.paged_attention(q, kc, vc, torch.empty(q.shape, dtype=torch.float32, device=DEV), *meta)
    with pytest.raises(ValueError, match="int32"):
        tpa.paged_attention(q, kc, vc, torch.empty_like(q), qsl.long(), sl, bt, 2, 4, 0.125)
    with pytest.raises(ValueError, match="multiple"):
        tpa.paged_attention(q[:, :3], kc, vc, torch.empty_like(q[:, :3]), *meta)
    with pytest.raises(ValueError, match="kv cache dtype"):
        tpa.paged_attention(q, kc.half(), vc.half(), torch.empty_like(q), *meta)
    with pytest.raises(ValueError, match="query must be"):
        tpa.paged_attention(q.float(), kc, vc, torch.empty_like(q), *meta)
    with pytest.raises(ValueError, match="out shape"):
        tpa.paged_attention(q, kc, vc, torch.empty_like(q[:1]), *meta)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        tpa.static_fp8_quant(torch.empty(4, device=DEV), torch.ones(4, device=DEV), 1.0)
    k_in = torch.zeros(q.shape[0], kc.shape[2], kc.shape[3], dtype=q.dtype, device=DEV)
    with pytest.raises(ValueError, match="both key and value"):
        tpa.paged_attention(q, kc, vc, torch.empty_like(q), *meta, key=k_in)
    with pytest.raises(ValueError, match="key must be"):
        tpa.paged_attention(q, kc, vc, torch.empty_like(q), *meta, key=k_in[:, :1], value=k_in)
    with pytest.raises(ValueError, match="dtype"):
        tpa.paged_attention(q, kc, vc, torch.empty_like(q), *meta, key=k_in.half(), value=k_in)
