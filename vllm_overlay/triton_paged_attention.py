"""Paged attention for vLLM's V1 KV-cache layout with an optional fused static FP8 output quant.

Pure torch + triton (no vLLM import): runs with triton 3.2 (torch 2.6 / vLLM 0.8.5) and triton 3.6.

Public API
----------
``paged_attention(query, key_cache, value_cache, out, query_start_loc, seq_lens, block_table,
max_query_len, max_seq_len, softmax_scale, sliding_window=None, k_scale=None, v_scale=None,
output_scale=None)``
    Causal attention of a batch mixing prefills, chunked prefills with context and decodes, reading K/V
    from a paged cache in the "flash" layout ``[num_blocks, block_size, Hkv, D]``.  ``out`` may be
    bf16/fp16 (stock) or ``torch.float8_e4m3fn`` (fused static quant, needs ``output_scale``).

``reference_paged_attention(...)``
    Same arguments (minus ``out``), plain torch, returns float64 (CPU) / float32 (GPU) ``[T, Hq, D]``.

``static_fp8_quant(out, x, scale)`` / ``static_fp8_quant_reference(x, scale)``
    vLLM's ``static_scaled_fp8_quant`` semantics: ``fp8_e4m3fn(clamp(x * (1/scale), -448, 448))``,
    round-to-nearest-even, reciprocal computed in fp32 with IEEE division.

FP8 output semantics (fused path)
---------------------------------
The fp32 attention result ``o = acc / l * v_scale`` is first rounded to the *query dtype*
(bf16/fp16), then quantized exactly like ``static_fp8_quant`` would quantize the bf16 tensor that the
unfused path writes.  The fused output is therefore bit-identical to
``static_fp8_quant(paged_attention(..., out=bf16))`` of this same kernel.  NaN inputs are not
specified (the clamp's NaN handling differs between backends).

The fp32 -> e4m3 conversion: clamp to [-448, 448], round to the e4m3 grid in fp32 with exact
arithmetic (``_round_to_e4m3_grid``), then cast.  The cast of an already representable value is exact
everywhere, which sidesteps the TRITON_INTERPRET=1 converter (it rounds ties away from zero and drops
the mantissa carry in triton 3.2 and 3.6).  On GPUs with triton >= 3.3 the pre-round is skipped: the
hardware cast (cvt.rn.satfinite) is itself exact RNE, verified bit-exact on H100 / triton 3.6; see
``PRE_ROUND_FP8``.

Validation is cheap and host-side only (dtypes, ranks, shapes, strides): ``output_scale`` values are
NOT checked (a host check would force a device sync); a scale <= 0 or non-finite gives garbage.
"""

import math
import os
from typing import Optional, Union

import torch
import triton
import triton.language as tl

__all__ = [
    "paged_attention",
    "reference_paged_attention",
    "static_fp8_quant",
    "static_fp8_quant_reference",
    "group_fp8_quant_reference",
]

FP8_E4M3_MAX = 448.0
# Read once at import, like triton.jit itself: under the interpreter, dots run on fp32 upcasts.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Pre-round fp32 -> e4m3 grid before the cast. Always on under the interpreter (its cast is wrong).
# On the GPU the cast itself (sm_89+/sm_90: cvt.rn.satfinite.e4m3x2.f32) is exact RNE: verified
# bit-exact against torch on the H100 with triton 3.6 and with triton 3.2 (tests/gpu, _quant_check
# runs both settings), so it is skipped on the GPU (it cost up to 7% on short prefills).
# Module-level switch, read at every launch: True forces it.
PRE_ROUND_FP8 = False
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------
# FP8 rounding helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3_grid(y):
    """Round fp32 ``y`` (already clamped to [-448, 448]) to the nearest e4m3fn value, ties to even.

    Exact fp32 arithmetic: with quantum q = 2**k (k = max(exponent - 3, -9)), |y| / q < 16 and
    (|y| / q + 1.5 * 2**23) - 1.5 * 2**23 rounds it to an integer with the FPU's round-to-nearest-even.
    Power-of-two scalings are exact; a carry into the next binade comes out right by itself.
    The sign bit is copied back so -0.0 stays -0.0.
    """
    bits = y.to(tl.int32, bitcast=True)
    abs_bits = bits & 0x7FFFFFFF
    sign = bits ^ abs_bits
    a = abs_bits.to(tl.float32, bitcast=True)
    e = (abs_bits >> 23) - 127
    k = tl.maximum(e - 3, -9)
    down = ((127 - k) << 23).to(tl.float32, bitcast=True)  # 2**-k
    up = ((127 + k) << 23).to(tl.float32, bitcast=True)  # 2**k
    r = (a * down + 12582912.0) - 12582912.0
    r = r * up
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quant_e4m3(y, inv_scale, PRE_ROUND: tl.constexpr):
    """fp32 ``y`` -> clamp(y * inv_scale) rounded to the e4m3 grid (still fp32) when PRE_ROUND.

    Without PRE_ROUND the caller's cast does the RNE rounding (hardware cvt.rn.satfinite: exact);
    with it the value is already representable, so any cast (the interpreter's too) is exact.
    """
    y = y * inv_scale
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if PRE_ROUND:
        y = _round_to_e4m3_grid(y)
    return y


@triton.jit
def _load_inv_scale(scale_ptr_or_val, SCALE_IS_PTR: tl.constexpr):
    if SCALE_IS_PTR:
        s = tl.load(scale_ptr_or_val).to(tl.float32)
    else:
        s = scale_ptr_or_val  # fp32 scalar argument (a python float under the interpreter)
    return tl.math.div_rn(1.0, s)


@triton.jit
def _load_scale(scale_ptr_or_val, SCALE_IS_PTR: tl.constexpr):
    if SCALE_IS_PTR:
        s = tl.load(scale_ptr_or_val).to(tl.float32)
    else:
        s = scale_ptr_or_val
    return s


