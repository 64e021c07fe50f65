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
