"""Torch stand-ins for the vLLM 0.8.5 ``_C`` ops the embedded models reach.

Where vLLM's compiled extension cannot run its CUDA kernels (the CPU
harness: ``_C`` loads, but there is no GPU) or does not exist (the GPU box:
torch 2.11, no ``_C``), these implementations serve the ops, registered on
the **real schemas** (``SCHEMAS``, as the real ``_C`` prints them; a test
checks them against it).  Each follows the CUDA kernel's arithmetic
(``csrc/quantization/fp8/common.cu``, ``csrc/cache_kernels.cu``,
CUTLASS ``ScaledEpilogue``) and is checked against a plain torch reference
in the tests.  Pure torch, any device::

    with stand_ins.registered("CPU"):                   # real _C present
        model(...)
    stand_ins.register("CUDA", define=True)             # no _C: define too
"""
import contextlib
import re

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                      # vLLM's FP8_E4M3_MAX
MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)   # per-token quant floor

# op -> schema, exactly as ``str(op._schema)`` prints it in vLLM 0.8.5's _C.
SCHEMAS = {
    "_C::static_scaled_fp8_quant":
        "(Tensor($0! -> ) result, Tensor input, Tensor scale) -> ()",
    "_C::dynamic_scaled_fp8_quant":
        "(Tensor($0! -> ) result, Tensor input, Tensor($1! -> ) scale) -> ()",
    "_C::dynamic_per_token_scaled_fp8_quant":
        "(Tensor($0! -> ) result, Tensor input, Tensor($1! -> ) scale, "
        "Tensor? scale_ub) -> ()",
    "_C::cutlass_scaled_mm":
        "(Tensor($0! -> ) out, Tensor a, Tensor b, Tensor a_scales, "
        "Tensor b_scales, Tensor? bias) -> ()",
    "_C_cache_ops::reshape_and_cache_flash":
        "(Tensor key, Tensor value, Tensor($0! -> ) key_cache, "
        "Tensor($1! -> ) value_cache, Tensor slot_mapping, str kv_cache_dtype, "
        "Tensor k_scale, Tensor v_scale) -> ()",
}


def _to_fp8(x32):
    """fp8_e4m3fn(clamp(x, -448, 448)), round to nearest even (NaN stays)."""
    return torch.fmax(torch.fmin(x32, x32.new_tensor(FP8_MAX)),
                      x32.new_tensor(-FP8_MAX)).to(FP8)


def static_scaled_fp8_quant(result, input, scale):
    """result = fp8(clamp(input * (1 / scale))); ``scale`` (1 element) is
    the dequantization scale."""
    if scale.numel() != 1:
        raise ValueError("static_scaled_fp8_quant takes a per-tensor scale")
    inv = torch.reciprocal(scale.reshape(()).to(torch.float32))
    result.copy_(_to_fp8(input.to(torch.float32) * inv))


def dynamic_scaled_fp8_quant(result, input, scale):
    """scale[0] = amax(|input|) / 448, then the static quant with it."""
    scale.reshape(-1)[0] = input.abs().max().to(torch.float32) / FP8_MAX
    static_scaled_fp8_quant(result, input, scale)


def dynamic_per_token_scaled_fp8_quant(result, input, scale, scale_ub):
    """Per row: s = max(min(amax, ub) / 448, 1 / (448 * 512)); q = fp8(x / s)."""
    x = input.to(torch.float32).reshape(-1, input.shape[-1])
    amax = x.abs().amax(dim=-1, keepdim=True)
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub.to(torch.float32).reshape(()))
    s = torch.clamp(amax / FP8_MAX, min=MIN_SCALING_FACTOR)
    scale.copy_(s.reshape(scale.shape))
    result.copy_(_to_fp8(x / s).reshape(result.shape))


def cutlass_scaled_mm(out, a, b, a_scales, b_scales, bias):
    """out = a_scale * (b_scale * (a @ b)) (+ bias), fp32 accumulate; a
    [M, K] fp8, b [K, N] fp8 (column major), scales per tensor, per token
    ``[M, 1]`` / per channel ``[1, N]``."""
    acc = a.to(torch.float32) @ b.to(torch.float32)
    acc = a_scales.to(torch.float32).reshape(-1, 1) * (
        b_scales.to(torch.float32).reshape(1, -1) * acc)
    if bias is not None:
        acc = acc + bias.to(torch.float32)
    out.copy_(acc.to(out.dtype))


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                            kv_cache_dtype, k_scale, v_scale):
    """key/value [T, Hkv, D] -> cache[slot // block, slot % block] for
    slot >= 0; cache [num_blocks, block_size, Hkv, D] (uint8 for fp8,
    storing fp8(x / scale))."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for src, cache, s in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])
        x = src[:slot_mapping.shape[0]][keep]
        if kv_cache_dtype == "auto":
            flat[slots] = x.to(cache.dtype)
        elif kv_cache_dtype in ("fp8", "fp8_e4m3"):
            q = _to_fp8(x.to(torch.float32) / s.to(torch.float32).reshape(()))
            flat[slots] = q.view(torch.uint8) if cache.dtype == torch.uint8 \
                else q.to(cache.dtype)
        else:
            raise ValueError(f"stand-in: unsupported kv_cache_dtype {kv_cache_dtype}")


KERNELS = {
    "_C::static_scaled_fp8_quant": static_scaled_fp8_quant,
    "_C::dynamic_scaled_fp8_quant": dynamic_scaled_fp8_quant,
    "_C::dynamic_per_token_scaled_fp8_quant": dynamic_per_token_scaled_fp8_quant,
    "_C::cutlass_scaled_mm": cutlass_scaled_mm,
    "_C_cache_ops::reshape_and_cache_flash": reshape_and_cache_flash,
}


def definable(schema):
    """``Tensor($0! -> )`` (how the dispatcher prints a written alias set)
    as ``Tensor(a0!)`` (how ``Library.define`` reads it)."""
    return re.sub(r"\(\$(\d+)! -> \)", r"(a\1!)", schema)


def real_schemas():
    """op -> schema string of the loaded ``_C`` (None where missing)."""
    out = {}
    for qualified in SCHEMAS:
        ns, name = qualified.split("::")
        packet = getattr(getattr(torch.ops, ns), name, None)
        out[qualified] = None if packet is None else \
            str(packet.default._schema).split(qualified, 1)[1]
    return out


def register(dispatch_key, define=False):
    """Register every stand-in for ``dispatch_key``; with ``define`` also
    define the schemas (a process without vLLM's ``_C``).  Returns the
    libraries (``_destroy()`` them to unregister)."""
    libs = {}
    for qualified, kernel in KERNELS.items():
        ns, name = qualified.split("::")
        if ns not in libs:
            libs[ns] = torch.library.Library(ns, "FRAGMENT" if define else "IMPL")
        if define:
            libs[ns].define(name + definable(SCHEMAS[qualified]))
        libs[ns].impl(name, kernel, dispatch_key)
    return list(libs.values())


@contextlib.contextmanager
def registered(dispatch_key):
    """The stand-ins serve ``dispatch_key`` for the duration (real ``_C``
    schemas must be loaded)."""
    libs = register(dispatch_key)
    try:
        yield
    finally:
        for lib in libs:
            lib._destroy()
