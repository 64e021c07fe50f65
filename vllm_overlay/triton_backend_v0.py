"""A V0 attention backend on the overlay's kernel: ``TRITON_ATTN_VLLM_V0``.

vLLM 0.8.5 still runs many users on V0 (e.g. ``--kv-cache-dtype fp8``
without FlashAttention 3), where no stock backend can write FP8.  With
``VLLM_USE_V1=0 VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V0`` the CUDA
platform selects :class:`TritonFusedV0Backend`: vLLM's V0 FlashAttention
backend (metadata, builder, CUDA-graph state, KV-cache shape ``[2,
num_blocks, block_size, Hkv, D]``) with the V1 Triton impl of
``triton_backend`` behind it.  It takes no output buffer, so layers call
``unified_attention(q, k, v, layer)`` — and, after the fusion pass,
``unified_attention(q, k, v, layer, output_scale=s)``, which returns FP8
(the RFC's first proposal)::

    V0 -O 3 (one full graph):   attn = unified_attention(q, k, v)             [T, H*D] bf16
                                fp8  = static_scaled_fp8_quant(attn, s)
    after the pass:             fp8  = unified_attention.output_scale(q, k, v, s)  [T, H*D] fp8

V0 metadata is read as the kernel needs it: ``seq_lens_tensor``,
``block_tables`` (for prompts V0 gives none, derived from ``slot_mapping``),
``query_start_loc`` (built from the batch size for a
pure-decode batch, as V0's CUDA-graph capture passes none), and
``max_seq_len = max(max_prefill_seq_len, max_decode_seq_len)``.  Inside
V0's decode CUDA graphs the kernel runs with what capture saw: the grid and
split count follow ``max_decode_seq_len`` (V0 captures with
``max_seq_len_to_capture``, an upper bound of every replay), and the
workspace comes from the graph pool.
"""
import logging
import types

import torch

VLLM_TARGET = "vllm/attention/backends/triton_fused_v0.py"
VLLM_HOOKS = ("vllm/attention/selector.py", )

NAME = "TRITON_ATTN_VLLM_V0"

logger = logging.getLogger("vllm.overlay")


def kernel_metadata(m, block_size):
    """The fields of V1's metadata the impl reads, from V0's ``m``."""
    query_start_loc = m.query_start_loc
    if query_start_loc is None:       # pure decode (V0 CUDA-graph capture)
        query_start_loc = torch.arange(m.seq_lens_tensor.shape[0] + 1,
                                       dtype=torch.int32,
                                       device=m.seq_lens_tensor.device)
    max_seq_len = max(m.max_prefill_seq_len, m.max_decode_seq_len)
    block_table = m.block_tables
    if block_table.shape[-1] == 0:
        block_table = prompt_block_table(m.slot_mapping, query_start_loc,
                                         max_seq_len, block_size)
    return types.SimpleNamespace(
        slot_mapping=m.slot_mapping, query_start_loc=query_start_loc,
        seq_lens=m.seq_lens_tensor, block_table=block_table,
        max_query_len=m.max_query_len or 1, max_seq_len=max_seq_len)


def prompt_block_table(slot_mapping, query_start_loc, max_seq_len, block_size):
    """V0 without chunked prefill or a prefix-cache hit gives prompts an
    empty block table ``[B, 0]`` (FlashAttention reads their new K/V
    directly); the kernel reads K/V through the table.  A fresh prompt has
    no context, so its block j holds its token j * block_size, whose slot
    was just written: ``table[s, j] = slot_mapping[qsl[s] + j * bs] // bs``.
    Entries past a sequence's end are never read (clamped, not checked);
    on the device, no host sync.  Returns int32 [B, ceil(max_seq_len / bs)]."""
    n = max(1, -(-max_seq_len // block_size))
    steps = torch.arange(n, device=slot_mapping.device) * block_size
    idx = query_start_loc[:-1, None].to(torch.int64) + steps
    idx = idx.clamp(max=slot_mapping.shape[0] - 1)
    return torch.div(slot_mapping[idx], block_size,
                     rounding_mode="floor").to(torch.int32)


def _classes():
    # imported here: a patched vLLM runs install() while vllm.attention loads
    import vllm_overlay.triton_backend as triton_backend
    from vllm.attention.backends.flash_attn import FlashAttentionBackend
    triton_backend.install()
    v1_impl = triton_backend.TritonFusedAttentionImpl

    class TritonFusedV0AttentionImpl(v1_impl):
        """V0 adapter of ``triton_backend``'s impl: query/key/value
        ``[T, H * D]`` in, ``[T, Hq * D]`` out (bf16, or FP8 given a scale)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not self.use_overlay_kernel:
                raise ValueError(f"{NAME} does not support ALiBi/iRoPE layers")

        def forward(self, layer, query, key, value, kv_cache, attn_metadata,
                    output=None, output_scale=None):
            if output is None:
                output = torch.empty_like(query)
            if attn_metadata is None or kv_cache.numel() == 0:  # profiling
                return output
            h, d = self.num_heads, self.head_size
            super().forward(
                layer, query.view(-1, h, d),
                key.view(-1, self.num_kv_heads, d),
                value.view(-1, self.num_kv_heads, d), kv_cache,
                kernel_metadata(attn_metadata, kv_cache.shape[2]),
                output=output.view(-1, h, d),
                output_scale=output_scale)
            return output

    class TritonFusedV0Backend(FlashAttentionBackend):
        accept_output_buffer = False

        @staticmethod
        def get_name() -> str:
            return NAME

        @staticmethod
        def get_impl_cls():
            return TritonFusedV0AttentionImpl

    return TritonFusedV0Backend, TritonFusedV0AttentionImpl


TritonFusedV0Backend = TritonFusedV0AttentionImpl = None


def install():
    global TritonFusedV0Backend, TritonFusedV0AttentionImpl
    import vllm.envs as envs
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        return
    from vllm.platforms.cuda import CudaPlatformBase
    stock = CudaPlatformBase.get_attn_backend_cls.__func__
    if getattr(stock, "_vllm_overlay", False):
        return

    def get_attn_backend_cls(cls, selected_backend, head_size, dtype,
                             kv_cache_dtype, block_size, use_v1, use_mla):
        if envs.VLLM_ATTENTION_BACKEND == NAME and not use_v1 and not use_mla:
            global TritonFusedV0Backend, TritonFusedV0AttentionImpl
            if TritonFusedV0Backend is None:
                TritonFusedV0Backend, TritonFusedV0AttentionImpl = _classes()
            logger.info("Using the overlay's Triton backend on V0 (%s)", NAME)
            return f"{__name__}.TritonFusedV0Backend"
        return stock(cls, selected_backend, head_size, dtype, kv_cache_dtype,
                     block_size, use_v1, use_mla)

    get_attn_backend_cls._vllm_overlay = True
    CudaPlatformBase.get_attn_backend_cls = classmethod(get_attn_backend_cls)
