"""vLLM 0.8.5's V1 Triton attention backend on our paged kernel, FP8 out.

After ``install()``, ``TRITON_ATTN_VLLM_V1`` builds
:class:`TritonFusedAttentionImpl`: it writes the KV cache in the flash
layout ``[2, num_blocks, block_size, Hkv, D]`` (``reshape_and_cache_flash``,
the shape the backend allocates) and runs
``triton_paged_attention.paged_attention`` on it (a prefill's own tokens read
densely from ``key``/``value``, its context from the cache), with bf16/fp16 output
(stock meaning) or, given ``output_scale``, static per-tensor FP8 output.
It reports fused support for static per-tensor FP8 and for dynamic
per-token-group FP8 with group = head size (``output_group_scale``: one
fp32 scale per token and head, block-FP8 checkpoints).  With this backend
selected, ``--kv-cache-dtype fp8`` (e4m3) keeps the V1 engine (vLLM 0.8.5
would fall back to V0, where nothing fuses).

Layers the kernel does not cover (ALiBi, chunked local attention "iRoPE")
keep vLLM's own implementation, unfused.
"""
import logging

import torch

import vllm_overlay.attention_quant as attention_quant
import vllm_overlay.triton_paged_attention as kernel

VLLM_TARGET = "vllm/v1/attention/backends/triton_fused_attn.py"
VLLM_HOOKS = ("vllm/v1/attention/backends/triton_attn.py",
              "vllm/engine/arg_utils.py")

logger = logging.getLogger("vllm.overlay")


def _impl_class():
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    class TritonFusedAttentionImpl(TritonAttentionImpl):
        """TritonAttentionImpl on the overlay's kernel (module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_overlay_kernel = self.alibi_slopes is None \
                and not self.use_irope
            if not self.use_overlay_kernel:
                logger.info("Triton attention: ALiBi/iRoPE layer keeps vLLM's "
                            "kernel (no fused output quant)")

        def fused_output_quant_supported(self, quant_key) -> bool:
            return self.use_overlay_kernel and quant_key in (
                attention_quant.FP8_STATIC_TENSOR,
                attention_quant.fp8_group_key(self.head_size))

        def forward(self, layer, query, key, value, kv_cache, attn_metadata,
                    output=None, output_scale=None, output_group_scale=None):
            """query [T, Hq, D], key/value [T, Hkv, D], kv_cache [2,
            num_blocks, block_size, Hkv, D]; writes output [T, Hq, D] (and
            with ``output_group_scale`` [T, Hq] its per-head FP8 scales)."""
            if not self.use_overlay_kernel:
                if output_scale is not None or output_group_scale is not None:
                    raise attention_quant.UnsupportedOutputQuant(
                        f"{type(self).__name__} (layer {layer.layer_name}) "
                        "cannot write quantized attention output: ALiBi/iRoPE "
                        "layers keep vLLM's kernel")
                return super().forward(layer, query, key, value, kv_cache,
                                       attn_metadata, output=output)
            assert output is not None, "Output tensor must be provided."
            if attn_metadata is None:  # profiling run
                return output
            key_cache, value_cache = kv_cache.unbind(0)
            # Written as allocated (uint8 for fp8, like vLLM's FlashAttention
            # backend does), read by the kernel as float8_e4m3fn.
            torch.ops._C_cache_ops.reshape_and_cache_flash(
                key, value, key_cache, value_cache, attn_metadata.slot_mapping,
                self.kv_cache_dtype, layer._k_scale, layer._v_scale)
            if self.kv_cache_dtype.startswith("fp8"):
                key_cache = key_cache.view(torch.float8_e4m3fn)
                value_cache = value_cache.view(torch.float8_e4m3fn)
            window = self.sliding_window[0]
            kernel.paged_attention(
                query, key_cache, value_cache, output,
                attn_metadata.query_start_loc, attn_metadata.seq_lens,
                attn_metadata.block_table, attn_metadata.max_query_len,
                attn_metadata.max_seq_len, self.scale,
                sliding_window=None if window < 0 else window + 1,
                k_scale=layer._k_scale, v_scale=layer._v_scale,
                output_scale=output_scale, key=key, value=value,
                output_group_scale=output_group_scale)
            return output

    return TritonFusedAttentionImpl


TritonFusedAttentionImpl = None

# KV-cache dtypes the kernel reads (e4m3; vLLM's "fp8" means e4m3 on CUDA).
FP8_KV_CACHE = ("fp8", "fp8_e4m3")


def _install_v1_oracle():
    """vLLM 0.8.5 sends every ``--kv-cache-dtype fp8`` user to V0 unless
    FlashAttention 3 serves it.  This backend reads an e4m3 KV cache, so
    with ``VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V1`` the oracle judges
    everything else as stock and V1 stays on (logged).  Every other
    backend / cache dtype decides exactly as stock."""
    import vllm.envs as envs
    from vllm.engine.arg_utils import EngineArgs
    stock = EngineArgs._is_v1_supported_oracle
    if getattr(stock, "_vllm_overlay", False):
        return

    def _is_v1_supported_oracle(self, model_config):
        kv_dtype = self.kv_cache_dtype
        if kv_dtype not in FP8_KV_CACHE or \
                envs.VLLM_ATTENTION_BACKEND != "TRITON_ATTN_VLLM_V1":
            return stock(self, model_config)
        self.kv_cache_dtype = "auto"
        try:
            supported = stock(self, model_config)
        finally:
            self.kv_cache_dtype = kv_dtype
        if supported:
            logger.info("V1 kept with --kv-cache-dtype %s: the overlay's "
                        "TRITON_ATTN_VLLM_V1 backend reads an FP8 (e4m3) KV "
                        "cache", kv_dtype)
        return supported

    _is_v1_supported_oracle._vllm_overlay = True
    EngineArgs._is_v1_supported_oracle = _is_v1_supported_oracle


def install():
    global TritonFusedAttentionImpl
    _install_v1_oracle()
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    if TritonFusedAttentionImpl is not None:
        return
    TritonFusedAttentionImpl = _impl_class()
    TritonAttentionBackend.get_impl_cls = staticmethod(
        lambda: TritonFusedAttentionImpl)
