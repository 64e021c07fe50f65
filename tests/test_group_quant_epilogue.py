"""CPU tests (TRITON_INTERPRET=1) of the kernel's dynamic per-token-group FP8 epilogue (issue 14).

``paged_attention(..., out=fp8, output_group_scale=s)`` must write exactly what vLLM 0.8.5's
``per_token_group_quant_fp8`` (group = head size) gives for this same kernel's bf16 output: every
FP8 element and every fp32 scale, bit for bit, in row-major ([T, Hq]) and column-major (strides
(1, T), CUTLASS) scale layouts; prefill tiles, split-KV decode (quant after the reduce), mixed
batches, padding rows.  Outputs and scales start poisoned (NaN).  The oracle is the torch form of
vLLM's kernel (``group_fp8_quant_reference``; vLLM's Triton kernel itself cannot serve as the oracle
here: the interpreter's fp32->fp8 cast is wrong, DESIGN.md section 4), itself checked against a
float64 re-derivation; the attention against the float64 reference.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vllm_overlay.triton_paged_attention as tpa  # noqa: E402
from tests.test_triton_paged_attention import DEV, FP8, make_batch, poison  # noqa: E402

CASES = {
    # name: (q_lens, kv_lens, Hq, Hkv, D, splits, t_pad)
    "prefill": ([7, 12, 3], [7, 20, 3], 4, 2, 128, None, 0),
    "prefill-pad": ([5, 9], [5, 9], 2, 1, 128, None, 3),
    "mixed": ([1, 6, 1], [9, 6, 17], 4, 2, 128, None, 0),
    "decode-split": ([1, 1, 1], [40, 70, 17], 4, 2, 128, 3, 2),
    "decode-gqa-d64": ([1, 1], [33, 50], 8, 2, 64, 4, 0),
}


def scale_buffer(T, H, column_major):
    s = torch.full((H, T) if column_major else (T, H), float("nan"), dtype=torch.float32, device=DEV)
    return s.t() if column_major else s


def test_group_reference_is_vllm_arithmetic():
    """The torch oracle == a float64 re-derivation of vLLM's formula (the fp32 steps are exact
    or correctly rounded, so it must agree bit for bit), including all-zero groups and both
    layouts."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(9, 512, generator=g) * 3).to(torch.bfloat16)
    x[2, 128:256] = 0
    for cm in (False, True):
        q, s = tpa.group_fp8_quant_reference(x, 128, column_major=cm)
        assert s.shape == (9, 4) and (s.stride() == (1, 9)) == cm
        y = x.float().reshape(9, 4, 128)
        amax = y.abs().amax(-1).clamp(min=torch.tensor(1e-10, dtype=torch.float32))
        s_ref = amax / 448.0
        assert torch.equal(s, s_ref)
        q_ref = (y.double() / s_ref.double()[..., None]).float()  # fp32 division, correctly rounded
        q_ref = q_ref.clamp(-448, 448).to(FP8).reshape(9, 512)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert float(s[2, 1]) == float(torch.tensor(1e-10, dtype=torch.float32) / 448)


@pytest.mark.parametrize("stores", ["wide", "narrow"])  # narrow: forced (static FP8 gets it by default)
@pytest.mark.parametrize("column_major", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_group_epilogue_matches_bf16_then_vllm_group_quant(case, column_major, stores):
    q_lens, kv_lens, Hq, Hkv, D, splits, t_pad = CASES[case]
    q, kc, vc, qsl, sl, bt = make_batch(q_lens, kv_lens, Hq, Hkv, D, 16, t_pad=t_pad, seed=3)
    T = q.shape[0]
    args = (qsl, sl, bt, max(q_lens), max(kv_lens), 1.0 / math.sqrt(D))
    tpa.CONFIG_OVERRIDE.clear()
    tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = 0 if stores == "narrow" else 1 << 62
    if splits is not None:
        tpa.CONFIG_OVERRIDE["num_splits"] = splits
    try:
        bf16 = poison(q.shape, torch.bfloat16)
        tpa.paged_attention(q, kc, vc, bf16, *args)
        out = poison(q.shape, FP8)
        scales = scale_buffer(T, Hq, column_major)
        tpa.paged_attention(q, kc, vc, out, *args, output_group_scale=scales)
    finally:
        tpa.CONFIG_OVERRIDE.clear()
    assert not out.float().isnan().any(), "unwritten FP8 elements"
    assert not scales.isnan().any(), "unwritten scales"
    want_q, want_s = tpa.group_fp8_quant_reference(bf16.reshape(T, Hq * D), D)
    assert torch.equal(scales, want_s)
    assert torch.equal(out.reshape(T, Hq * D).view(torch.uint8), want_q.view(torch.uint8))
    # and the attention itself is right: dequantized vs float64 reference
    ref = tpa.reference_paged_attention(q, kc, vc, *args)
    deq = out.double() * scales.double()[..., None]
    assert float((deq - ref).norm() / ref.norm()) < 0.05


def test_group_scale_validation():
    q, kc, vc, qsl, sl, bt = make_batch([3], [3], 2, 1, 128, 16)
    args = (qsl, sl, bt, 3, 3, 0.1)
    out = torch.empty(q.shape, dtype=FP8, device=DEV)
    with pytest.raises(ValueError, match="float32"):
        tpa.paged_attention(q, kc, vc, out, *args, output_group_scale=torch.empty(3, 3, device=DEV))
    with pytest.raises(ValueError, match="float8"):
        tpa.paged_attention(q, kc, vc, torch.empty_like(q), *args,
                            output_group_scale=torch.empty(3, 2, device=DEV))
