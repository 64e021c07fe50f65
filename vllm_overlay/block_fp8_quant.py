"""Block-FP8 linear layers split into quant + GEMM, so attention can absorb
the quant (issue 14: dynamic per-token-group FP8, group = head size).

vLLM 0.8.5 runs block-FP8 checkpoints (``weight_block_size: [128, 128]``)
through one opaque op, ``vllm::apply_w8a8_block_fp8_linear``: it quantizes
its input per token and 128-group (``per_token_group_quant_fp8``) and calls
CUTLASS block-scaled ``cutlass_scaled_mm`` (column-major scales) or the
Triton ``w8a8_block_fp8_matmul`` (row-major scales).  For an o_proj whose
group is exactly one attention head, ``decompose`` rewrites the Dynamo graph
(before vLLM splits it) into::

    [.. out = empty(T, H*D); buf = empty_like(out3d, fp8); s = empty(T, H) (layout of the GEMM)]
    [attention(.., out3d); x = view(out3d); r = view(buf); block_fp8_group_quant(r, x, s, D)]
    [block_fp8_mm(r, s, weight, block_size, weight_scale, bias, cutlass, dtype) ...]

- ``vllm::block_fp8_group_quant`` (mutates ``result`` and ``scale``) is the
  sticky op: it joins the attention piece, and the post-grad pass fuses it
  into the attention kernel's epilogue.  Its FP8 output and its scales are
  allocated before the attention, in the preceding CUDA-graph-captured piece
  (fixed addresses, DESIGN.md section 9).
- ``vllm::block_fp8_mm`` is exactly what vLLM does after its own quant (same
  path choice, same call), on pre-quantized input; it stays in the next
  captured piece.

Unfused, the decomposed pair is numerically identical to the stock op (on
CUDA the quant launches vLLM's own Triton kernels).  Only layers that can
fuse are decomposed; every other linear stays stock, with the reason logged.
"""
import logging
from typing import List, Optional

import torch

import vllm_overlay.attention_quant as attention_quant

VLLM_TARGET = "vllm/model_executor/layers/quantization/utils/block_fp8_quant.py"
VLLM_HOOKS = ("vllm/model_executor/layers/quantization/utils/fp8_utils.py", )

logger = logging.getLogger("vllm.overlay")

GROUP_QUANT = "block_fp8_group_quant"
BLOCK_MM = "block_fp8_mm"
STOCK_LINEAR = "vllm.apply_w8a8_block_fp8_linear"
_VIEW_METHODS = ("view", "reshape")


# --- the two ops -----------------------------------------------------------

def block_fp8_group_quant(result: torch.Tensor, input: torch.Tensor,
                          scale: torch.Tensor, group_size: int,
                          column_major: bool) -> None:
    """``result``, ``scale`` = vLLM's ``per_token_group_quant_fp8(input,
    group_size, column_major_scales=column_major)``, written into the given
    buffers (``scale`` [M, K / group_size], strides (1, M) when
    ``column_major``)."""
    if input.is_cuda:
        _launch_vllm_kernel(result, input, scale, group_size, column_major)
        return
    # Off CUDA (the CPU harness): the torch form of vLLM's kernel (its
    # Triton interpreter run converts fp32 -> fp8 wrongly, DESIGN.md 4).
    from vllm_overlay.triton_paged_attention import group_fp8_quant_reference
    q, s = group_fp8_quant_reference(input, group_size)
    result.copy_(q)
    scale.copy_(s)


