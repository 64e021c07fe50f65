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

With ``define=True`` (the GPU box, through ``gpu_harness/box.py``) also:
``weak_ref_tensor`` (a non-owning CUDA view) and the
``cutlass_scaled_mm_supports_*`` capability queries.  The layers' own custom ops (``rms_norm``,
``fused_add_rms_norm``, ``silu_and_mul``, ``rotary_embedding``) and vLLM's
fused norm + quant ops are served everywhere: V0 -O 3 calls them.  On CUDA tensors three kernels
take a fast path: ``cutlass_scaled_mm`` with per-tensor scales -> ``torch._scaled_mm``,
``static_scaled_fp8_quant`` -> the overlay's Triton quant kernel (so the
unfused path is not penalised by a slow torch quant), and
``reshape_and_cache_flash`` of a bf16/fp16 cache -> ``cache_copy`` (no host
sync, so it can run inside a CUDA graph capture).  Keep the returned
libraries alive: a collected ``Library`` unregisters its ops.
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
    # Only where there is no _C (``define=True``): vLLM's piecewise CUDA
    # graphs keep weak references to piece outputs; FP8 linear support query.
    "_C::weak_ref_tensor": "(Tensor input) -> Tensor",
    "_C::cutlass_scaled_mm_supports_fp8":
        "(int cuda_device_capability) -> bool",
    "_C::cutlass_scaled_mm_supports_block_fp8":
        "(int cuda_device_capability) -> bool",
    # The layers' custom ops and vLLM's fused norm + quant ops: V1 compiles
    # with custom_ops=["none"] (the models run their torch-native forms),
    # V0 -O 3 calls them.
    "_C::rms_norm":
        "(Tensor($0! -> ) result, Tensor input, Tensor weight, float epsilon) -> ()",
    "_C::fused_add_rms_norm":
        "(Tensor($0! -> ) input, Tensor($1! -> ) residual, Tensor weight, "
        "float epsilon) -> ()",
    "_C::silu_and_mul": "(Tensor($0! -> ) out, Tensor input) -> ()",
    "_C::rotary_embedding":
        "(Tensor positions, Tensor($0! -> ) query, Tensor($1! -> ) key, "
        "int head_size, Tensor cos_sin_cache, bool is_neox) -> ()",
    # vLLM's RMSNorm + quant fusion pass (on in V0 -O 3) rewrites to these.
    "_C::rms_norm_static_fp8_quant":
        "(Tensor($0! -> ) result, Tensor input, Tensor weight, Tensor scale, "
        "float epsilon) -> ()",
    "_C::fused_add_rms_norm_static_fp8_quant":
        "(Tensor($0! -> ) result, Tensor input, Tensor($1! -> ) residual, "
        "Tensor weight, Tensor scale, float epsilon) -> ()",
    "_C::rms_norm_dynamic_per_token_quant":
        "(Tensor($0! -> ) result, Tensor input, Tensor weight, "
        "Tensor($1! -> ) scale, float epsilon, Tensor? scale_ub, "
        "Tensor($2! -> )? residual) -> ()",
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
    if (input.is_cuda and result.shape == input.shape and result.dtype == FP8
            and input.is_contiguous() and result.is_contiguous()):
        # CUDA fast path: the overlay's Triton quant kernel (same arithmetic,
        # checked against this torch form in tests/gpu); one launch, like _C.
        from vllm_overlay.triton_paged_attention import static_fp8_quant
        static_fp8_quant(result, input, scale.reshape(1).to(torch.float32))
        return
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
    # scale[t] per token, unchecked like the kernel: vLLM's pattern tracing
    # passes a [1, 1] placeholder for 5 tokens (compilation/fusion.py).
    n = min(scale.numel(), s.numel())
    scale.view(-1)[:n] = s.view(-1)[:n]
    result.copy_(_to_fp8(x / s).reshape(result.shape))


