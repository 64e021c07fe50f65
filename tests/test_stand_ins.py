"""The ``_C`` stand-ins: real schemas, and each kernel against a plain
float64 torch reference on fresh random inputs (outputs poisoned first)."""
import pytest
import torch

import stand_ins

FP8 = torch.float8_e4m3fn


def test_schemas_are_the_real_ones():
    import vllm._custom_ops  # noqa: F401  (loads the real _C)
    assert stand_ins.real_schemas() == stand_ins.SCHEMAS


def test_schemas_define_as_printed():
    """Where there is no _C (the GPU box) the stand-ins define the ops from
    SCHEMAS; the defined schema is the real one (a schema defined from
    Python prints its alias sets as ``(a0!)``, the C++ one as ``($0! -> )``)."""
    ns = "stand_ins_schema_check"
    lib = torch.library.Library(ns, "FRAGMENT")
    try:
        for qualified, schema in stand_ins.SCHEMAS.items():
            name = qualified.split("::")[1]
            lib.define(name + stand_ins.definable(schema))
            printed = str(getattr(torch.ops, ns).__getattr__(name).default._schema)
            assert printed == f"{ns}::{name}{stand_ins.definable(schema)}"
            assert "$" not in printed
    finally:
        lib._destroy()


def _fp8_reference(x64, inv_scale64):
    return (x64 * inv_scale64).clamp(-448, 448)


def _assert_fp8_close(q, ref64):
    """Within one e4m3 step, and exact for nearly all elements (fp32 vs
    float64 arithmetic may round a tie differently)."""
    got = q.to(torch.float64)
    want = ref64.to(FP8).to(torch.float64)
    torch.testing.assert_close(got, ref64, rtol=2 ** -3, atol=2 ** -9)
    assert (got == want).double().mean() > 0.99


def test_static_quant():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(37, 96, generator=g) * 3).to(torch.bfloat16)
    x[0, :4] = torch.tensor([1e4, -1e4, 0.0, 3.0])          # clamp both ways
    scale = torch.tensor([0.013])
    q = torch.full((37, 96), float("nan")).to(FP8)
    stand_ins.static_scaled_fp8_quant(q, x, scale)
    _assert_fp8_close(q, _fp8_reference(x.double(), 1 / scale.double()))
    assert q[0, 0].float() == 448 and q[0, 1].float() == -448


def test_dynamic_quants():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(19, 64, generator=g) * 5).to(torch.bfloat16)
    q = torch.full((19, 64), float("nan")).to(FP8)
    s = torch.full((1, ), -1.0)
    stand_ins.dynamic_scaled_fp8_quant(q, x, s)
    assert float(s) == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    _assert_fp8_close(q, _fp8_reference(x.double(), 1 / s.double()))
    q.fill_(float("nan"))
    s = torch.full((19, 1), -1.0)
    x[3] = 0                                                  # floor scale
    stand_ins.dynamic_per_token_scaled_fp8_quant(q, x, s, None)
    amax = x.double().abs().amax(-1, keepdim=True)
    want = torch.clamp(amax / 448, min=1 / (448 * 512))
    torch.testing.assert_close(s.double(), want, rtol=1e-6, atol=0)
    _assert_fp8_close(q, _fp8_reference(x.double(), 1 / s.double()))