def _launch_vllm_kernel(result, x, scale, group_size, column_major):
    """vLLM 0.8.5 ``per_token_group_quant_fp8``'s launch, on given buffers."""
    import triton
    from vllm.model_executor.layers.quantization.utils import fp8_utils
    assert x.shape[-1] % group_size == 0 and x.stride(-1) == 1
    finfo = torch.finfo(result.dtype)
    m = x.numel() // group_size
    block = triton.next_power_of_2(group_size)
    num_warps = min(max(block // 256, 1), 8)
    common = dict(fp8_min=finfo.min, fp8_max=finfo.max, BLOCK=block,
                  num_warps=num_warps, num_stages=1)
    if column_major:
        fp8_utils._per_token_group_quant_fp8_colmajor[(m, )](
            x, result, scale, group_size, x.shape[1], x.stride(0),
            scale.stride(1), 1e-10, **common)
    else:
        fp8_utils._per_token_group_quant_fp8[(m, )](
            x, result, scale, group_size, x.shape[1], x.stride(0), 1e-10,
            **common)


def block_fp8_group_quant_fake(result: torch.Tensor, input: torch.Tensor,
                               scale: torch.Tensor, group_size: int,
                               column_major: bool) -> None:
    return


def block_fp8_mm(q_input: torch.Tensor, x_scale: torch.Tensor,
                 weight: torch.Tensor, block_size: List[int],
                 weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 use_cutlass: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The tail of vLLM's ``apply_w8a8_block_fp8_linear`` after its quant:
    CUTLASS with column-major ``x_scale`` or the Triton block GEMM with
    row-major ``x_scale``."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import fp8_utils
    if use_cutlass:
        if x_scale.dim() == 2 and x_scale.shape[0] > 1 and x_scale.stride(0) != 1:
            # CUTLASS reads column-major scales; never let a layout change
            # upstream turn into wrong results
            x_scale = x_scale.t().contiguous().t()
        output = ops.cutlass_scaled_mm(q_input, weight.T, out_dtype=out_dtype,
                                       scale_a=x_scale, scale_b=weight_scale.T)
    else:
        output = fp8_utils.w8a8_block_fp8_matmul(
            q_input, weight, x_scale, weight_scale, block_size,
            output_dtype=out_dtype)
    if bias is not None:
        output = output + bias
    return output.to(dtype=out_dtype).view(*q_input.shape[:-1], weight.shape[0])


def block_fp8_mm_fake(q_input: torch.Tensor, x_scale: torch.Tensor,
                      weight: torch.Tensor, block_size: List[int],
                      weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                      use_cutlass: bool, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((*q_input.shape[:-1], weight.shape[0]), dtype=out_dtype,
                       device=q_input.device)


def uses_cutlass(weight_shape, cutlass_block_fp8_supported):
    """vLLM 0.8.5's path choice in ``apply_w8a8_block_fp8_linear`` (CUDA)."""
    return bool(cutlass_block_fp8_supported) and weight_shape[0] % 128 == 0 \
        and weight_shape[1] % 128 == 0


def installed():
    return hasattr(torch.ops.vllm, GROUP_QUANT)


def install():
    from vllm.platforms import current_platform
    from vllm.utils import direct_register_custom_op
    if installed():
        return
    key = current_platform.dispatch_key
    direct_register_custom_op(GROUP_QUANT, block_fp8_group_quant,
                              ["result", "scale"], block_fp8_group_quant_fake,
                              dispatch_key=key)
    direct_register_custom_op(BLOCK_MM, block_fp8_mm, [], block_fp8_mm_fake,
                              dispatch_key=key)


# --- the Dynamo-graph rewrite -----------------------------------------------

def _is_view(node):
    return node.op == "call_method" and node.target in _VIEW_METHODS or \
        node.op == "call_function" and node.target is torch.reshape


def _root(node):
    while _is_view(node):
        node = node.args[0]
    return node


def _val(node):
    return node.meta.get("example_value", node.meta.get("val"))


def _attention_output(node):
    """The buffer unified_attention_with_output writes (None for
    unified_attention, which returns its output)."""
    if str(node.target) != "vllm.unified_attention_with_output":
        return None
    return node.kwargs.get("output", node.args[3] if len(node.args) > 3 else None)


def _layer_name(node):
    return node.kwargs.get("layer_name", node.args[-1])


def linear_after(attn):
    """The stock block-FP8 linear reading ``attn``'s output through views,
    or a string saying why there is none (or another reader)."""
    order = {n: i for i, n in enumerate(attn.graph.nodes)}
    out = _attention_output(attn)
    if out is None:
        return "attention allocates its own output (unified_attention)"
    aliases, linear = [_root(out)], None
    for alias in aliases:
        for user in alias.users:
            if user is attn:
                continue
            if _is_view(user) and user.args[0] is alias:
                aliases.append(user)
            elif order[user] < order[attn]:
                continue
            elif str(user.target) == STOCK_LINEAR and linear is None \
                    and user.kwargs.get("input") is alias:
                linear = user
            else:
                return f"attention output has another reader ({user.name})"
    return linear or "no block-FP8 linear after the attention"


def decompose(graph, vllm_config):
    """Rewrite every fusable attention -> views -> block-FP8 o_proj (module
    docstring); returns the number of layers rewritten."""
    if vllm_config is None or not getattr(
            vllm_config.compilation_config.pass_config, "enable_attn_fusion",
            False):
        return 0
    layers = vllm_config.compilation_config.static_forward_context
    count, skipped = 0, []
    for attn in list(graph.graph.nodes):
        if attn.op != "call_function" or str(attn.target) not in (
                "vllm.unified_attention_with_output", "vllm.unified_attention"):
            continue
        name = _layer_name(attn)
        linear = linear_after(attn)
        if isinstance(linear, str):
            if "no block-FP8" not in linear:
                skipped.append(f"{name} ({linear})")
            continue
        why = _why_not(linear, layers.get(name))
        if why:
            skipped.append(f"{name} ({why})")
            continue
        _rewrite(graph.graph, attn, linear)
        count += 1
    for reason in skipped:
        logger.info("Block-FP8 o_proj kept stock: %s", reason)
    if count:
        logger.info("Block-FP8 o_proj split into group quant + GEMM for %d "
                    "attention layers", count)
        graph.recompile()
    return count


def _why_not(linear, layer):
    kwargs = linear.kwargs
    x = _val(kwargs["input"])
    block = list(kwargs["block_size"])
    if layer is None or not hasattr(layer, "can_fuse_output_quant"):
        return "not an Attention layer"
    head = layer.head_size
    if kwargs.get("input_scale") is not None:
        return "static input scale"
    if block[1] != head:
        return f"weight_block_size[1] = {block[1]} != head size {head}"
    if not layer.can_fuse_output_quant(attention_quant.fp8_group_key(head)):
        return "backend cannot write per-token-group FP8 output"
    if x is None or x.dim() != 2:
        return "o_proj input is not [tokens, heads * head_size]"
    return None


def _rewrite(g, attn, linear):
    kwargs = linear.kwargs
    x_node, weight = kwargs["input"], kwargs["weight"]
    x, w = _val(x_node), _val(weight)
    out3d = _attention_output(attn)
    group = int(kwargs["block_size"][1])
    groups = x.shape[-1] // group
    cutlass = kwargs.get("cutlass_block_fp8_supported")
    if cutlass is None:
        from vllm.model_executor.layers.quantization.utils.w8a8_utils import (
            CUTLASS_BLOCK_FP8_SUPPORTED)
        cutlass = CUTLASS_BLOCK_FP8_SUPPORTED
    use_cutlass = uses_cutlass(tuple(w.shape), cutlass)
    # Allocations in front of the attention: in the preceding captured piece.
    with g.inserting_before(attn):
        tokens = g.call_method("size", (out3d, 0))
        buf = g.call_function(torch.empty_like, (out3d, ),
                              {"dtype": torch.float8_e4m3fn})
        if use_cutlass:   # column-major [T, G], as vLLM allocates it
            # (a transposed view: Inductor keeps a view's strides across a
            # piece boundary; an empty_strided output came back row-major)
            scale_t = g.call_function(torch.empty, ((groups, tokens), ),
                                      {"dtype": torch.float32,
                                       "device": x.device})
            scale = g.call_method("t", (scale_t, ))
        else:
            scale = g.call_function(torch.empty, ((tokens, groups), ),
                                    {"dtype": torch.float32,
                                     "device": x.device})
    with g.inserting_before(linear):
        result = g.call_method("view", (buf, -1, x.shape[-1]))
        g.call_function(getattr(torch.ops.vllm, GROUP_QUANT),
                        (result, x_node, scale, group, use_cutlass))
        mm = g.call_function(getattr(torch.ops.vllm, BLOCK_MM),
                             (result, scale, weight, list(kwargs["block_size"]),
                              kwargs["weight_scale"], kwargs.get("bias"),
                              use_cutlass, x.dtype))
    mm.meta.update(linear.meta)
    linear.replace_all_uses_with(mm)
    g.erase_node(linear)
