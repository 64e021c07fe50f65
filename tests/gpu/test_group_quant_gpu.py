"""GPU tests of the kernel's dynamic per-token-group FP8 epilogue (``output_group_scale``, group =
head size D) on realistic shapes (needs CUDA; skipped otherwise).

Run: ``python3 -m pytest -q tests/gpu`` or ``python3 tests/gpu/test_group_quant_gpu.py`` (no pytest
needed); with vLLM's bundle first on PYTHONPATH (``gpu_harness/box_run.sh`` recipe) the vLLM check
runs too. GPU_TEST_SHARD=i/n as in test_triton_paged_attention_gpu.py.

Every case runs the kernel twice on the same inputs, bf16 (or fp16) out and FP8 out with group
scales (row-major [T, Hq] and column-major = ``torch.empty(Hq, T).t()``), outputs and scales
poisoned before the call, and checks the FP8 bytes and scales against quantizations of the kernel's
own bf16 output:

- bit for bit against vLLM 0.8.5's ``per_token_group_quant_fp8`` formula with its two divisions
  (amax / 448, x / s) done by Triton's ``/`` (``group_quant_triton_div``; everything else torch),
  and against vLLM's own Triton kernel when vLLM imports;
- against the torch oracle ``tpa.group_fp8_quant_reference``: scales within 2 fp32 ulp, FP8 codes
  within 1. Why not exact: Triton lowers fp32 ``/`` to PTX ``div.full.f32`` (not correctly
  rounded, max error 2 ulp), in the fused epilogue and in vLLM's kernel alike, while torch divides
  correctly rounded (so does the CPU interpreter, where tests/test_group_quant_epilogue.py is exact).
  A scale 1-2 ulp off moves an FP8 code only where x / s sits at a rounding tie, and then by 1.
  The mismatch counts are returned and printed in script mode;
- dequantized (fp8 * scale) against the float32 reference attention: rel-norm < 0.05.
"""

import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

try:
    import pytest
except ImportError:  # script mode
    pytest = None

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parents[1]))  # the repository (vllm_overlay)
sys.path.insert(0, str(_HERE))             # the sibling module, under the name pytest gives it
from test_triton_paged_attention_gpu import (_SI, _SN, FP8, HAVE_CUDA, fp8_code_distance,  # noqa: E402
                                             make_batch, new_token_kv, poison, tpa)

if pytest is not None:
    pytestmark = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU (Triton kernels compiled for it)")