def cutlass_scaled_mm(out, a, b, a_scales, b_scales, bias):
    """out = a_scale * (b_scale * (a @ b)) (+ bias), fp32 accumulate; a
    [M, K] fp8, b [K, N] fp8 (column major), scales per tensor, per token
    ``[M, 1]`` / per channel ``[1, N]``, or block-wise (``_block_scaled``)."""
    if _block_scaled(a, b, a_scales, b_scales):
        out.copy_(_block_scaled_mm(a, b, a_scales, b_scales, bias, out.dtype))
        return
    if (a.is_cuda and a_scales.numel() == 1 and b_scales.numel() == 1
            and a.is_contiguous() and b.t().is_contiguous()):
        # CUDA fast path: cuBLASLt FP8 GEMM (fp32 accumulate, per-tensor
        # scales applied to the accumulator), as CUTLASS ScaledEpilogue does.
        out.copy_(torch._scaled_mm(
            a, b, scale_a=a_scales.reshape(()).to(torch.float32),
            scale_b=b_scales.reshape(()).to(torch.float32),
            bias=bias, out_dtype=out.dtype))
        return
    acc = a.to(torch.float32) @ b.to(torch.float32)
    acc = a_scales.to(torch.float32).reshape(-1, 1) * (
        b_scales.to(torch.float32).reshape(1, -1) * acc)
    if bias is not None:
        acc = acc + bias.to(torch.float32)
    out.copy_(acc.to(out.dtype))


BLOCK = 128    # vLLM 0.8.5's CUTLASS block-wise FP8: 1x128 (a) and 128x128 (b)


def _block_scaled(a, b, a_scales, b_scales):
    """CUTLASS's block-wise case: a_scales [M, K/128], b_scales [K/128, N/128]
    (not a per-channel ``[1, N]``)."""
    k, n = b.shape
    kb, nb = -(-k // BLOCK), -(-n // BLOCK)
    return (a_scales.dim() == 2 and b_scales.dim() == 2
            and tuple(a_scales.shape) == (a.shape[0], kb)
            and tuple(b_scales.shape) == (kb, nb) and b_scales.numel() > 1
            and tuple(b_scales.shape) != (1, n))


def _block_scaled_mm(a, b, a_scales, b_scales, bias, out_dtype):
    """CUTLASS block-scaled GEMM: per 128-wide K block, the fp32 partial
    product scaled by a_scales[m, kb] * b_scales[kb, n // 128], summed in K
    order (fp32)."""
    k, n = b.shape
    acc = torch.zeros(a.shape[0], n, dtype=torch.float32, device=a.device)
    sb_cols = b_scales.to(torch.float32).repeat_interleave(BLOCK, dim=1)[:, :n]
    for kb in range(b_scales.shape[0]):
        lo, hi = kb * BLOCK, min(k, (kb + 1) * BLOCK)
        part = a[:, lo:hi].to(torch.float32) @ b[lo:hi].to(torch.float32)
        acc = acc + part * a_scales[:, kb:kb + 1].to(torch.float32) * sb_cols[kb]
    if bias is not None:
        acc = acc + bias.to(torch.float32)
    return acc.to(out_dtype)


def per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None,
                              column_major_scales=False):
    """vLLM 0.8.5 ``fp8_utils.per_token_group_quant_fp8`` (a Triton kernel,
    no ``_C`` op) in torch, same signature and result layout: the harness
    runs it on CPU tensors instead of the kernel, whose interpreter run
    converts fp32 -> fp8 wrongly (DESIGN.md section 4)."""
    from vllm_overlay.triton_paged_attention import group_fp8_quant_reference
    assert eps == 1e-10 and dtype in (None, FP8)
    return group_fp8_quant_reference(x, group_size, column_major=column_major_scales)


@contextlib.contextmanager
def _python_stand_ins(dispatch_key):
    """vLLM Python ops the block-FP8 linear reaches, for non-CUDA tensors:
    ``per_token_group_quant_fp8`` (torch form above), and
    ``vllm::apply_w8a8_block_fp8_linear`` (registered by vLLM for "CUDA"
    only) served for ``dispatch_key`` by vLLM's own Python implementation."""
    import sys
    fp8_utils = sys.modules.get(
        "vllm.model_executor.layers.quantization.utils.fp8_utils")
    if fp8_utils is None:
        yield
        return
    stock = fp8_utils.per_token_group_quant_fp8

    def group_quant(x, group_size, *args, **kwargs):
        if x.is_cuda:
            return stock(x, group_size, *args, **kwargs)
        return per_token_group_quant_fp8(x, group_size, *args, **kwargs)

    lib = None
    if dispatch_key != "CUDA" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "vllm::apply_w8a8_block_fp8_linear", dispatch_key):
        lib = torch.library.Library("vllm", "IMPL")
        lib.impl("apply_w8a8_block_fp8_linear",
                 fp8_utils.apply_w8a8_block_fp8_linear, dispatch_key)
    fp8_utils.per_token_group_quant_fp8 = group_quant
    try:
        yield
    finally:
        fp8_utils.per_token_group_quant_fp8 = stock
        if lib is not None:
            lib._destroy()


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                            kv_cache_dtype, k_scale, v_scale):
    """key/value [T, Hkv, D] -> cache[slot // block, slot % block] for
    slot >= 0; cache [num_blocks, block_size, Hkv, D] (uint8 for fp8,
    storing fp8(x / scale)).  CUDA, "auto": the kernel in ``cache_copy``
    (no host synchronisation: it runs inside V0's CUDA graphs)."""
    if kv_cache_dtype == "auto" and key.is_cuda:
        from stand_ins import cache_copy
        if cache_copy.supported(key, key_cache) and cache_copy.supported(value, value_cache):
            cache_copy.copy_rows_to_slots(key, key_cache, slot_mapping)
            cache_copy.copy_rows_to_slots(value, value_cache, slot_mapping)
            return
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