@pytest.mark.parametrize("per_token", [False, True])
def test_cutlass_scaled_mm(per_token):
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(21, 64, generator=g) * 8).to(FP8)
    b = (torch.randn(48, 64, generator=g) * 8).to(FP8).t()     # column major
    a_s = torch.rand(21, 1, generator=g) + 0.1 if per_token else torch.tensor([0.02])
    b_s = torch.rand(48, generator=g) + 0.1 if per_token else torch.tensor([0.03])
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    out = torch.full((21, 48), float("nan"), dtype=torch.bfloat16)
    stand_ins.cutlass_scaled_mm(out, a, b, a_s, b_s, bias)
    want = (a.double() @ b.double()) * a_s.double().reshape(-1, 1) \
        * b_s.double().reshape(1, -1) + bias.double()
    torch.testing.assert_close(out.double(), want, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_reshape_and_cache_flash(kv_dtype):
    g = torch.Generator().manual_seed(4)
    key, value = (torch.randn(6, 2, 32, generator=g).to(torch.bfloat16)
                  for _ in range(2))
    slots = torch.tensor([17, 3, -1, 40, 16, 5])
    dtype = torch.uint8 if kv_dtype == "fp8" else torch.bfloat16
    kc, vc = (torch.randint(0, 255, (4, 16, 2, 32), generator=g).to(dtype)
              for _ in range(2))
    before = kc.clone(), vc.clone()
    k_scale, v_scale = torch.tensor(0.05), torch.tensor(0.07)
    stand_ins.reshape_and_cache_flash(key, value, kc, vc, slots, kv_dtype,
                                      k_scale, v_scale)
    for src, cache, old, scale in ((key, kc, before[0], k_scale),
                                   (value, vc, before[1], v_scale)):
        flat, old = cache.view(64, 2, 32), old.view(64, 2, 32)
        for i, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            row = flat[slot]
            if kv_dtype == "fp8":
                _assert_fp8_close(row.view(FP8), src[i].double() / scale.double())
            else:
                assert torch.equal(row, src[i])
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[slots[slots >= 0]] = False
        assert torch.equal(flat[untouched], old[untouched])


def _bf16_close(got, ref64, steps=2):
    """Within ``steps`` bf16 rounding steps of the float64 reference (the
    kernels round intermediate results to bf16 as the CUDA kernels do)."""
    tol = steps * 2.0 ** -8 * ref64.abs() + 1e-6
    assert ((got.double() - ref64).abs() <= tol).all()


def test_rms_norm_and_fused_add():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 96, generator=g) * 3).to(torch.bfloat16)
    res = torch.randn(7, 96, generator=g).to(torch.bfloat16)
    w = (torch.rand(96, generator=g) + 0.5).to(torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    stand_ins.rms_norm(out, x, w, 1e-6)
    x64 = x.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    _bf16_close(out, ref)
    inp, r = x.clone(), res.clone()
    stand_ins.fused_add_rms_norm(inp, r, w, 1e-6)
    z = (x + res).double()          # the kernel's residual is rounded to bf16
    assert torch.equal(r, (x.float() + res.float()).to(torch.bfloat16))
    _bf16_close(inp, z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double())


def test_silu_and_mul():
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 2 * 48, generator=g) * 4).to(torch.bfloat16)
    out = torch.full((5, 48), float("nan"), dtype=torch.bfloat16)
    stand_ins.silu_and_mul(out, x)
    a, b = x[:, :48].double(), x[:, 48:].double()
    _bf16_close(out, a / (1 + torch.exp(-a)) * b)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_embedding(is_neox):
    """In place on strided views of one qkv tensor (as the layers pass
    them), partial rotary dim, positions out of order."""
    g = torch.Generator().manual_seed(7)
    T, Hq, Hk, hs, rot = 6, 4, 2, 32, 16
    qkv = torch.randn(T, (Hq + 2 * Hk) * hs, generator=g).to(torch.bfloat16)
    q, k = qkv[:, :Hq * hs], qkv[:, Hq * hs:(Hq + Hk) * hs]
    q0, k0, v0 = q.clone(), k.clone(), qkv[:, (Hq + Hk) * hs:].clone()
    pos = torch.tensor([5, 0, 9, 3, 3, 1])
    angle = torch.rand(12, rot // 2, generator=g, dtype=torch.float64) * 6
    cache = torch.cat((angle.cos(), angle.sin()), -1).to(torch.bfloat16)
    stand_ins.rotary_embedding(pos, q, k, hs, cache, is_neox)
    cos, sin = cache.double()[pos].chunk(2, -1)
    for got, old, H in ((q, q0, Hq), (k, k0, Hk)):
        h = old.double().view(T, H, hs)
        r = h[..., :rot]
        if is_neox:
            x1, x2 = r[..., :rot // 2], r[..., rot // 2:]
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
        o1 = x1 * cos[:, None] - x2 * sin[:, None]
        o2 = x2 * cos[:, None] + x1 * sin[:, None]
        rot_ref = torch.cat((o1, o2), -1) if is_neox else \
            torch.stack((o1, o2), -1).flatten(-2)
        got = got.view(T, H, hs)
        _bf16_close(got[..., :rot], rot_ref, steps=4)
        assert torch.equal(got[..., rot:], old.view(T, H, hs)[..., rot:])
    assert torch.equal(qkv[:, (Hq + Hk) * hs:], v0)       # value untouched


def test_fused_rms_norm_quants():
    """vLLM's norm + quant fused ops: the norm's bf16 output quantized
    (static, and dynamic per token with and without residual), against a
    float64 reference; in-place residual as the unfused pair leaves it."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 64, generator=g) * 2).to(torch.bfloat16)
    res = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    w = (torch.rand(64, generator=g) + 0.5).to(torch.bfloat16)
    scale = torch.tensor([0.01])

    def normed64(v):
        """The norm's bf16 output (the kernels quantize that), via float64."""
        v = v.double()
        n = (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
        return (n.double() * w.double()).to(torch.bfloat16).double()

    out = torch.full((6, 64), 0xFF, dtype=torch.uint8).view(FP8)
    stand_ins.rms_norm_static_fp8_quant(out, x, w, scale, 1e-5)
    _assert_fp8_close(out, (normed64(x) / 0.01).clamp(-448, 448))
    r = res.clone()
    out2 = torch.full((6, 64), 0xFF, dtype=torch.uint8).view(FP8)
    stand_ins.fused_add_rms_norm_static_fp8_quant(out2, x, r, w, scale, 1e-5)
    assert torch.equal(r, x + res)
    _assert_fp8_close(out2, (normed64(x + res) / 0.01).clamp(-448, 448))
    for residual in (None, res.clone()):
        out3 = torch.full((6, 64), 0xFF, dtype=torch.uint8).view(FP8)
        s = torch.full((6, 1), float("nan"))
        stand_ins.rms_norm_dynamic_per_token_quant(out3, x, w, s, 1e-5, None, residual)
        n = normed64(x if residual is None else x + res)
        s_ref = n.abs().amax(-1, keepdim=True) / 448
        torch.testing.assert_close(s.double(), s_ref, rtol=2 ** -7, atol=0)
        _assert_fp8_close(out3, n / s.double())


def test_cache_copy_kernel_equals_torch_form():
    """stand_ins.cache_copy (the CUDA-graph-safe path, run here by Triton's
    interpreter) == the torch form: strided key rows (a view of qkv),
    padding slots (-1), poisoned cache elsewhere untouched."""
    import os
    import subprocess
    import sys
    code = r'''
import torch, stand_ins
from stand_ins import cache_copy
g = torch.Generator().manual_seed(9)
qkv = torch.randn(7, 3 * 2 * 16, generator=g).to(torch.bfloat16)
key = qkv[:, 32:64].view(7, 2, 16)
slots = torch.tensor([17, 3, -1, 40, 16, 5, -1])
cache = torch.randn(4, 16, 2, 16, generator=g).to(torch.bfloat16)
ref = cache.clone()
assert cache_copy.supported(key, cache)
cache_copy.copy_rows_to_slots(key, cache, slots)
stand_ins.reshape_and_cache_flash(key, key, ref, ref.clone(), slots, "auto",
                                  torch.tensor(1.0), torch.tensor(1.0))
assert torch.equal(cache, ref)
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
