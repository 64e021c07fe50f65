"""A real vLLM Attention layer (V1 Triton backend, overlay on) through the
extended op: FP8 output equals attention followed by vLLM's static quant.

Runs the Triton kernel in the interpreter.  Stand-in: vLLM's CUDA kernel
``_C_cache_ops::reshape_and_cache_flash`` cannot run on a CPU; a CPU
implementation with the same semantics (bf16 cache: copy each token's K/V
to its slot) is registered for this test only.
"""
import pytest
import torch

import vllm_overlay
from vllm_overlay import attention_ops, attention_quant
from vllm_overlay.triton_paged_attention import (reference_paged_attention,
                                                 static_fp8_quant_reference)

HQ, HKV, D, BS = 4, 2, 64, 16


@pytest.fixture(scope="module")
def cpu_cache_writer():
    lib = torch.library.Library("_C_cache_ops", "IMPL")

    def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                kv_cache_dtype, k_scale, v_scale):
        assert kv_cache_dtype == "auto"
        for i, slot in enumerate(slot_mapping.tolist()):
            key_cache[slot // key_cache.shape[1], slot % key_cache.shape[1]] = key[i]
            value_cache[slot // value_cache.shape[1], slot % value_cache.shape[1]] = value[i]

    lib.impl("reshape_and_cache_flash", reshape_and_cache_flash, "CPU")
    yield
    lib._destroy()


@pytest.fixture(scope="module")
def layer(cpu_cache_writer, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_USE_V1", "1")
    monkeypatch_module.setenv("VLLM_ATTENTION_BACKEND", "TRITON_ATTN_VLLM_V1")
    vllm_overlay.install()
    from vllm.attention import Attention
    from vllm.config import CacheConfig, VllmConfig, set_current_vllm_config
    config = VllmConfig()
    with set_current_vllm_config(config):
        torch.set_default_dtype(torch.bfloat16)
        try:
            attn = Attention(HQ, D, D ** -0.5, num_kv_heads=HKV,
                             cache_config=CacheConfig(block_size=BS, swap_space=0),
                             prefix="layers.0.attn")
        finally:
            torch.set_default_dtype(torch.float32)
    return attn, config


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _batch(seed):
    """Two sequences: a 5-token prefill, and 3 new tokens after 7 cached."""
    gen = torch.Generator().manual_seed(seed)
    q_lens, ctx_lens = [5, 3], [0, 7]
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    num_blocks = 8
    kv_cache = torch.randn(2, num_blocks, BS, HKV, D, generator=gen).to(torch.bfloat16)
    block_table = torch.tensor([[3, 0], [5, 1]], dtype=torch.int32)
    slots = []
    for b, (q, c) in enumerate(zip(q_lens, ctx_lens)):
        for pos in range(c, c + q):
            slots.append(int(block_table[b, pos // BS]) * BS + pos % BS)
    T = sum(q_lens)
    q = torch.randn(T, HQ, D, generator=gen).to(torch.bfloat16)
    k = torch.randn(T, HKV, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(T, HKV, D, generator=gen).to(torch.bfloat16)
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata
    meta = FlashAttentionMetadata(
        num_actual_tokens=T, max_query_len=max(q_lens),
        query_start_loc=torch.tensor([0, 5, 8], dtype=torch.int32),
        max_seq_len=max(seq_lens), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table, slot_mapping=torch.tensor(slots, dtype=torch.long),
        use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None,
        prefix_kv_lens=None, suffix_kv_lens=None)
    return q, k, v, kv_cache, meta


def _run(attn, config, meta, kv_cache, q, k, v, out, scale=None):
    from vllm.forward_context import set_forward_context
    attn.kv_cache = [kv_cache]
    with set_forward_context(meta, config):
        attention_ops.unified_attention_with_output(q, k, v, out, attn.layer_name,
                                                    output_scale=scale)


def test_fp8_output_equals_attention_then_static_quant(layer):
    attn, config = layer
    assert attn.can_fuse_output_quant(attention_quant.FP8_STATIC_TENSOR)
    assert attn.output_scale is None
    q, k, v, kv_cache, meta = _batch(seed=1)
    scale = torch.tensor([0.004], dtype=torch.float32)  # outputs reach ~448: clamps
    out_bf16 = torch.full(q.shape, float("nan"), dtype=torch.bfloat16)
    _run(attn, config, meta, kv_cache.clone(), q, k, v, out_bf16)
    out_fp8 = torch.full(q.shape, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    cache = kv_cache.clone()
    _run(attn, config, meta, cache, q, k, v, out_fp8, scale)
    assert attn.output_scale is scale           # bound by the fused call
    assert not torch.isnan(out_bf16.float()).any()
    assert not torch.isnan(out_fp8.float()).any()
    # Unfused meaning: bf16 attention, then vLLM's static quant on it.
    unfused = static_fp8_quant_reference(out_bf16, scale)
    assert torch.equal(out_fp8.view(torch.uint8), unfused.view(torch.uint8))
    # And against a float64 reference built from the paged cache.
    ref = reference_paged_attention(
        q, cache[0], cache[1], meta.query_start_loc, meta.seq_lens,
        meta.block_table, meta.max_query_len, meta.max_seq_len, D ** -0.5)
    rel = (out_bf16.double() - ref).norm() / ref.norm()
    assert rel < 1e-2
    ref_q = static_fp8_quant_reference(ref.to(torch.bfloat16), scale).float()
    diff = (out_fp8.float() - ref_q).abs()
    ulp = ref_q.abs().clamp(min=2 ** -6) * 2 ** -3   # one e4m3 step
    assert (diff <= ulp + 1e-6).float().mean() > 0.99


def test_backend_that_cannot_fuse_raises_and_writes_nothing(layer):
    from vllm.attention.backends.abstract import AttentionImpl
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    attn, config = layer
    assert AttentionImpl.fused_output_quant_supported(
        None, attention_quant.FP8_STATIC_TENSOR) is False
    assert FlashAttentionImpl.fused_output_quant_supported is \
        AttentionImpl.fused_output_quant_supported
    q, k, v, kv_cache, meta = _batch(seed=2)
    attn.impl.use_overlay_kernel = False   # as an ALiBi/iRoPE layer: vLLM's kernel
    try:
        out = torch.full(q.shape, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
        with pytest.raises(attention_quant.UnsupportedOutputQuant,
                           match="cannot write quantized attention output"):
            _run(attn, config, meta, kv_cache, q, k, v, out,
                 torch.tensor([0.01], dtype=torch.float32))
        assert (out.view(torch.uint8) == 0x7F).all()
    finally:
        attn.impl.use_overlay_kernel = True
