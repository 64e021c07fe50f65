"""A CUDA-graph-safe ``reshape_and_cache_flash`` for the stand-ins.

The torch form in ``stand_ins`` selects valid slots with a boolean mask,
which synchronizes with the host: fine where attention runs outside CUDA
graphs (V1 piecewise), not inside V0's whole-model decode graphs.  This
kernel does what the CUDA kernel does: one program per token, skipped when
its slot is negative (padding), its row of ``Hkv * D`` elements copied to
``cache[slot // block_size, slot % block_size]``.  Reference: the torch
form (``stand_ins.reshape_and_cache_flash``), same result.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows_to_slots(src, src_row_stride, dst, slots, row_elems,
                        BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    if slot >= 0:
        for start in range(0, row_elems, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < row_elems
            x = tl.load(src + t * src_row_stride + offs, mask=mask)
            tl.store(dst + slot * row_elems + offs, x.to(dst.dtype.element_ty), mask=mask)


def supported(src: torch.Tensor, cache: torch.Tensor) -> bool:
    """src [T, Hkv, D] with contiguous rows; cache [blocks, block, Hkv, D]
    contiguous, same dtype (kv_cache_dtype "auto")."""
    return (src.dim() == 3 and src.stride(-1) == 1 and src.stride(-2) == src.shape[-1]
            and cache.is_contiguous() and cache.dtype == src.dtype
            and tuple(cache.shape[2:]) == tuple(src.shape[1:]))


def copy_rows_to_slots(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache[slot // block, slot % block] = src[t] for each t < len(slot_mapping) with slot >= 0."""
    n = slot_mapping.shape[0]
    row = src.shape[1] * src.shape[2]
    if n == 0:
        return
    _copy_rows_to_slots[(n,)](src, src.stride(0), cache, slot_mapping, row,
                              BLOCK=min(1024, triton.next_power_of_2(row)))
