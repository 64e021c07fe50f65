"""On the GPU box (no _C): each stand-in's CUDA path against its torch
reference (the generic torch implementation, checked against float64 in
tests/test_stand_ins.py).  pytest gpu_harness/check_stand_ins_gpu.py"""
import pytest
import torch

import stand_ins

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FP8 = torch.float8_e4m3fn


def test_static_quant_fast_path_equals_torch():
    x = (torch.randn(1000, 4096, device="cuda") * 3).to(torch.bfloat16)
    scale = torch.tensor([0.0131], device="cuda")
    fast = torch.empty_like(x, dtype=FP8)
    stand_ins.static_scaled_fp8_quant(fast, x, scale)
    ref = stand_ins._to_fp8(x.float() * (1.0 / scale.reshape(())))
    same = (fast.view(torch.uint8) == ref.view(torch.uint8)).float().mean().item()
    step = (fast.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -3 + 2 ** -9
    print(f"static quant: fast path == torch for {same:.6%} of elements")
    assert same > 0.999 and bool(step.all())


@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_fast_path_close_to_torch(bias):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(77, 512, device="cuda", generator=g).to(FP8)
    b = torch.randn(256, 512, device="cuda", generator=g).to(FP8).t()
    sa, sb = torch.tensor([0.02], device="cuda"), torch.tensor([0.03], device="cuda")
    bias_t = torch.randn(256, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    out = torch.empty(77, 256, dtype=torch.bfloat16, device="cuda")
    stand_ins.cutlass_scaled_mm(out, a, b, sa, sb, bias_t)
    ref = (a.double() @ b.double()) * 0.02 * 0.03
    if bias:
        ref = ref + bias_t.double()
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -7, atol=1e-3)


def test_weak_ref_tensor_aliases_without_owning():
    x = torch.randn(8, 16, device="cuda").to(torch.bfloat16)[:, 2:]
    w = stand_ins.weak_ref_tensor(x)
    assert w.data_ptr() == x.data_ptr() and w.stride() == x.stride()
    assert w.dtype == x.dtype and torch.equal(w, x)
    x.add_(1)
    assert torch.equal(w, x)


def test_reshape_and_cache_flash_cuda():
    key = torch.randn(6, 2, 32, device="cuda").to(torch.bfloat16)
    value = torch.randn(6, 2, 32, device="cuda").to(torch.bfloat16)
    slots = torch.tensor([17, 3, -1, 40, 16, 5], device="cuda")
    kc = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    one = torch.tensor(1.0, device="cuda")
    stand_ins.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", one, one)
    assert torch.equal(kc.view(64, 2, 32)[40], key[3])
    assert torch.equal(vc.view(64, 2, 32)[5], value[5])
