"""The dense-Triton ceiling of issue 12: a plain causal attention over contiguous K/V, bf16 in and out.

No paging, no context, no FP8 epilogue: what triton itself reaches on a prefill, to compare the paged
kernel with on the same card, triton and shapes (benchmarks/attention_quant.py variant x).

One program: BLOCK_M query tokens of ONE query head (no GQA head packing) x all their keys, in two
stages: the tiles left of the diagonal block without masks, then the diagonal block with the causal
mask; exp2 with the softmax scale folded in; the last query blocks start first.

    Q, Out: [B * L, Hq, D] (B sequences of L tokens each, back to back)
    K, V:   [B * L, Hkv, D]      query head h reads KV head h // (Hq // Hkv)
"""

import os

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, num_warps, num_stages): issue 12's best configs on the H100 (triton 3.2: 128x128/8/2,
# 64x64 for 8x512; triton 3.6: 64x64/4/3); the benchmark times each and keeps the fastest.
CONFIGS = ((128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2))


@triton.jit
def _tile_loop(acc, l_i, m_i, q, kt_blk, v_blk, lo, hi, offs_m, qk_scale_log2,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr):
    """Keys [lo, hi) in BLOCK_N tiles; CAUSAL masks key > query (the diagonal block). DOT_F32: the
    interpreter's bf16 tl.dot is wrong (docs/kernel.md), so there the operands go up to fp32."""
    offs_n = tl.arange(0, BLOCK_N)
    kt_blk = tl.advance(kt_blk, (0, lo))
    v_blk = tl.advance(v_blk, (lo, 0))
    for n0 in range(lo, hi, BLOCK_N):
        kt = tl.load(kt_blk)
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32)) if DOT_F32 else tl.dot(q, kt)
        s = s * qk_scale_log2
        if CAUSAL:
            s = tl.where(offs_m[:, None] >= (n0 + offs_n)[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p16, v = p.to(tl.bfloat16), tl.load(v_blk)
        acc = acc * alpha[:, None] + (tl.dot(p16.to(tl.float32), v.to(tl.float32)) if DOT_F32 else tl.dot(p16, v))
        m_i = m_new
        kt_blk = tl.advance(kt_blk, (0, BLOCK_N))
        v_blk = tl.advance(v_blk, (BLOCK_N, 0))
    return acc, l_i, m_i


@triton.jit
def _dense_causal_fwd(Q, K, V, Out, qk_scale_log2, L, NUM_MB,
                      HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    mb = NUM_MB - 1 - tl.program_id(0)  # longest causal rows first
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // (HQ // HKV)
    row0 = b.to(tl.int64) * L
    q_blk = tl.make_block_ptr(Q + row0 * HQ * D + h * D, (L, D), (HQ * D, 1), (mb * BLOCK_M, 0),
                              (BLOCK_M, D), (1, 0))
    kt_blk = tl.make_block_ptr(K + row0 * HKV * D + kvh * D, (D, L), (1, HKV * D), (0, 0), (D, BLOCK_N), (0, 1))
    v_blk = tl.make_block_ptr(V + row0 * HKV * D + kvh * D, (L, D), (HKV * D, 1), (0, 0), (BLOCK_N, D), (1, 0))
    q = tl.load(q_blk)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    diag = mb * BLOCK_M
    acc, l_i, m_i = _tile_loop(acc, l_i, m_i, q, kt_blk, v_blk, 0, diag, offs_m, qk_scale_log2, BLOCK_N, False, DOT_F32)
    acc, l_i, m_i = _tile_loop(acc, l_i, m_i, q, kt_blk, v_blk, diag, diag + BLOCK_M, offs_m, qk_scale_log2,
                               BLOCK_N, True, DOT_F32)
    o_blk = tl.make_block_ptr(Out + row0 * HQ * D + h * D, (L, D), (HQ * D, 1), (mb * BLOCK_M, 0),
                              (BLOCK_M, D), (1, 0))
    tl.store(o_blk, (acc / l_i[:, None]).to(tl.bfloat16))


def dense_causal_attention(q, k, v, out, batch, seq_len, cfg=CONFIGS[0]):
    """q, out: [batch * seq_len, Hq, D] bf16 contiguous; k, v: [batch * seq_len, Hkv, D]; seq_len a
    multiple of BLOCK_M (BLOCK_M a multiple of BLOCK_N)."""
    bm, bn, warps, stages = cfg
    T, hq, d = q.shape
    hkv = k.shape[1]
    assert T == batch * seq_len and seq_len % bm == 0 and bm % bn == 0 and hq % hkv == 0
    assert all(t.is_contiguous() and t.dtype == torch.bfloat16 for t in (q, k, v, out))
    n_mb = seq_len // bm
    _dense_causal_fwd[(n_mb, hq, batch)](q, k, v, out, d ** -0.5 * 1.4426950408889634, seq_len, n_mb,
                                         HQ=hq, HKV=hkv, D=d, BLOCK_M=bm, BLOCK_N=bn,
                                         DOT_F32=os.environ.get("TRITON_INTERPRET") == "1",
                                         num_warps=warps, num_stages=stages)


def dense_causal_reference(q, k, v, batch, seq_len):
    """float64 torch reference of dense_causal_attention: [batch * seq_len, Hq, D]."""
    T, hq, d = q.shape
    g = hq // k.shape[1]
    qf, kf, vf = (t.double().view(batch, seq_len, -1, d).transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
    return o.transpose(1, 2).reshape(T, hq, d)
