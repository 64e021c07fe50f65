"""GPU sweep for vllm_overlay/triton_paged_attention.py (needs CUDA; skipped otherwise).

Run: ``python3 -m pytest -q tests/gpu`` or ``python3 tests/gpu/test_triton_paged_attention_gpu.py``
(no pytest needed). H100 / torch 2.11 / triton 3.6, 2026-11-24: 21 passed in 176 s.
Tolerances as in tests/test_triton_paged_attention.py (reference here is float32 on the GPU):
bf16 rel-norm < 1e-2; fp8 out bit-exact vs static_fp8_quant_reference(own bf16 out) and within 1 fp8 ulp
(or 1% of max|ref/scale| near zero) of the quantized reference.
"""

import math
import os
import sys
from pathlib import Path

import torch

try:
    import pytest
except ImportError:  # script mode
    pytest = None

_ROOT = Path(__file__).resolve().parents[2]
HAVE_CUDA = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn

if pytest is not None:
    pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU (Triton kernels compiled for it)")


sys.path.insert(0, str(_ROOT))  # run as a script on the GPU box
# Imports torch + triton only; with vLLM installed the package also
# installs the overlay, which changes nothing here.
import vllm_overlay.triton_paged_attention as tpa  # noqa: E402


def make_batch(q_lens, kv_lens, Hq, Hkv, D, bs, dtype=torch.bfloat16, kv_fp8=False, t_pad=0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = len(q_lens)
    T = sum(q_lens) + t_pad
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    sl = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    nblk = [(k + bs - 1) // bs for k in kv_lens]
    nb = sum(nblk) + 7  # only the blocks the sequences use (+ 7 never read), shuffled over the cache
    perm = torch.randperm(nb, device="cuda", generator=g)
    # table entries past a sequence's last block are valid ids the kernel must not read
    bt = torch.randint(0, nb, (B, max(nblk)), device="cuda", generator=g, dtype=torch.int32)
    starts = [0] + torch.tensor(nblk).cumsum(0).tolist()
    for s in range(B):
        bt[s, : nblk[s]] = perm[starts[s]: starts[s + 1]]
    q = (torch.randn(T, Hq, D, device="cuda", generator=g) + 0.1).to(dtype)
    cache_dtype = torch.float32 if kv_fp8 else dtype  # the cache in its own dtype: no fp32 copy of a large one
    kc = torch.randn(nb, bs, Hkv, D, device="cuda", generator=g, dtype=cache_dtype) + 0.1
    vc = torch.randn(nb, bs, Hkv, D, device="cuda", generator=g, dtype=cache_dtype) + 0.1
    if kv_fp8:
        kc, vc = (kc * 16).to(FP8), (vc * 16).to(FP8)
    return q, kc, vc, qsl, sl, bt


def poison(shape, dtype):
    if dtype == FP8:
        return torch.full(shape, 0xFF, dtype=torch.uint8, device="cuda").view(FP8)
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def fp8_code_distance(a, b):
    def line(x):
        u = x.view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u >= 0x80, -mag, mag)
    return (line(a) - line(b)).abs()


def new_token_kv(kc, vc, q_lens, kv_lens, bt, dtype, t_pad=0):
    """The new tokens' K/V [T, Hkv, D] (what was written into the cache); padding rows are garbage."""
    bs = kc.shape[1]
    T = sum(q_lens) + t_pad
    key = torch.randn((T,) + tuple(kc.shape[2:]), device="cuda").mul(100).to(dtype)
    value = torch.randn((T,) + tuple(kc.shape[2:]), device="cuda").mul(100).to(dtype)
    qsl = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    pos = torch.cat([torch.arange(kl - ql, kl) for ql, kl in zip(q_lens, kv_lens)]).cuda()
    seq = torch.cat([torch.full((ql,), s) for s, ql in enumerate(q_lens)]).cuda()
    blk = bt.long()[seq, pos // bs]
    slot = pos % bs
    def rows(c):
        return c.view(torch.uint8)[blk, slot].view(c.dtype) if c.dtype == FP8 else c[blk, slot]
    key[: qsl[-1]] = rows(kc).to(dtype)
    value[: qsl[-1]] = rows(vc).to(dtype)
    return key, value


def check_case(q_lens, kv_lens, Hq, Hkv, D, bs, sw=None, kv_fp8=False, dtype=torch.bfloat16, t_pad=0,
               seed=0, q_view=False, dense=False, narrow_from=None, own_exact=True):
    """own_exact: fp8 out byte-equal to quant(own bf16 out); not when the two run different tile configs
    (summation order), e.g. wide fp8 stores of a long prefill on triton 3.2 (128x64 vs bf16's 128x128).
    narrow_from: CONFIG_OVERRIDE["narrow_fp8_store"], the max_query_len from which fp8 stores are narrow
    (0: always, 1 << 62: never; None: the kernel's default)."""
    if narrow_from is not None:
        tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = narrow_from
        try:
            return check_case(q_lens, kv_lens, Hq, Hkv, D, bs, sw, kv_fp8, dtype, t_pad, seed, q_view, dense,
                              own_exact=own_exact)
        finally:
            tpa.CONFIG_OVERRIDE.pop("narrow_fp8_store", None)
    q, kc, vc, qsl, sl, bt = make_batch(q_lens, kv_lens, Hq, Hkv, D, bs, dtype, kv_fp8, t_pad, seed)
    kv_in = {}
    if dense:
        key, value = new_token_kv(kc, vc, q_lens, kv_lens, bt, dtype, t_pad)
        if q_view:  # strided views, as slices of a fused qkv tensor
            kv2 = torch.randn(key.shape[0], 2 * Hkv + 3, D, device="cuda").to(dtype)
            kv2[:, :Hkv] = key
            kv2[:, Hkv + 3:] = value
            key, value = kv2[:, :Hkv], kv2[:, Hkv + 3:]
        kv_in = dict(key=key, value=value)
    if q_view:  # non-contiguous query view (as a slice of a fused qkv tensor)
        qkv = torch.randn(q.shape[0], Hq + 2 * Hkv, D, device="cuda", dtype=dtype)
        qkv[:, :Hq] = q
        q = qkv[:, :Hq]
    ks = torch.tensor([0.06], device="cuda") if kv_fp8 else None
    vs = torch.tensor([0.05], device="cuda") if kv_fp8 else None
    scale = 1.0 / math.sqrt(D)
    args = (qsl, sl, bt, max(q_lens), max(kv_lens), scale, sw, ks, vs)
    ref = tpa.reference_paged_attention(q, kc, vc, *args)
    out = poison(q.shape, dtype)
    tpa.paged_attention(q, kc, vc, out, *args, **kv_in)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten / NaN output"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"rel err {err}"
    os_ = torch.tensor([0.02], device="cuda")
    out8 = poison(q.shape, FP8)
    tpa.paged_attention(q, kc, vc, out8, *args, output_scale=os_, **kv_in)
    torch.cuda.synchronize()
    assert not out8.float().isnan().any(), "unwritten / NaN fp8 output"
    own = tpa.static_fp8_quant_reference(out, os_)
    if own_exact:
        assert torch.equal(out8.view(torch.uint8), own.view(torch.uint8)), "fused fp8 != quant(own bf16 out)"
    else:
        a, b = out8.float(), own.float()
        near = (fp8_code_distance(out8, own) <= 1) | ((a - b).abs() <= 1e-2 * b.abs().max())
        assert near.all(), f"{(~near).sum().item()} fp8 elements > 1 step from quant(own bf16 out)"
    r8 = tpa.static_fp8_quant_reference(ref.to(dtype), os_)
    a, b = out8.float(), r8.float()
    ok = (fp8_code_distance(out8, r8) <= 1) | ((a - b).abs() <= 1e-2 * b.abs().max())
    assert ok.all(), f"{(~ok).sum().item()} fp8 elements > 1 ulp off"
    # determinism
    out2 = poison(q.shape, dtype)
    tpa.paged_attention(q, kc, vc, out2, *args, **kv_in)
    assert torch.equal(out, out2), "non-deterministic output"
    if dense:  # same tiles, same values: bit-identical to the paged-only path
        out3 = poison(q.shape, dtype)
        tpa.paged_attention(q, kc, vc, out3, *args)
        assert torch.equal(out, out3), "dense new-token path != paged path"
    return err


def _mixed(n_prefill, n_chunk, n_decode, rng, max_len=600):
    q_lens, kv_lens = [], []
    for _ in range(n_prefill):
        n = int(rng.integers(1, max_len))
        q_lens.append(n); kv_lens.append(n)
    for _ in range(n_chunk):
        n = int(rng.integers(2, max_len // 2)); c = int(rng.integers(1, max_len))
        q_lens.append(n); kv_lens.append(n + c)
    for _ in range(n_decode):
        q_lens.append(1); kv_lens.append(int(rng.integers(1, 3000)))
    perm = rng.permutation(len(q_lens))
    return [q_lens[i] for i in perm], [kv_lens[i] for i in perm]


def _cases():
    import numpy as np
    rng = np.random.default_rng(0)
    cases = []
    ql, kl = _mixed(3, 3, 527, rng)  # batch 533 (upstream failure case), 40/8 heads
    cases.append(("b533_40x8_fp8out", ql, kl, 40, 8, 128, 16, {}))
    cases.append(("b533_40x8_bs32_kvfp8", ql, kl, 40, 8, 128, 32, {"kv_fp8": True}))
    for D in (64, 96, 128, 256):
        for bs in (16, 32):
            ql, kl = _mixed(2, 2, 8, rng)
            cases.append((f"mixed_d{D}_bs{bs}", ql, kl, 16, 4, D, bs, {}))
    ql, kl = _mixed(2, 2, 8, rng)
    cases.append(("mixed_sw", ql, kl, 32, 8, 128, 16, {"sw": 256}))
    cases.append(("mixed_sw_kvfp8_fp16", ql, kl, 32, 8, 128, 16, {"sw": 100, "kv_fp8": True,
                                                                    "dtype": torch.float16}))
    cases.append(("mqa_qview", ql, kl, 32, 1, 128, 16, {"q_view": True, "t_pad": 5}))
    cases.append(("prefill_16k_chunk", [512, 1, 1], [16384, 16384, 9000], 32, 8, 128, 16, {}))
    cases.append(("decode_16k_split", [1] * 4, [16384, 100, 8000, 16000], 32, 8, 128, 16, {}))
    cases.append(("decode_16k_split_sw_kvfp8", [1] * 4, [16384, 100, 8000, 16000], 32, 8, 128, 16,
                  {"sw": 4096, "kv_fp8": True}))
    cases.append(("decode_pad_g5", [1] * 3, [3000, 1, 77], 40, 8, 128, 16, {"t_pad": 4}))
    cases.append(("prefill_4096", [4096], [4096], 32, 8, 128, 16, {}))
    cases.append(("prefill_d256_sw", [700, 300], [1500, 300], 16, 8, 256, 16, {"sw": 512}))
    # new tokens' K/V from the key/value inputs (dense), context from the cache
    ql, kl = _mixed(3, 3, 527, rng)
    cases.append(("dense_b533_40x8", ql, kl, 40, 8, 128, 16, {"dense": True, "t_pad": 3}))
    for D in (64, 96, 128, 256):
        ql, kl = _mixed(2, 3, 4, rng)
        cases.append((f"dense_mixed_d{D}", ql, kl, 16, 4, D, 16, {"dense": True}))
    cases.append(("dense_prefill_4096", [4096], [4096], 32, 8, 128, 16, {"dense": True}))
    cases.append(("dense_chunk_sw_qview", [700, 333, 1], [1500, 900, 50], 32, 8, 128, 32,
                  {"dense": True, "sw": 300, "q_view": True}))
    cases.append(("dense_kvfp8_ignored", [300, 1], [700, 90], 32, 8, 128, 16, {"dense": True, "kv_fp8": True}))
    cases.append(("dense_fp16_mqa", [500, 64], [500, 1000], 32, 1, 128, 16, {"dense": True,
                                                                              "dtype": torch.float16}))
    # narrow fp8 stores: by default from 2048 query tokens at d128 (a mixed tail, padding rows, strided
    # views); forced off there (wide stores at the fp8 config); forced on for a chunk on paged context at d64
    cases.append(("narrow_long_mixed", [2048, 300, 1], [2048, 900, 1000], 32, 8, 128, 16,
                  {"dense": True, "q_view": True, "t_pad": 5}))
    cases.append(("wide_store_prefill_2048", [2048], [2048], 32, 8, 128, 16,
                  {"dense": True, "narrow_from": 1 << 62, "own_exact": False}))
    cases.append(("narrow_chunk_d64", [512, 1], [4608, 700], 32, 8, 64, 16, {"dense": True, "narrow_from": 0}))
    return cases


CASES = _cases()
# GPU_TEST_SHARD=i/n runs every n-th case (and the quant/graph checks in shard 0 only): lets one GPU
# compile several shards in parallel processes (benchmarks/attention_quant.py --tests does).
_SHARD = os.environ.get("GPU_TEST_SHARD", "0/1")
_SI, _SN = (int(x) for x in _SHARD.split("/"))
CASES = [c for i, c in enumerate(CASES) if i % _SN == _SI]

if pytest is not None:
    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_gpu_case(case):
        name, ql, kl, Hq, Hkv, D, bs, extra = case
        check_case(ql, kl, Hq, Hkv, D, bs, **extra)

    @pytest.mark.skipif(_SI != 0, reason="other shard")
    def test_gpu_quant_kernel():
        _quant_check()

    @pytest.mark.skipif(_SI != 0, reason="other shard")
    def test_gpu_cuda_graph():
        _graph_check()


def _quant_check():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 30
    s = torch.tensor([0.05], device="cuda")
    out = poison(x.shape, FP8)
    tpa.static_fp8_quant(out, x, s)
    assert torch.equal(out.view(torch.uint8), tpa.static_fp8_quant_reference(x, s).view(torch.uint8))
    v = torch.linspace(-500, 500, 100003, device="cuda")
    assert torch.equal(tpa.fp8_round_via_triton(v).view(torch.uint8), v.clamp(-448, 448).to(FP8).view(torch.uint8))
    # ties / neighbours of ties / subnormals through the quant kernel, with and without the pre-round
    g = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    g = torch.sort(g[torch.isfinite(g)].unique()).values
    mids = (g[:-1] + g[1:]) / 2
    x = torch.cat([g, mids, -mids, torch.nextafter(mids, g[1:]), torch.nextafter(mids, g[:-1]),
                   torch.randn(100000) * 50, torch.tensor([449.0, 464.0, 465.0, -1e9, 7.93])]).cuda()
    ref = x.clamp(-448, 448).to(FP8).view(torch.uint8)
    saved = tpa.PRE_ROUND_FP8
    try:
        for pre in (True, False):
            tpa.PRE_ROUND_FP8 = pre
            out = poison(x.shape, FP8)
            tpa.static_fp8_quant(out, x, 1.0)
            assert torch.equal(out.view(torch.uint8), ref), f"quant kernel not exact, pre_round={pre}"
        tpa.PRE_ROUND_FP8 = False
        check_case([300, 1, 40], [300, 900, 1000], 32, 8, 128, 16)
    finally:
        tpa.PRE_ROUND_FP8 = saved


def _graph_check():
    q, kc, vc, qsl, sl, bt = make_batch([1] * 8, [900] * 8, 32, 8, 128, 16)
    out8 = poison(q.shape, FP8)
    os_ = torch.tensor([0.02], device="cuda")
    args = (q, kc, vc, out8, qsl, sl, bt, 1, 900, 128 ** -0.5)
    tpa.paged_attention(*args, output_scale=os_)
    torch.cuda.synchronize()
    ref = out8.clone()
    out8.view(torch.uint8).fill_(0xFF)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tpa.paged_attention(*args, output_scale=os_)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out8.view(torch.uint8), ref.view(torch.uint8))


if __name__ == "__main__":
    if not HAVE_CUDA:
        print("SKIP: needs a CUDA GPU")
        sys.exit(0)
    fails = 0
    for case in CASES:
        name, ql, kl, Hq, Hkv, D, bs, extra = case
        try:
            err = check_case(ql, kl, Hq, Hkv, D, bs, **extra)
            print(f"PASS {name}: rel err {err:.2e}")
        except Exception as e:  # noqa: BLE001
            fails += 1
            print(f"FAIL {name}: {e!r}")
    for fn in (_quant_check, _graph_check):
        try:
            fn(); print(f"PASS {fn.__name__}")
        except Exception as e:  # noqa: BLE001
            fails += 1
            print(f"FAIL {fn.__name__}: {e!r}")
    sys.exit(1 if fails else 0)
