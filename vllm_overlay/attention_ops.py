"""``output_scale`` for vLLM's attention custom ops (upstream's later API).

vLLM 0.8.5 registers ``vllm::unified_attention`` and
``vllm::unified_attention_with_output`` at import time, and a registered
schema cannot be redefined.  This module adds an ``output_scale`` overload
of each op instead, under the same names::

    torch.ops.vllm.unified_attention_with_output(q, k, v, out, layer_name)
        -> stock (.default)
    torch.ops.vllm.unified_attention_with_output(q, k, v, out, layer_name,
                                                 output_scale=scale)
        -> .output_scale: out = fp8(clamp(attention / scale, -448, 448))

so it works whatever the import order (overlay before or after vLLM) and is
the same in overlay and patched mode.  A second overload of
``unified_attention_with_output`` writes dynamic per-token-group FP8 (group =
head size, block-FP8 checkpoints) and its scales::

    torch.ops.vllm.unified_attention_with_output.output_group_scale(
        q, k, v, out, layer_name, output_group_scale=scales)
        -> out = fp8 per (token, head), scales[t, h] = max(amax, 1e-10) / 448  A backend that cannot write quantized
output raises ``UnsupportedOutputQuant`` when handed a scale.
"""
from typing import Optional

import torch

import vllm_overlay.attention_quant as attention_quant

VLLM_TARGET = "vllm/attention/output_scale_ops.py"
VLLM_HOOKS = ("vllm/attention/layer.py", )

OVERLOAD = "output_scale"
GROUP_OVERLOAD = "output_group_scale"
_lib = None


def _layer_and_cache(layer_name):
    from vllm.forward_context import get_forward_context
    context = get_forward_context()
    layer = context.no_compile_layers[layer_name]
    return context, layer, layer.kv_cache[context.virtual_engine]


def _forward_quantized(query, key, value, output, layer_name, output_scale,
                       group_scales=None):
    from vllm.attention import layer as attn_layer
    attn_layer.wait_for_kv_layer_from_connector(layer_name)
    context, layer, kv_cache = _layer_and_cache(layer_name)
    # Per call on the decode hot path: check a layer's capability once per
    # (dtype, scheme), and bind the scale as a plain attribute (assigning a
    # Parameter to a Module would register it as the layer's parameter).
    checked = layer.__dict__.setdefault("_vllm_overlay_checked", set())
    scheme = (output.dtype, group_scales is None)
    if scheme not in checked:
        attention_quant.check_output_scale(layer, output, output_scale,
                                           group_scales)
        checked.add(scheme)
    quant = {"output_scale": output_scale} if group_scales is None \
        else {"output_group_scale": group_scales}
    if layer.__dict__.get("output_scale") is not output_scale:
        object.__setattr__(layer, "output_scale", output_scale)
    layer.impl.forward(layer, query, key, value, kv_cache,
                       context.attn_metadata, output=output, **quant)
    attn_layer.maybe_save_kv_layer_to_connector(layer_name, kv_cache)


def unified_attention_with_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
    output_scale: Optional[torch.Tensor] = None,
) -> None:
    if output_scale is None:
        from vllm.attention import layer as attn_layer
        return attn_layer.unified_attention_with_output(query, key, value,
                                                        output, layer_name)
    _forward_quantized(query, key, value, output, layer_name, output_scale)


def unified_attention_with_output_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
    output_scale: Optional[torch.Tensor] = None,
) -> None:
    return


def unified_attention_with_output_group(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
    output_group_scale: torch.Tensor,
) -> None:
    _forward_quantized(query, key, value, output, layer_name, None,
                       output_group_scale)


def unified_attention_with_output_group_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
    output_group_scale: torch.Tensor,
) -> None:
    return


def unified_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_name: str,
    output_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if output_scale is None:
        from vllm.attention import layer as attn_layer
        return attn_layer.unified_attention(query, key, value, layer_name)
    output = torch.empty(query.shape, dtype=torch.float8_e4m3fn,
                         device=query.device)
    _forward_quantized(query, key, value, output, layer_name, output_scale)
    return output


def unified_attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_name: str,
    output_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    dtype = query.dtype if output_scale is None else torch.float8_e4m3fn
    return torch.empty(query.shape, dtype=dtype, device=query.device)


def _define(lib, name, fn, fake, mutates_args, dispatch_key, overload=OVERLOAD):
    schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
    lib.define(f"{name}.{overload}{schema}")
    lib.impl(f"{name}.{overload}", fn, dispatch_key=dispatch_key)
    lib._register_fake(f"{name}.{overload}", fake)


def installed():
    return hasattr(torch.ops.vllm.unified_attention_with_output, OVERLOAD)


def install():
    global _lib
    import vllm.attention.layer  # noqa: F401  (registers the .default ops)
    from vllm.platforms import current_platform
    if installed():
        return
    _lib = torch.library.Library("vllm", "FRAGMENT")
    key = current_platform.dispatch_key
    _define(_lib, "unified_attention_with_output", unified_attention_with_output,
            unified_attention_with_output_fake, ["output"], key)
    _define(_lib, "unified_attention", unified_attention,
            unified_attention_fake, [], key)
    _define(_lib, "unified_attention_with_output",
            unified_attention_with_output_group,
            unified_attention_with_output_group_fake,
            ["output", "output_group_scale"], key, GROUP_OVERLOAD)


def fused_op(flavour, group=False):
    """The ``output_scale`` overload of 'unified_attention[_with_output]'
    (``group``: the ``output_group_scale`` overload of the latter)."""
    return getattr(getattr(torch.ops.vllm, flavour),
                   GROUP_OVERLOAD if group else OVERLOAD)
