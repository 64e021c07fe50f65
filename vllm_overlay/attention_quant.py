"""Attention layers carry their output-quantization state (RFC #16220, 1).

After ``install()``:

- every ``Attention`` layer has ``output_scale`` (None until the fusion pass
  binds the o_proj input scale) and ``can_fuse_output_quant(key)``;
- ``AttentionImpl.fused_output_quant_supported(key) -> bool`` exists and is
  False for every stock backend; a backend whose kernel writes quantized
  output overrides it (``triton_backend``);
- with ``enable_attn_fusion``, vLLM's default loader refuses a checkpoint
  whose static activation scales are not finite and positive.

``QuantKey`` names a quantization scheme; static per-tensor FP8 and dynamic
per-token-group FP8 with group = head size (block-FP8 checkpoints,
``fp8_group_key``) are fused; per-token schemes slot in as new keys.
"""
import dataclasses
import logging
import sys

import torch

VLLM_TARGET = "vllm/attention/output_quant.py"
VLLM_HOOKS = ("vllm/attention/layer.py",
              "vllm/model_executor/model_loader/loader.py")

logger = logging.getLogger("vllm.overlay")


@dataclasses.dataclass(frozen=True)
class QuantKey:
    dtype: torch.dtype
    static: bool             # scale known before the kernel runs
    group: str = "tensor"    # "tensor" | "token" | "group:<size>"

    def __str__(self):
        kind = "static" if self.static else "dynamic"
        return f"{self.dtype}/{kind}/{self.group}"


FP8_STATIC_TENSOR = QuantKey(torch.float8_e4m3fn, static=True)
FP8_DYNAMIC_TOKEN = QuantKey(torch.float8_e4m3fn, static=False, group="token")


def fp8_group_key(group_size: int) -> QuantKey:
    """Dynamic per-token-group FP8 (vLLM's ``per_token_group_quant_fp8``):
    one fp32 scale per token and ``group_size`` channels."""
    return QuantKey(torch.float8_e4m3fn, static=False, group=f"group:{group_size}")


def fusable_keys(layer):
    """The output quants ``layer``'s backend can write (static per-tensor FP8,
    per-token-group FP8 with group = head size)."""
    keys = (FP8_STATIC_TENSOR, fp8_group_key(layer.head_size))
    return [k for k in keys if layer.can_fuse_output_quant(k)]


class UnsupportedOutputQuant(ValueError):
    pass


def fused_output_quant_supported(self, quant_key: QuantKey) -> bool:
    """Can this backend write ``quant_key``-quantized attention output?"""
    return False


def can_fuse_output_quant(self, quant_key: QuantKey) -> bool:
    return bool(self.impl.fused_output_quant_supported(quant_key))


def check_output_scale(layer, output, output_scale, group_scales=None):
    """Raise a clear error unless ``layer``'s backend can write ``output``
    quantized with ``output_scale``."""
    key = QuantKey(output.dtype, static=True) if group_scales is None \
        else fp8_group_key(layer.head_size)
    if output.dtype != torch.float8_e4m3fn or \
            not layer.can_fuse_output_quant(key):
        raise UnsupportedOutputQuant(
            f"{type(layer.impl).__name__} (layer {layer.layer_name}) cannot "
            f"write quantized attention output ({key}); output_scale must be "
            "None for this backend")


class InvalidActivationScale(ValueError):
    pass


def check_static_scales(model):
    """Raise unless every static activation scale (``input_scale``) of
    ``model`` is finite and positive.  The fused attention epilogue divides
    by the o_proj input scale: 0, negative, NaN or inf would write garbage
    FP8 (as the unfused quant would); refuse the checkpoint instead."""
    bad = []
    for name, module in model.named_modules():
        scale = getattr(module, "input_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() and not bool(
                (torch.isfinite(scale) & (scale > 0)).all()):
            bad.append(f"{name}.input_scale = {scale.detach().flatten()[:4].tolist()}")
    if bad:
        raise InvalidActivationScale(
            "enable_attn_fusion: static FP8 activation scales must be finite "
            "and > 0; this checkpoint has " + "; ".join(bad))


def _install_load_check():
    from vllm.model_executor.model_loader.loader import DefaultModelLoader
    stock = DefaultModelLoader.load_model
    if getattr(stock, "_vllm_overlay", False):
        return

    def load_model(self, vllm_config, *args, **kwargs):
        model = stock(self, vllm_config, *args, **kwargs)
        if getattr(vllm_config.compilation_config.pass_config,
                   "enable_attn_fusion", False):
            check_static_scales(model)
        return model

    load_model._vllm_overlay = True
    DefaultModelLoader.load_model = load_model


def install():
    # Patched vLLM calls this from layer.py and from loader.py: the loader
    # is patched once it is imported (importing it from layer.py would be
    # circular).  Overlay mode imports it first (vllm_overlay.install).
    if "vllm.model_executor.model_loader.loader" in sys.modules:
        _install_load_check()
    from vllm.attention.backends.abstract import AttentionImpl
    from vllm.attention.layer import Attention
    if getattr(Attention.__init__, "_vllm_overlay", False):
        return
    stock_init = Attention.__init__

    def __init__(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        self.output_scale = None

    __init__._vllm_overlay = True
    Attention.__init__ = __init__
    Attention.can_fuse_output_quant = can_fuse_output_quant
    if not hasattr(AttentionImpl, "fused_output_quant_supported"):
        AttentionImpl.fused_output_quant_supported = fused_output_quant_supported