def _rms_normed(x, weight, epsilon, dtype):
    """csrc/layernorm_kernels.cu: fp32 variance over the last dim of ``x``
    (fp32), ``(scalar_t)(x * r) * weight[i]``.  Like the kernel, reads
    ``weight[0:hidden]`` without checking its shape: vLLM's pattern
    tracing (compilation/fusion.py) calls these ops on placeholder tensors
    of unrelated shapes."""
    hidden = x.shape[-1]
    r = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    return (x * r).to(dtype) * weight.reshape(-1)[:hidden].to(dtype)


def rms_norm(result, input, weight, epsilon):
    result.copy_(_rms_normed(input.to(torch.float32), weight, epsilon, input.dtype))


def fused_add_rms_norm(input, residual, weight, epsilon):
    """In place: residual = input + residual (in the input dtype), input =
    rms_norm(residual)."""
    residual.copy_(input + residual)
    rms_norm(input, residual, weight, epsilon)


def rms_norm_static_fp8_quant(result, input, weight, scale, epsilon):
    """csrc/quantization/fused_kernels: rms_norm, then the static quant of
    the normed (input dtype) values."""
    normed = _rms_normed(input.to(torch.float32), weight, epsilon, input.dtype)
    inv = torch.reciprocal(scale.reshape(-1)[0].to(torch.float32))
    result.copy_(_to_fp8(normed.to(torch.float32) * inv))


def fused_add_rms_norm_static_fp8_quant(result, input, residual, weight,
                                        scale, epsilon):
    """residual = input + residual (in place), result = quant(rms_norm(residual))."""
    residual.copy_(input + residual)
    rms_norm_static_fp8_quant(result, residual, weight, scale, epsilon)


def rms_norm_dynamic_per_token_quant(result, input, weight, scale, epsilon,
                                     scale_ub, residual):
    """(residual = input + residual, in place, when given) then per token:
    s = max(min(amax, ub) / 448, 1 / (448 * 512)) of the normed row, result
    = fp8(normed / s), scale [T, 1] = s."""
    x = input
    if residual is not None:
        residual.copy_(input + residual)
        x = residual
    normed = _rms_normed(x.to(torch.float32), weight, epsilon, x.dtype)
    dynamic_per_token_scaled_fp8_quant(result, normed, scale, scale_ub)


def silu_and_mul(out, input):
    """csrc/activation_kernels.cu: ``(scalar_t)silu(fp32 x) * y`` for input
    [..., 2d] = [x | y]."""
    d = input.shape[-1] // 2
    x = input[..., :d].to(torch.float32)
    out.copy_((x / (1.0 + torch.exp(-x))).to(input.dtype) * input[..., d:])


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox):
    """csrc/pos_encoding_kernels.cu, in place on query/key [T, H * head_size]
    (or [T, H, head_size]): the first ``rot_dim`` = cos_sin_cache.shape[-1]
    dims of each head rotate by (cos | sin) = cos_sin_cache[position];
    NeoX pairs (i, i + rot_dim / 2), GPT-J pairs (2i, 2i + 1).  fp32
    arithmetic, rounded once."""
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.flatten().long()].to(torch.float32).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (query, key):
        heads = x.view(positions.numel(), -1, head_size)
        r = heads[..., :rot].to(torch.float32)
        if is_neox:
            x1, x2 = r[..., :rot // 2], r[..., rot // 2:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin),
                              dim=-1).flatten(-2)
        heads[..., :rot] = out.to(x.dtype)