@triton.jit
def _div_kernel(A, B, C, N, BY_FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a = tl.load(A + offs, mask=m, other=1.0)
    if BY_FP8_MAX:
        c = a / 448.0  # as the epilogue writes it: s = amax / 448.0
    else:
        c = a / tl.load(B + offs, mask=m, other=1.0)
    tl.store(C + offs, c, mask=m)


def triton_div(a, b=None):
    """fp32 a / b (b broadcast to a; None = 448) with Triton's ``/`` (div.full.f32)."""
    a = a.contiguous()
    c = torch.empty_like(a)
    by_448 = b is None
    b = a if by_448 else b.expand_as(a).contiguous()
    n = a.numel()
    _div_kernel[(triton.cdiv(n, 1024),)](a, b, c, n, BY_FP8_MAX=by_448, BLOCK=1024)
    return c


def group_quant_triton_div(x, group, column_major=False):
    """vLLM 0.8.5 per_token_group_quant_fp8 of 2-D x, torch except the two divisions (Triton's):
    s = max(amax, 1e-10) / 448, q = fp8(clamp(x / s, -448, 448)). Returns (q, s [M, K / group])."""
    M, K = x.shape
    y = x.to(torch.float32).reshape(M, K // group, group)
    amax = y.abs().amax(dim=-1).clamp(min=tpa.GROUP_EPS)
    s = triton_div(amax)
    q = triton_div(y, s[..., None]).clamp(-448.0, 448.0).to(FP8).reshape(M, K)
    return q, (s.t().contiguous().t() if column_major else s)


def scale_buffer(T, H, column_major, device="cuda"):
    s = torch.full((H, T) if column_major else (T, H), float("nan"), dtype=torch.float32, device=device)
    return s.t() if column_major else s


def fp32_ulp_distance(a, b):
    """|a - b| in units in the last place, for positive fp32 tensors."""
    return (a.contiguous().view(torch.int32).long() - b.contiguous().view(torch.int32).long()).abs()


def run_group_case(q_lens, kv_lens, Hq, Hkv, D, bs, column_major, dtype=torch.bfloat16, t_pad=0, dense=False,
                   split=False, seed=0, narrow_from=None):
    """The kernel's bf16 and group-FP8 outputs of one batch: (q, kc, vc, args, own, out, scales).
    narrow_from: CONFIG_OVERRIDE["narrow_fp8_store"] for the group-FP8 call (None: the kernel's default)."""
    q, kc, vc, qsl, sl, bt = make_batch(q_lens, kv_lens, Hq, Hkv, D, bs, dtype, t_pad=t_pad, seed=seed)
    kv_in = {}
    if dense:  # the new tokens' K/V, contiguous [T, Hkv, D], as the benchmark passes them
        key, value = new_token_kv(kc, vc, q_lens, kv_lens, bt, dtype, t_pad)
        kv_in = dict(key=key, value=value)
    if split:  # the case must exercise split-KV decode (quant after the reduce)
        bn = tpa._decode_config(max(16, tpa._next_pow2(D)), Hq // Hkv, False)["BLOCK_N"]
        assert max(q_lens) == 1 and tpa._num_splits(len(q_lens), Hkv, max(kv_lens), bn, tpa._num_sms(q.device)) > 1
    T = q.shape[0]
    args = (qsl, sl, bt, max(q_lens), max(kv_lens), 1.0 / math.sqrt(D))
    own = poison(q.shape, dtype)
    tpa.paged_attention(q, kc, vc, own, *args, **kv_in)
    out = poison(q.shape, FP8)
    scales = scale_buffer(T, Hq, column_major, q.device)
    if narrow_from is not None:
        tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = narrow_from
    try:
        tpa.paged_attention(q, kc, vc, out, *args, output_group_scale=scales, **kv_in)
    finally:
        tpa.CONFIG_OVERRIDE.pop("narrow_fp8_store", None)
    torch.cuda.synchronize()
    assert not own.isnan().any(), "unwritten / NaN bf16 output"
    assert not out.float().isnan().any(), "unwritten FP8 elements"
    assert not scales.isnan().any(), "unwritten scales"
    return q, kc, vc, args, own, out, scales


def check_group_case(q_lens, kv_lens, Hq, Hkv, D, bs, column_major, **kw):
    q, kc, vc, args, own, out, scales = run_group_case(q_lens, kv_lens, Hq, Hkv, D, bs, column_major, **kw)
    T, n = q.shape[0], sum(q_lens)
    x = own.reshape(T, Hq * D)
    got_q = out.reshape(T, Hq * D)
    # 1. exact: vLLM's formula, Triton's division (what vLLM's Triton kernel computes)
    want_q, want_s = group_quant_triton_div(x, D)
    assert torch.equal(scales[:n], want_s[:n]), \
        f"{int((scales[:n] != want_s[:n]).sum())} scales != group quant of own bf16 out (Triton division)"
    assert torch.equal(scales[n:], want_s[n:]), (
        f"padding-row scales {scales[n:].unique().tolist()} != Triton's 1e-10 / 448 {want_s[n:].unique().tolist()} "
        "(pure decode pads scales in torch, correctly rounded)")
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)), \
        f"{int((got_q.view(torch.uint8) != want_q.view(torch.uint8)).sum())} FP8 bytes != group quant of own bf16 out"
    # 2. the torch oracle (correctly rounded division): <= 2 ulp / 1 code, see the module docstring
    tq, ts = tpa.group_fp8_quant_reference(x, D, column_major=column_major)
    ulp = fp32_ulp_distance(scales, ts)
    code = fp8_code_distance(got_q, tq)
    assert int(ulp.max()) <= 2, f"scale {int(ulp.max())} ulp from the torch oracle"
    assert int(code.max()) <= 1, f"FP8 code {int(code.max())} steps from the torch oracle"
    # 3. the attention: bf16 and dequantized FP8 vs the float32 reference
    ref = tpa.reference_paged_attention(q, kc, vc, *args)
    err_bf = float((own.float() - ref).norm() / ref.norm())
    deq = out.float() * scales[..., None]
    err = float((deq - ref).norm() / ref.norm())
    assert err_bf < 1e-2, f"bf16 rel err {err_bf}"
    assert err < 0.05, f"dequantized rel err {err}"
    return dict(err=err, scales_off_torch=int((ulp > 0).sum()), codes_off_torch=int((code > 0).sum()),
                n_scales=ulp.numel(), n_codes=code.numel())


CASES = [
    # name, q_lens, kv_lens, Hq, Hkv, D, block size, extra
    ("prefill_ctx_bs16", [700, 333], [1500, 900], 32, 8, 128, 16, {}),
    ("prefill_ctx_bs32_pad", [700, 333], [1500, 900], 32, 8, 128, 32, {"t_pad": 5}),
    ("dense_prefill_bs16", [700, 333], [700, 333], 32, 8, 128, 16, {"dense": True}),
    ("dense_prefill_ctx_bs32_pad", [700, 333], [1500, 900], 32, 8, 128, 32, {"dense": True, "t_pad": 3}),
    ("dense_prefill_8x512", [512] * 8, [512] * 8, 32, 8, 128, 16, {"dense": True}),
    # a long prefill with a decode and padding, the default stores: narrow on triton 3.2 (with the bf16
    # kernel's config, so byte-equal to quant(own bf16 out) there too), wide on 3.6 (same config as bf16)
    ("dense_prefill_2048_dec_pad", [2048, 1], [2048, 700], 32, 8, 128, 16, {"dense": True, "t_pad": 3}),
    # the same with narrow stores forced from 1024 tokens (the other triton's choice of stores)
    ("dense_prefill_1024_narrow", [1024, 1], [1024, 300], 32, 8, 128, 16,
     {"dense": True, "t_pad": 1, "narrow_from": 1024}),
    ("decode_split_pad", [1] * 4, [16384, 100, 8000, 16000], 32, 8, 128, 16, {"split": True, "t_pad": 4}),
    ("decode_split_g5_bs32", [1] * 3, [9000, 3000, 12000], 40, 8, 128, 32, {"split": True}),
    ("decode_b64_ctx2048", [1] * 64, [2048] * 64, 32, 8, 128, 16, {}),
    ("mixed_dense_pad", [512, 1, 1, 200, 1, 1], [512, 3000, 800, 1000, 5000, 1], 32, 8, 128, 16,
     {"dense": True, "t_pad": 2}),
    ("mixed_paged_bs32", [300, 1, 64, 1], [1200, 4000, 64, 700], 32, 8, 128, 32, {}),
    ("mixed_dense_fp16_d64", [256, 1, 1, 90], [256, 2500, 33, 600], 16, 4, 64, 16,
     {"dense": True, "dtype": torch.float16}),
]
PARAMS = [(c, cm) for c in CASES for cm in (False, True)]
PARAMS = [p for i, p in enumerate(PARAMS) if i % _SN == _SI]
# vLLM's own kernel vs the fused one: a prefill-path batch with padding and a split pure decode with padding
VLLM_CASES = [c for c in CASES if c[0] in ("mixed_dense_pad", "decode_split_pad")]


def _param_id(p):
    return f"{p[0][0]}-{'colmajor' if p[1] else 'rowmajor'}"


def vllm_group_quant():
    """vLLM's per_token_group_quant_fp8, or (None, why)."""
    try:
        from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8
    except Exception as e:  # noqa: BLE001  (no vLLM, or its import fails on this box)
        return None, f"vLLM not importable ({type(e).__name__}: {str(e)[:160]}); put the vLLM bundle " \
                     "site on PYTHONPATH (gpu_harness/box_run.sh)"
    return per_token_group_quant_fp8, None


def check_vllm_case(q_lens, kv_lens, Hq, Hkv, D, bs, column_major, **kw):
    fn, why = vllm_group_quant()
    if fn is None:
        return why
    q, kc, vc, args, own, out, scales = run_group_case(q_lens, kv_lens, Hq, Hkv, D, bs, column_major, **kw)
    T = q.shape[0]
    vq, vs = fn(own.reshape(T, Hq * D), D, dtype=FP8, column_major_scales=column_major)
    torch.cuda.synchronize()
    assert vs.shape == scales.shape and vs.stride() == scales.stride()
    assert torch.equal(scales, vs), f"{int((scales != vs).sum())} scales != vLLM per_token_group_quant_fp8"
    assert torch.equal(out.reshape(T, -1).view(torch.uint8), vq.view(torch.uint8)), \
        f"{int((out.reshape(T, -1).view(torch.uint8) != vq.view(torch.uint8)).sum())} FP8 bytes != vLLM's"
    return None


if pytest is not None:
    @pytest.mark.parametrize("p", PARAMS, ids=[_param_id(p) for p in PARAMS])
    def test_group_quant_case(p):
        (name, ql, kl, Hq, Hkv, D, bs, extra), cm = p
        check_group_case(ql, kl, Hq, Hkv, D, bs, cm, **extra)

    @pytest.mark.skipif(_SI != 0, reason="other shard")
    @pytest.mark.parametrize("column_major", [False, True], ids=["rowmajor", "colmajor"])
    @pytest.mark.parametrize("case", VLLM_CASES, ids=[c[0] for c in VLLM_CASES])
    def test_group_quant_equals_vllm_kernel(case, column_major):
        name, ql, kl, Hq, Hkv, D, bs, extra = case
        why = check_vllm_case(ql, kl, Hq, Hkv, D, bs, column_major, **extra)
        if why:
            pytest.skip(why)


if __name__ == "__main__":
    if not HAVE_CUDA:
        print("SKIP: needs a CUDA GPU")
        sys.exit(0)
    fails = 0
    for p in PARAMS:
        (name, ql, kl, Hq, Hkv, D, bs, extra), cm = p
        try:
            r = check_group_case(ql, kl, Hq, Hkv, D, bs, cm, **extra)
            print(f"PASS {_param_id(p)}: rel err {r['err']:.2e}; vs torch oracle {r['scales_off_torch']}/"
                  f"{r['n_scales']} scales 1-2 ulp off, {r['codes_off_torch']}/{r['n_codes']} codes 1 off")
        except Exception as e:  # noqa: BLE001
            fails += 1
            print(f"FAIL {_param_id(p)}: {e!r}")
    if _SI == 0:
        for case in VLLM_CASES:
            for cm in (False, True):
                name, ql, kl, Hq, Hkv, D, bs, extra = case
                tag = f"vllm {name}-{'colmajor' if cm else 'rowmajor'}"
                try:
                    why = check_vllm_case(ql, kl, Hq, Hkv, D, bs, cm, **extra)
                    print(f"SKIP {tag}: {why}" if why else f"PASS {tag}")
                except Exception as e:  # noqa: BLE001
                    fails += 1
                    print(f"FAIL {tag}: {e!r}")
    sys.exit(1 if fails else 0)