@triton.jit
def _round_trip_e4m3_kernel(X, Y, N, BLOCK: tl.constexpr):
    """Test helper. X: [N] fp32 (already clamped), Y: [N] fp8e4nv = cast(_round_to_e4m3_grid(X))."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0)
    y = _round_to_e4m3_grid(tl.minimum(tl.maximum(x, -448.0), 448.0))
    tl.store(Y + offs, y.to(tl.float8e4nv), mask=mask)


def fp8_round_via_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [N] float32 -> [N] float8_e4m3fn via the kernel-side rounding helper (clamps first)."""
    x = x.contiguous().float()
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    _round_trip_e4m3_kernel[(triton.cdiv(n, 1024),)](x, y, n, BLOCK=1024)
    return y


# ----------------------------------------------------------------------------------------------------
# Standalone static FP8 quant (unfused baseline) + reference
# ----------------------------------------------------------------------------------------------------


def static_fp8_quant_reference(x: torch.Tensor, scale) -> torch.Tensor:
    """vLLM static_scaled_fp8_quant in torch: fp8_e4m3fn(clamp(x * (1/scale), -448, 448)), RNE.

    x: any shape, any float dtype; scale: float32 tensor [1] or python float (dequant scale).
    """
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1)[:1]
    inv = torch.ones_like(s) / s
    y = (x.to(torch.float32) * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(torch.float8_e4m3fn)


GROUP_EPS = 1e-10   # vLLM's per_token_group_quant_fp8 eps


def _empty_group_scale(like: torch.Tensor) -> torch.Tensor:
    """The scale vLLM's group quant gives an all-zero group: max(0, 1e-10) / 448 in fp32."""
    eps = torch.full(like.shape, GROUP_EPS, dtype=torch.float32, device=like.device)
    return eps / FP8_E4M3_MAX


def group_fp8_quant_reference(x: torch.Tensor, group_size: int, column_major: bool = False):
    """vLLM 0.8.5 ``per_token_group_quant_fp8`` in torch: x [..., K] (K % group_size == 0) ->
    (fp8 [..., K], fp32 scales [..., K / group_size]); per group s = max(amax(x), 1e-10) / 448 and
    q = fp8_e4m3fn(clamp(x / s, -448, 448)) (fp32, true division, RNE).  ``column_major``: scales
    of a 2-D x are returned with strides (1, M), as vLLM allocates them for CUTLASS."""
    k = x.shape[-1]
    y = x.to(torch.float32).reshape(*x.shape[:-1], k // group_size, group_size)
    amax = torch.clamp(y.abs().amax(dim=-1, keepdim=True), min=GROUP_EPS)
    s = amax / FP8_E4M3_MAX
    q = (y / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).reshape(x.shape)
    s = s.squeeze(-1)
    if column_major:
        s = s.t().contiguous().t()
    return q, s


@triton.jit
def _static_fp8_quant_kernel(X, Y, scale, N, SCALE_IS_PTR: tl.constexpr, BLOCK: tl.constexpr,
                             PRE_ROUND: tl.constexpr):
    """X: [N] bf16/fp16/fp32 contiguous, Y: [N] fp8e4nv; Y = quant(X * (1/scale))."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inv = _load_inv_scale(scale, SCALE_IS_PTR)
    if pid * BLOCK + BLOCK <= N:
        x = tl.load(X + offs).to(tl.float32)
        tl.store(Y + offs, _quant_e4m3(x, inv, PRE_ROUND).to(tl.float8e4nv))
    else:
        mask = offs < N
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, _quant_e4m3(x, inv, PRE_ROUND).to(tl.float8e4nv), mask=mask)


_QUANT_CFG = {"BLOCK": 4096, "num_warps": 4}


def static_fp8_quant(out: torch.Tensor, x: torch.Tensor, scale) -> None:
    """out: float8_e4m3fn, same shape as x (both contiguous); x: bf16/fp16/fp32; scale: fp32 [1]."""
    if out.dtype != torch.float8_e4m3fn:
        raise ValueError(f"static_fp8_quant: out must be float8_e4m3fn, got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"static_fp8_quant: shape mismatch {tuple(out.shape)} vs {tuple(x.shape)}")
    if not (out.is_contiguous() and x.is_contiguous()):
        raise ValueError("static_fp8_quant: out and x must be contiguous")
    scale_is_ptr = isinstance(scale, torch.Tensor)
    n = x.numel()
    if n == 0:
        return
    blk = _QUANT_CFG["BLOCK"]
    _static_fp8_quant_kernel[(triton.cdiv(n, blk),)](
        x, out, scale, n, SCALE_IS_PTR=scale_is_ptr, BLOCK=blk, PRE_ROUND=PRE_ROUND_FP8 or _INTERPRET,
        num_warps=_QUANT_CFG["num_warps"])


# ----------------------------------------------------------------------------------------------------
# Attention kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _kv_tile_loop(acc, l_i, m_i, q, K, V, bt_row, k_head_off, v_head_off,
                  stride_kb, stride_ks, stride_vb, stride_vs,
                  start, end, kv_hi, pos, qk_scale, offs_n, offs_d,
                  BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr,
                  KV_BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
                  DOT_F32: tl.constexpr, DENSE: tl.constexpr):
    """Online-softmax over keys [start, end) (start, end multiples of BLOCK_N except end == kv_hi).

    q: [BLOCK_M, HEAD_D_PAD]; acc: [BLOCK_M, HEAD_D_PAD] fp32; l_i, m_i: [BLOCK_M] fp32 (log2 domain);
    pos: [BLOCK_M] absolute query position of each row. MASKED applies causal / window / kv_hi masks.
    Paged (DENSE=False): key n is slot n % KV_BLOCK_SIZE of block bt_row[n // KV_BLOCK_SIZE], K/V are
    the caches, stride_kb/stride_ks = block/slot strides. DENSE: K/V are the contiguous new-token
    key/value inputs [T, Hkv, D]; key n is row n + bt_row (bt_row = q_start - ctx, an int), stride_kb =
    row stride; no block-table load, so the loads depend on the loop counter only.
    """
    dmask = offs_d < HEAD_D
    for start_n in range(start, end, BLOCK_N):
        n = start_n + offs_n
        if MASKED:
            nvalid = n < kv_hi
        if DENSE:
            row = (n + bt_row).to(tl.int64)
            k_off = row * stride_kb + k_head_off
            v_off = row * stride_vb + v_head_off
        else:
            if MASKED:
                blk = tl.load(bt_row + n // KV_BLOCK_SIZE, mask=nvalid, other=0)
            else:
                blk = tl.load(bt_row + n // KV_BLOCK_SIZE)
            slot = n % KV_BLOCK_SIZE
            k_off = blk.to(tl.int64) * stride_kb + slot * stride_ks + k_head_off
            v_off = blk.to(tl.int64) * stride_vb + slot * stride_vs + v_head_off
        k_ptrs = K + k_off[:, None] + offs_d[None, :]
        v_ptrs = V + v_off[:, None] + offs_d[None, :]
        if MASKED:
            if HEAD_D == HEAD_D_PAD:
                k = tl.load(k_ptrs, mask=nvalid[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=nvalid[:, None] & dmask[None, :], other=0.0)
        else:
            if HEAD_D == HEAD_D_PAD:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=dmask[None, :], other=0.0)
        if DOT_F32:  # interpreter: its tl.dot multiplies the raw uint16 bits of bf16 operands
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(q.dtype).to(tl.float32)))
        else:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)))
        if MASKED:
            vis = n[None, :] <= pos[:, None]
            if SLIDING_WINDOW > 0:
                vis = vis & (n[None, :] > pos[:, None] - SLIDING_WINDOW)
            qk = tl.where(vis, qk, float("-inf"))
        # scale folded into the exp2 argument (one FMA per score); m_i is in scaled log2 units
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            if HEAD_D == HEAD_D_PAD:
                v = tl.load(v_ptrs, mask=nvalid[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=nvalid[:, None] & dmask[None, :], other=0.0)
        else:
            if HEAD_D == HEAD_D_PAD:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(p.to(q.dtype).to(tl.float32), v.to(q.dtype).to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _out_cols(offs_d, NARROW: tl.constexpr):
    """Column offsets [HEAD_D_PAD] for the output store.

    Triton's coalescing gives all loads and stores that share index arithmetic the widest vector any
    of them can use, among those of the same tensor shape. A contiguous fp8 store can use 16 elements
    (16 bytes) per thread, so where a K/V tile has the output tile's shape (BLOCK_N == BLOCK_M) the
    bf16 K/V copies of the main loop widen to 16 elements per thread (two 16-byte copies per chunk,
    more address registers) instead of the bf16 kernel's 8. NARROW writes the same offsets as
    (d // 8) * 8 + d % 8, whose provable contiguity is 8: 8-byte fp8 stores, 8 bf16 per K/V copy.
    """
    if NARROW:
        return (offs_d // 8) * 8 + offs_d % 8
    return offs_d


@triton.jit
def _store_output(Out, o_ptrs, o, mask, inv_out_scale, OutS, s_offs, s_mask,
                  OUT_FP8: tl.constexpr, Q_BF16: tl.constexpr, PRE_ROUND: tl.constexpr,
                  OUT_GROUP: tl.constexpr):
    """o: fp32 final attention values [rows, HEAD_D_PAD], one row = one (token, head).

    FP8: round through the query dtype, then the static quant, or (OUT_GROUP) vLLM's dynamic
    per-token-group quant with group = head: s = max(amax(row), 1e-10) / 448, q = fp8(clamp(row / s)),
    s stored at OutS + s_offs (fp32, one per row; rows where s_mask).
    """
    if OUT_FP8:
        if Q_BF16:
            o = o.to(tl.bfloat16).to(tl.float32)
        else:
            o = o.to(tl.float16).to(tl.float32)
        if OUT_GROUP:
            # vLLM 0.8.5 fp8_utils._per_token_group_quant_fp8, same operations in the same order
            amax = tl.maximum(tl.max(tl.where(mask, tl.abs(o), 0.0), 1), 1e-10)
            s = amax / 448.0
            y = o / s[:, None]
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            if PRE_ROUND:
                y = _round_to_e4m3_grid(y)
            tl.store(o_ptrs, y.to(tl.float8e4nv), mask=mask)
            tl.store(OutS + s_offs, s, mask=s_mask)
        else:
            tl.store(o_ptrs, _quant_e4m3(o, inv_out_scale, PRE_ROUND).to(tl.float8e4nv), mask=mask)
    else:
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _paged_attn_fwd_kernel(
    Q, K, V, Out, QSL, SeqLens, BT, WsAcc, WsML, KD, VD, OutS,
    k_scale, v_scale, out_scale,
    softmax_scale, num_seqs, num_tokens, num_splits,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_st, stride_sh, stride_kdt, stride_kdh, stride_vdt, stride_vdh,
    G: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    KS_PTR: tl.constexpr, VS_PTR: tl.constexpr, OS_PTR: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
    OUT_FP8: tl.constexpr, Q_BF16: tl.constexpr, OUT_GROUP: tl.constexpr,
    SEQ_GRID: tl.constexpr, SKIP_DECODE: tl.constexpr, USE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
    PRE_ROUND: tl.constexpr, DENSE_KV: tl.constexpr, NARROW_OUT: tl.constexpr,
):
    """One program: BLOCK_Q query tokens x the G query heads of one KV head (rows = BLOCK_M >= BLOCK_Q*G).

    Q: [T, Hq, D]; K, V: [num_blocks, KV_BLOCK_SIZE, Hkv, D]; Out: [T, Hq, D]; QSL: [B+1]; SeqLens: [B];
    BT: [B, max_blocks]. Tile grid (SEQ_GRID=False): axis0 = cdiv(T, BLOCK_Q) + B "q tiles", found by a
    binary search over QSL[s] // BLOCK_Q + s; programs past the last sequence zero the padding rows
    [QSL[B], T). Decode grid (SEQ_GRID=True): axis0 = sequence, only q_len == 1 sequences, BLOCK_Q = 1.
    axis1 = KV head; axis2 = KV split (USE_SPLIT: fp32 partials to WsAcc [B, Hq, S, D_PAD] and
    WsML [B, Hq, S, 2] (m, l), merged and quantized by _split_reduce_kernel).
    DENSE_KV (tile mode): keys at positions >= dense_lo = ceil(ctx / BLOCK_N) * BLOCK_N (the sequence's
    own new tokens, whole tiles) are read from the contiguous key/value inputs KD/VD [T, Hkv, D]
    instead of the paged cache (same values: the cache was written from them), the context from the cache.
    """
    if SEQ_GRID:
        pid = tl.program_id(0)
    else:
        # reversed: the last (longest causal) q tiles of the last sequences start first
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    sid = tl.program_id(2)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_D
    tok_in_tile = offs_m // G
    q_head = kvh * G + offs_m % G

    if SEQ_GRID:
        seq = pid
        j = 0
        q_start = tl.load(QSL + seq)
        q_len = tl.load(QSL + seq + 1) - q_start
        active = q_len == 1
    else:
        # binary search: largest s in [0, num_seqs] with QSL[s] // BLOCK_Q + s <= pid
        lo = pid * 0
        hi = pid * 0 + num_seqs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            val = tl.load(QSL + mid) // BLOCK_Q + mid
            ok = val <= pid
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        seq = lo
        q_start = tl.load(QSL + seq)
        j = pid - (q_start // BLOCK_Q + seq)
        if seq == num_seqs:
            # padding rows [QSL[B], T): write zeros once (split 0)
            tok = q_start + j * BLOCK_Q + tok_in_tile
            pmask = (tok_in_tile < BLOCK_Q) & (tok < num_tokens) & (sid == 0)
            o_ptrs = Out + tok.to(tl.int64)[:, None] * stride_ot + q_head[:, None] * stride_oh \
                + _out_cols(offs_d, NARROW_OUT)[None, :]
            zero = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
            s_offs = tok.to(tl.int64) * stride_st + q_head * stride_sh
            _store_output(Out, o_ptrs, zero, pmask[:, None] & dmask[None, :], 1.0, OutS, s_offs, pmask,
                          OUT_FP8, Q_BF16, PRE_ROUND, OUT_GROUP)
            q_len = q_start * 0
            active = q_start < 0
        else:
            q_len = tl.load(QSL + seq + 1) - q_start
            active = j * BLOCK_Q < q_len
            if SKIP_DECODE:
                active = active & (q_len != 1)

    if active:
        kv_len = tl.load(SeqLens + seq)
        ctx = kv_len - q_len
        tok = j * BLOCK_Q + tok_in_tile
        row_valid = (tok_in_tile < BLOCK_Q) & (tok < q_len)
        pos = ctx + tok
        q_tok = (q_start + tok).to(tl.int64)
        q_ptrs = Q + q_tok[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_valid[:, None] & dmask[None, :], other=0.0)

        min_pos = ctx + j * BLOCK_Q
        max_pos = ctx + tl.minimum(j * BLOCK_Q + BLOCK_Q, q_len) - 1
        kv_hi = max_pos + 1
        if SLIDING_WINDOW > 0:
            any_lo = tl.maximum(min_pos - SLIDING_WINDOW + 1, 0)
            full_lo = tl.maximum(max_pos - SLIDING_WINDOW + 1, 0)
            lo_tile = (any_lo // BLOCK_N) * BLOCK_N
            full_end = tl.maximum(((min_pos + 1) // BLOCK_N) * BLOCK_N, lo_tile)
            full_start = tl.minimum(tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo_tile),
                                    full_end)
        else:
            lo_tile = min_pos * 0
            full_end = ((min_pos + 1) // BLOCK_N) * BLOCK_N
            full_start = lo_tile
        if USE_SPLIT:
            n_tiles = tl.cdiv(kv_hi - lo_tile, BLOCK_N)
            per = tl.cdiv(n_tiles, num_splits)
            sp_lo = lo_tile + sid * per * BLOCK_N
            sp_hi = tl.minimum(sp_lo + per * BLOCK_N, kv_hi)
        else:
            sp_lo = lo_tile
            sp_hi = kv_hi

        if HAS_KV_SCALE:
            ks = _load_scale(k_scale, KS_PTR)
            vs = _load_scale(v_scale, VS_PTR)
        else:
            ks = 1.0
            vs = 1.0
        qk_scale = softmax_scale * ks * 1.4426950408889634

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
        bt_row = BT + seq.to(tl.int64) * stride_bt
        k_head_off = kvh * stride_kh
        v_head_off = kvh * stride_vh

        if DENSE_KV:
            dense_lo = ((ctx + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
            row_shift = q_start - ctx
            kd_head_off = kvh * stride_kdh
            vd_head_off = kvh * stride_vdh
        else:
            dense_lo = kv_hi
        # A: [lo_tile, full_start) masked (sliding-window lower edge)
        if SLIDING_WINDOW > 0:
            a_lo = tl.maximum(lo_tile, sp_lo)
            a_hi = tl.minimum(full_start, sp_hi)
            acc, l_i, m_i = _kv_tile_loop(
                acc, l_i, m_i, q, K, V, bt_row, k_head_off, v_head_off,
                stride_kb, stride_ks, stride_vb, stride_vs,
                a_lo, tl.minimum(a_hi, dense_lo), kv_hi, pos, qk_scale,
                offs_n, offs_d, BLOCK_N, HEAD_D, HEAD_D_PAD, KV_BLOCK_SIZE, True, SLIDING_WINDOW, DOT_F32, False)
            if DENSE_KV:
                acc, l_i, m_i = _kv_tile_loop(
                    acc, l_i, m_i, q, KD, VD, row_shift, kd_head_off, vd_head_off,
                    stride_kdt, 0, stride_vdt, 0,
                    tl.maximum(a_lo, dense_lo), a_hi, kv_hi, pos, qk_scale,
                    offs_n, offs_d, BLOCK_N, HEAD_D, HEAD_D_PAD, KV_BLOCK_SIZE, True, SLIDING_WINDOW, DOT_F32,
                    True)
        # B: [full_start, full_end) visible to every row: no masks
        b_lo = tl.maximum(full_start, sp_lo)
        b_hi = tl.minimum(full_end, sp_hi)
        acc, l_i, m_i = _kv_tile_loop(
            acc, l_i, m_i, q, K, V, bt_row, k_head_off, v_head_off,
            stride_kb, stride_ks, stride_vb, stride_vs,
            b_lo, tl.minimum(b_hi, dense_lo), kv_hi, pos, qk_scale,
            offs_n, offs_d, BLOCK_N, HEAD_D, HEAD_D_PAD, KV_BLOCK_SIZE, False, SLIDING_WINDOW, DOT_F32, False)
        if DENSE_KV:
            acc, l_i, m_i = _kv_tile_loop(
                acc, l_i, m_i, q, KD, VD, row_shift, kd_head_off, vd_head_off,
                stride_kdt, 0, stride_vdt, 0,
                tl.maximum(b_lo, dense_lo), b_hi, kv_hi, pos, qk_scale,
                offs_n, offs_d, BLOCK_N, HEAD_D, HEAD_D_PAD, KV_BLOCK_SIZE, False, SLIDING_WINDOW, DOT_F32,
                True)
        # C: [full_end, kv_hi) causal diagonal
        c_lo = tl.maximum(full_end, sp_lo)
        c_hi = tl.minimum(kv_hi, sp_hi)
        acc, l_i, m_i = _kv_tile_loop(
            acc, l_i, m_i, q, K, V, bt_row, k_head_off, v_head_off,
            stride_kb, stride_ks, stride_vb, stride_vs,
            c_lo, tl.minimum(c_hi, dense_lo), kv_hi, pos, qk_scale,
            offs_n, offs_d, BLOCK_N, HEAD_D, HEAD_D_PAD, KV_BLOCK_SIZE, True, SLIDING_WINDOW, DOT_F32, False)
        if DENSE_KV:
            acc, l_i, m_i = _kv_tile_loop(
                acc, l_i, m_i, q, KD, VD, row_shift, kd_head_off, vd_head_off,
                stride_kdt, 0, stride_vdt, 0,
                tl.maximum(c_lo, dense_lo), c_hi, kv_hi, pos, qk_scale,
                offs_n, offs_d, BLOCK_N, HEAD_D, HEAD_D_PAD, KV_BLOCK_SIZE, True, SLIDING_WINDOW, DOT_F32,
                True)

        if USE_SPLIT:
            # partials (unnormalized acc, m, l) for the decode reduce; rows = q heads of this kv head
            hmask = offs_m < G
            base = ((seq.to(tl.int64) * NUM_Q_HEADS + q_head) * num_splits + sid)
            ws_ptrs = WsAcc + base[:, None] * HEAD_D_PAD + offs_d[None, :]
            tl.store(ws_ptrs, acc, mask=hmask[:, None])
            tl.store(WsML + base * 2, m_i, mask=hmask)
            tl.store(WsML + base * 2 + 1, l_i, mask=hmask)
        else:
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            o = acc / l_safe[:, None]
            if HAS_KV_SCALE:
                o = o * vs
            if OUT_FP8 and not OUT_GROUP:
                inv_os = _load_inv_scale(out_scale, OS_PTR)
            else:
                inv_os = 1.0
            o_ptrs = Out + q_tok[:, None] * stride_ot + q_head[:, None] * stride_oh \
                + _out_cols(offs_d, NARROW_OUT)[None, :]
            s_offs = q_tok * stride_st + q_head * stride_sh
            _store_output(Out, o_ptrs, o, row_valid[:, None] & dmask[None, :], inv_os, OutS, s_offs, row_valid,
                          OUT_FP8, Q_BF16, PRE_ROUND, OUT_GROUP)


@triton.jit
def _split_reduce_kernel(
    Out, WsAcc, WsML, QSL, v_scale, out_scale, OutS, num_splits, stride_ot, stride_oh, stride_st, stride_sh,
    NUM_Q_HEADS: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr, VS_PTR: tl.constexpr, OS_PTR: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
    OUT_FP8: tl.constexpr, Q_BF16: tl.constexpr, PRE_ROUND: tl.constexpr, OUT_GROUP: tl.constexpr,
):
    """Merge split-KV partials of decode sequences and run the epilogue (quant happens once, here).

    grid = (B, Hq). WsAcc: [B, Hq, S, HEAD_D_PAD] fp32 (unnormalized), WsML: [B, Hq, S, 2] (m log2, l).
    Only sequences with q_len == 1 are handled; their token index is QSL[seq].
    """
    seq = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    if q_len == 1:
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_D_PAD)
        smask = offs_s < num_splits
        base = (seq.to(tl.int64) * NUM_Q_HEADS + h) * num_splits + offs_s
        m = tl.load(WsML + base * 2, mask=smask, other=float("-inf"))
        l = tl.load(WsML + base * 2 + 1, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.math.exp2(m - m_max)
        l_tot = tl.sum(w * l, 0)
        acc = tl.load(WsAcc + base[:, None] * HEAD_D_PAD + offs_d[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / l_tot
        if HAS_KV_SCALE:
            o = o * _load_scale(v_scale, VS_PTR)
        if OUT_FP8 and not OUT_GROUP:
            inv_os = _load_inv_scale(out_scale, OS_PTR)
        else:
            inv_os = 1.0
        o_ptrs = Out + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_d
        # one row: [1, HEAD_D_PAD]
        s_offs = tl.zeros([1], dtype=tl.int64) + q_start.to(tl.int64) * stride_st + h * stride_sh
        _store_output(Out, o_ptrs[None, :], o[None, :], (offs_d < HEAD_D)[None, :], inv_os, OutS, s_offs,
                      s_offs >= 0, OUT_FP8, Q_BF16, PRE_ROUND, OUT_GROUP)


# ----------------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------------

_NUM_SMS = {}

# Optional overrides for benchmarking / tuning: keys "prefill", "decode" -> dict of config entries
# ("prefill" may also hold DENSE=False to ignore key/value), "num_splits" -> int, "narrow_fp8_store" ->
# the max_query_len from which FP8 output uses narrow stores, any head size (0: always, 1 << 62: never).
CONFIG_OVERRIDE = {}
# The compiled kernels of the last launch per phase (benchmark compile reports: n_regs, n_spills, asm).
LAST_LAUNCH = {}


def _num_sms(device) -> int:
    idx = device.index if device.index is not None else 0
    if idx not in _NUM_SMS:
        if device.type == "cuda" and torch.cuda.is_available():
            _NUM_SMS[idx] = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            _NUM_SMS[idx] = 132
    return _NUM_SMS[idx]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# Configs per triton version family: "3.2" = triton < 3.3 (vLLM 0.8.5 users), "3.6" = triton >= 3.3.
# Picked on the H100 from `benchmarks/attention_quant.py --sweep` (2026-11-25; docs/kernel.md).
# Prefill entries: (head_d_pad limit, wide) -> config, first match wins; None matches either. "wide"
# (host-side hints, no device sync) = context-heavy (max_seq_len > 2 * max_query_len: chunked prefills,
# prefills mixed with long decodes) or a long prefill (max_query_len >= _LONG_PREFILL) with bf16/fp16 out
# or narrow-stored FP8 out (_narrow_fp8_store).
_PREFILL_CFGS = {
    "3.2": [
        ((64, None), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
        # fused == bf16 speed with 64-key tiles (a/b 0.99-1.005); 128x128 makes the fp8 variant 6-12% slower
        ((128, False), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
        # paged context: 128-key tiles are 20% faster (chunked 2x512 ctx4096: 305 vs 376 us); bf16 out of
        # long prefills: 8-10% faster (1x4096 372 vs 405 us, 4x2048 440 vs 488)
        ((128, True), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)),
        ((1 << 30, None), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
    ],
    "3.6": [
        ((64, None), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
        ((128, None), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
        ((1 << 30, None), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
    ],
}
_DECODE_CFGS = {
    "3.2": [(64, dict(BLOCK_N=64, num_warps=2, num_stages=4)),
            (128, dict(BLOCK_N=128, num_warps=4, num_stages=2)),
            (1 << 30, dict(BLOCK_N=32, num_warps=2, num_stages=3))],
    "3.6": [(128, dict(BLOCK_N=64, num_warps=2, num_stages=4)),
            (1 << 30, dict(BLOCK_N=32, num_warps=2, num_stages=3))],
}


# A prefill is "long" from this max_query_len on. FP8 output of a long d128 prefill uses narrow stores
# (`_out_cols`; docs/kernel.md item 9) and the bf16 kernel's config, so it runs the bf16 kernel's main
# loops. Static scale: within 2% of bf16 out, where wide stores were 3-10% slower (H200 and H100,
# 2026-12-07, both tritons). Group scale on triton 3.2: 7-14% faster than wide stores (H100,
# 2026-12-07); on 3.6 no faster (+4% to -1.5%, inside the rows' spread), so it keeps wide stores there.
# Elsewhere wide stores are as fast or faster (d64 8x512: 9% faster). docs/benchmarks.md has the runs.
# With the bf16 kernel's config the fused bytes are again those of quant(own bf16 output) (on triton 3.2
# the fp8 kernel's 128x64 tiles sum in another order).
# _NARROW_FROM[family][group][head_d_pad]: max_query_len from which FP8 stores are narrow.
_LONG_PREFILL = 2048
_NARROW_FROM = {
    "3.2": {False: {128: _LONG_PREFILL}, True: {128: _LONG_PREFILL}},
    "3.6": {False: {128: _LONG_PREFILL}, True: {}},
}


def _narrow_fp8_store(head_d_pad: int, max_query_len: int, group: bool = False) -> bool:
    default = _NARROW_FROM[_version_family()][group].get(head_d_pad, 1 << 62)
    return max_query_len >= CONFIG_OVERRIDE.get("narrow_fp8_store", default)


def _version_family() -> str:
    return "3.2" if TRITON_VERSION < (3, 3) else "3.6"


def _prefill_config(head_d_pad: int, g: int, kv_fp8: bool, max_query_len: int, max_seq_len: int = 0,
                    wide_fp8_store: bool = False) -> dict:
    """wide_fp8_store: FP8 output with wide stores (the fp8 kernel's own configs); bf16/fp16 output and
    narrow FP8 stores share the bf16 kernel's."""
    long_wide = not wide_fp8_store and max_query_len >= _LONG_PREFILL
    wide = max_seq_len > 2 * max_query_len or long_wide
    for (d_lim, w), c in _PREFILL_CFGS[_version_family()]:
        if head_d_pad <= d_lim and (w is None or w == wide):
            cfg = dict(c)
            break
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], _next_pow2(g), 16)
    cfg.update(CONFIG_OVERRIDE.get("prefill", {}))
    return cfg


def _decode_config(head_d_pad: int, g: int, kv_fp8: bool) -> dict:
    for d_lim, c in _DECODE_CFGS[_version_family()]:
        if head_d_pad <= d_lim:
            cfg = dict(c)
            break
    cfg["BLOCK_M"] = max(16, _next_pow2(g))
    cfg.update(CONFIG_OVERRIDE.get("decode", {}))
    return cfg


def _num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, num_sms: int) -> int:
    forced = CONFIG_OVERRIDE.get("num_splits")
    if forced is not None:
        return int(forced)
    progs = num_seqs * num_kv_heads
    target = 2 * num_sms
    if progs >= target:
        return 1
    max_tiles = triton.cdiv(max(max_seq_len, 1), block_n)
    splits = min(triton.cdiv(target, progs), max(1, max_tiles // 4), 64)
    return max(1, splits)


def _scale_arg(x, name):
    """Returns (kernel arg, is_ptr)."""
    if x is None:
        return 1.0, False
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32 or x.numel() < 1:
            raise ValueError(f"{name} must be a float32 tensor with >= 1 element, got {x.dtype} {tuple(x.shape)}")
        return x, True
    return float(x), False


_FP8_KV_DTYPES = (torch.float8_e4m3fn,)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    softmax_scale: float,
    sliding_window: Optional[int] = None,
    k_scale: Optional[Union[torch.Tensor, float]] = None,
    v_scale: Optional[Union[torch.Tensor, float]] = None,
    output_scale: Optional[Union[torch.Tensor, float]] = None,
    key: Optional[torch.Tensor] = None,
    value: Optional[torch.Tensor] = None,
    output_group_scale: Optional[torch.Tensor] = None,
) -> None:
    """Causal paged attention, writes ``out`` in place (every row of ``out`` is written).

    output_group_scale (fp32 [T, Hq], any strides: row-major [T, Hq] for vLLM's Triton block GEMM or
    column-major, stride (1, T), for CUTLASS): dynamic per-token-group FP8 with group = head, as vLLM's
    ``per_token_group_quant_fp8`` of the bf16 output: per (token, head) s = max(amax, 1e-10) / 448
    written here, out = fp8(clamp(bf16(o) / s)); out must be float8_e4m3fn, output_scale None.

    query: [T, Hq, D] bf16/fp16 (last dim contiguous); key_cache/value_cache: [num_blocks, block_size,
    Hkv, D] of query dtype or float8_e4m3fn (then k_scale/v_scale dequantize); out: [T, Hq, D] of query
    dtype, or float8_e4m3fn with output_scale (fp32 [1]: out = fp8(clamp(bf16(o) / scale))).
    query_start_loc: [B+1] int32; seq_lens: [B] int32; block_table: [B, max_blocks] int32.
    Rows [query_start_loc[B], T) are zero-filled. sliding_window: keys in (p - window, p].
    key/value (optional, both or neither): the new tokens' K/V [T, Hkv, D] (last dim contiguous) that
    were just written into the cache. With them, prefill tiles read whole BLOCK_N tiles of each
    sequence's own tokens densely from these inputs and only the context from the paged cache (the
    values are the same, so the result is too). Ignored for an fp8 KV cache (the cache holds the
    quantized values, which the semantics above read) and for decodes.
    """
    # ---- cheap host-side validation (no device syncs) ----
    if query.dim() != 3 or out.dim() != 3 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("expected query/out [T, Hq, D] and key/value cache [num_blocks, block_size, Hkv, D]")
    if query.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"query must be bf16 or fp16, got {query.dtype}")
    T, Hq, D = query.shape
    nb, bs, Hkv, Dk = key_cache.shape
    if tuple(value_cache.shape) != tuple(key_cache.shape) or Dk != D:
        raise ValueError(f"cache shapes {tuple(key_cache.shape)} / {tuple(value_cache.shape)} do not match head size {D}")
    if tuple(out.shape) != (T, Hq, D):
        raise ValueError(f"out shape {tuple(out.shape)} != query shape {(T, Hq, D)}")
    if Hkv <= 0 or Hq % Hkv != 0:
        raise ValueError(f"num query heads {Hq} must be a multiple of num kv heads {Hkv}")
    if bs & (bs - 1) or bs < 1:
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if key_cache.dtype != value_cache.dtype:
        raise ValueError("key_cache and value_cache dtypes differ")
    kv_fp8 = key_cache.dtype in _FP8_KV_DTYPES
    if not kv_fp8 and key_cache.dtype != query.dtype:
        raise ValueError(f"kv cache dtype {key_cache.dtype} must equal query dtype {query.dtype} or be float8_e4m3fn")
    out_fp8 = out.dtype == torch.float8_e4m3fn
    out_group = output_group_scale is not None
    if out_group:
        if not out_fp8 or output_scale is not None:
            raise ValueError("output_group_scale needs a float8_e4m3fn out and no output_scale")
        if output_group_scale.dtype != torch.float32 or tuple(output_group_scale.shape) != (T, Hq):
            raise ValueError(f"output_group_scale must be float32 [T, Hq] = [{T}, {Hq}], got "
                             f"{output_group_scale.dtype} {tuple(output_group_scale.shape)}")
    elif out_fp8:
        if output_scale is None:
            raise ValueError("out is float8_e4m3fn but output_scale is None")
    else:
        if out.dtype != query.dtype:
            raise ValueError(f"out dtype {out.dtype} must be float8_e4m3fn or the query dtype {query.dtype}")
        if output_scale is not None:
            raise ValueError("output_scale given but out is not float8_e4m3fn")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_table", block_table)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if block_table.dim() != 2 or block_table.stride(-1) != 1:
        raise ValueError("block_table must be [B, max_blocks] with contiguous last dim")
    B = seq_lens.shape[0]
    if query_start_loc.shape[0] != B + 1 or block_table.shape[0] < B:
        raise ValueError(f"query_start_loc must be [B+1], block_table [>=B, ...] with B = {B}")
    if not query_start_loc.is_contiguous() or not seq_lens.is_contiguous():
        raise ValueError("query_start_loc and seq_lens must be contiguous")
    if (key is None) != (value is None):
        raise ValueError("pass both key and value, or neither")
    if key is not None:
        for name, t in (("key", key), ("value", value)):
            if t.dim() != 3 or tuple(t.shape[1:]) != (Hkv, D) or t.shape[0] < T:
                raise ValueError(f"{name} must be [T, Hkv, D] = [{T}, {Hkv}, {D}], got {tuple(t.shape)}")
            if t.dtype != query.dtype:
                raise ValueError(f"{name} dtype {t.dtype} must equal the query dtype {query.dtype}")
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last dimension")
    sw = 0 if sliding_window is None else int(sliding_window)
    if sw < 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    ks_arg, ks_ptr = _scale_arg(k_scale, "k_scale")
    vs_arg, vs_ptr = _scale_arg(v_scale, "v_scale")
    os_arg, os_ptr = _scale_arg(output_scale, "output_scale")
    has_kv_scale = (k_scale is not None) or (v_scale is not None)
    if T == 0:
        return
    if B == 0:
        out.zero_() if not out_fp8 else out.view(torch.uint8).zero_()
        if out_group:
            output_group_scale.copy_(_empty_group_scale(output_group_scale))
        return

    d_pad = max(16, _next_pow2(D))
    G = Hq // Hkv
    q_bf16 = query.dtype == torch.bfloat16
    narrow = out_fp8 and _narrow_fp8_store(d_pad, max_query_len, out_group)
    common = dict(
        G=G, NUM_Q_HEADS=Hq, HEAD_D=D, HEAD_D_PAD=d_pad, KV_BLOCK_SIZE=bs, SLIDING_WINDOW=sw,
        KS_PTR=ks_ptr, VS_PTR=vs_ptr, OS_PTR=os_ptr, HAS_KV_SCALE=has_kv_scale,
        OUT_FP8=out_fp8, Q_BF16=q_bf16, OUT_GROUP=out_group, DOT_F32=_INTERPRET, PRE_ROUND=PRE_ROUND_FP8 or _INTERPRET,
        NARROW_OUT=narrow,
    )
    strides = (query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
               value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
               out.stride(0), out.stride(1), block_table.stride(0))
    dummy = query  # unused workspace pointers
    scales = output_group_scale if out_group else dummy
    s_strides = (output_group_scale.stride(0), output_group_scale.stride(1)) if out_group else (0, 0)
    strides = strides + s_strides
    no_dense = (dummy, dummy, 0, 0, 0, 0)

    pure_decode = max_query_len <= 1
    if not pure_decode:
        cfg = _prefill_config(d_pad, G, kv_fp8, max_query_len, max_seq_len, wide_fp8_store=out_fp8 and not narrow)
        block_m = cfg["BLOCK_M"]
        block_q = max(1, block_m // G)
        grid = (triton.cdiv(T, block_q) + B, Hkv, 1)
        dense = key is not None and not kv_fp8 and cfg.get("DENSE", True)
        dense_args = ((key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1))
                      if dense else no_dense)
        LAST_LAUNCH["prefill"] = _paged_attn_fwd_kernel[grid](
            query, key_cache, value_cache, out, query_start_loc, seq_lens, block_table, dummy, dummy,
            *dense_args[:2], scales, ks_arg, vs_arg, os_arg, softmax_scale, B, T, 1, *strides, *dense_args[2:],
            BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg["BLOCK_N"],
            SEQ_GRID=False, SKIP_DECODE=True, USE_SPLIT=False, DENSE_KV=dense,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
    elif T > B:
        # pure decode: tokens [B, T) are padding
        pad = out[B:]
        pad.zero_() if not out_fp8 else pad.view(torch.uint8).zero_()
        if out_group:
            output_group_scale[B:] = _empty_group_scale(output_group_scale[B:])

    # decode sequences (q_len == 1), possibly split over KV
    cfg = _decode_config(d_pad, G, kv_fp8)
    # mixed batches: the prefill tiles already fill the GPU, so decodes are not split
    splits = _num_splits(B, Hkv, max_seq_len, cfg["BLOCK_N"], _num_sms(query.device)) if pure_decode else 1
    use_split = splits > 1
    if use_split:
        ws_acc = torch.empty((B, Hq, splits, d_pad), dtype=torch.float32, device=query.device)
        ws_ml = torch.empty((B, Hq, splits, 2), dtype=torch.float32, device=query.device)
    else:
        ws_acc = ws_ml = dummy
    LAST_LAUNCH["decode"] = _paged_attn_fwd_kernel[(B, Hkv, splits)](
        query, key_cache, value_cache, out, query_start_loc, seq_lens, block_table, ws_acc, ws_ml,
        *no_dense[:2], scales, ks_arg, vs_arg, os_arg, softmax_scale, B, T, splits, *strides, *no_dense[2:],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=1, BLOCK_N=cfg["BLOCK_N"],
        SEQ_GRID=True, SKIP_DECODE=False, USE_SPLIT=use_split, DENSE_KV=False,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
    if use_split:
        _split_reduce_kernel[(B, Hq)](
            out, ws_acc, ws_ml, query_start_loc, vs_arg, os_arg, scales, splits, out.stride(0), out.stride(1),
            *s_strides, NUM_Q_HEADS=Hq, HEAD_D=D, HEAD_D_PAD=d_pad, SPLITS_PAD=max(2, _next_pow2(splits)),
            VS_PTR=vs_ptr, OS_PTR=os_ptr, HAS_KV_SCALE=has_kv_scale, OUT_FP8=out_fp8, Q_BF16=q_bf16,
            OUT_GROUP=out_group, PRE_ROUND=PRE_ROUND_FP8 or _INTERPRET, num_warps=4)


# ----------------------------------------------------------------------------------------------------
# Reference (oracle for tests)
# ----------------------------------------------------------------------------------------------------


def _gather(cache, blocks):
    if cache.dtype in _FP8_KV_DTYPES:  # CPU indexing of fp8 is not implemented in torch 2.6
        return cache.view(torch.uint8)[blocks].view(cache.dtype)
    return cache[blocks]


def reference_paged_attention(
    query, key_cache, value_cache, query_start_loc, seq_lens, block_table,
    max_query_len=None, max_seq_len=None, softmax_scale=None, sliding_window=None,
    k_scale=None, v_scale=None, output_scale=None, dtype=None,
) -> torch.Tensor:
    """Plain-torch paged attention: returns [T, Hq, D] in float64 (CPU) or float32 (GPU) by default.

    Gathers each sequence's K/V from the paged cache ([num_blocks, block_size, Hkv, D]), dequantizes
    with k_scale / v_scale, applies the causal + sliding-window mask and softmax. Rows past
    query_start_loc[B] are zero. output_scale is ignored (quantize with static_fp8_quant_reference).
    """
    if dtype is None:
        dtype = torch.float64 if query.device.type == "cpu" else torch.float32
    T, Hq, D = query.shape
    bs, Hkv = key_cache.shape[1], key_cache.shape[2]
    G = Hq // Hkv
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    ks = 1.0 if k_scale is None else float(torch.as_tensor(k_scale).reshape(-1)[0])
    vs = 1.0 if v_scale is None else float(torch.as_tensor(v_scale).reshape(-1)[0])
    qsl = query_start_loc.tolist()
    sl = seq_lens.tolist()
    bt = block_table.long()
    out = torch.zeros((T, Hq, D), dtype=dtype, device=query.device)
    for s in range(len(sl)):
        q0, q1, kv = qsl[s], qsl[s + 1], sl[s]
        ql = q1 - q0
        if ql <= 0:
            continue
        nblk = (kv + bs - 1) // bs
        blocks = bt[s, :nblk]
        k = _gather(key_cache, blocks).reshape(nblk * bs, Hkv, D)[:kv].to(dtype) * ks
        v = _gather(value_cache, blocks).reshape(nblk * bs, Hkv, D)[:kv].to(dtype) * vs
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        q = query[q0:q1].to(dtype)
        scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
        qpos = torch.arange(kv - ql, kv, device=query.device)[:, None]
        kpos = torch.arange(kv, device=query.device)[None, :]
        vis = kpos <= qpos
        if sliding_window:
            vis = vis & (kpos > qpos - sliding_window)
        scores = scores.masked_fill(~vis[None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, v)
    return out


# vllm_overlay module contract (see vllm_overlay/__init__.py): the patch
# series copies this file into vLLM; it hooks nothing.
VLLM_TARGET = "vllm/attention/ops/triton_paged_attention.py"
VLLM_HOOKS = ()