def weak_ref_tensor(input):
    """A tensor on ``input``'s memory that does not keep it alive (vLLM's
    C++ op wraps the data pointer without an owner).  CUDA: through
    ``__cuda_array_interface__`` (torch then holds only the small interface
    object); elsewhere: a plain view (a strong reference)."""
    if not input.is_cuda or input.numel() == 0:
        return input.view(input.shape)
    raw_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32,
                 8: torch.int64}[input.element_size()]
    raw = input.view(raw_dtype)
    size = raw.element_size()

    class _Interface:
        __cuda_array_interface__ = {
            "shape": tuple(raw.shape),
            "strides": tuple(st * size for st in raw.stride()),
            "typestr": {torch.uint8: "|u1", torch.int16: "<i2",
                        torch.int32: "<i4", torch.int64: "<i8"}[raw_dtype],
            "data": (raw.data_ptr(), False), "version": 2}

    return torch.as_tensor(_Interface(), device=input.device).view(input.dtype)


def cutlass_scaled_mm_supports_fp8(cuda_device_capability):
    """As vLLM's _C built with CUDA >= 12.0: FP8 from SM 8.9 on."""
    return cuda_device_capability >= 89


def cutlass_scaled_mm_supports_block_fp8(cuda_device_capability):
    """As vLLM's _C: block-wise FP8 on SM 9.0 only (not used here)."""
    return cuda_device_capability == 90


KERNELS = {
    "_C::static_scaled_fp8_quant": static_scaled_fp8_quant,
    "_C::dynamic_scaled_fp8_quant": dynamic_scaled_fp8_quant,
    "_C::dynamic_per_token_scaled_fp8_quant": dynamic_per_token_scaled_fp8_quant,
    "_C::cutlass_scaled_mm": cutlass_scaled_mm,
    "_C_cache_ops::reshape_and_cache_flash": reshape_and_cache_flash,
    "_C::rms_norm": rms_norm,
    "_C::fused_add_rms_norm": fused_add_rms_norm,
    "_C::silu_and_mul": silu_and_mul,
    "_C::rotary_embedding": rotary_embedding,
    "_C::rms_norm_static_fp8_quant": rms_norm_static_fp8_quant,
    "_C::fused_add_rms_norm_static_fp8_quant": fused_add_rms_norm_static_fp8_quant,
    "_C::rms_norm_dynamic_per_token_quant": rms_norm_dynamic_per_token_quant,
}

# Registered only with ``define=True`` (no _C): where _C exists its own
# kernels serve these.  No tensor argument: served for every backend.
DEFINE_KERNELS = {
    "_C::weak_ref_tensor": weak_ref_tensor,
}
ANY_DEVICE_KERNELS = {
    "_C::cutlass_scaled_mm_supports_fp8": cutlass_scaled_mm_supports_fp8,
    "_C::cutlass_scaled_mm_supports_block_fp8": cutlass_scaled_mm_supports_block_fp8,
}


def _writes_only(*args, **kwargs):
    """Meta kernel of an op that returns nothing and writes its outputs."""


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

    def lib(ns):
        if ns not in libs:
            libs[ns] = torch.library.Library(ns, "FRAGMENT" if define else "IMPL")
        return libs[ns]

    for qualified, kernel in KERNELS.items():
        ns, name = qualified.split("::")
        if define:
            lib(ns).define(name + definable(SCHEMAS[qualified]))
            # They only write their arguments: under torch.compile's fake
            # tensors a no-op (without it FakeTensor falls back to running
            # the kernel on real copies of the fake inputs).
            assert SCHEMAS[qualified].endswith("-> ()"), qualified
            lib(ns).impl(name, _writes_only, "Meta")
        lib(ns).impl(name, kernel, dispatch_key)
    if define:
        for qualified, schema in SCHEMAS.items():
            if qualified in KERNELS:
                continue
            ns, name = qualified.split("::")
            lib(ns).define(name + definable(schema))     # schema only, or:
            if qualified in DEFINE_KERNELS:
                lib(ns).impl(name, DEFINE_KERNELS[qualified], dispatch_key)
            if qualified in ANY_DEVICE_KERNELS:
                lib(ns).impl(name, ANY_DEVICE_KERNELS[qualified],
                             "CompositeExplicitAutograd")
    return list(libs.values())


@contextlib.contextmanager
def registered(dispatch_key):
    """The stand-ins serve ``dispatch_key`` for the duration (real ``_C``
    schemas must be loaded)."""
    libs = register(dispatch_key)
    try:
        with _python_stand_ins(dispatch_key):
            yield
    finally:
        for lib in libs:
            lib._destroy()
