"""Block-FP8 checkpoints (issue 14): the o_proj's dynamic per-token-group FP8
quant (group = head size) fused into the attention kernel.

Tiny checkpoint ``fp8-block`` (tiny_checkpoint: hidden 256, 2 heads of 128,
1 KV head, 2 layers, ``weight_block_size [128, 128]``): every linear runs
``vllm::apply_w8a8_block_fp8_linear``.  With ``enable_attn_fusion`` the
o_proj's becomes ``block_fp8_group_quant`` (sticky, fused into attention by
the post-grad pass) + ``block_fp8_mm`` (the GEMM vLLM would call, in the next
captured piece).  Executed on CPU like tests/test_execute.py.

STAND-INS: ``_C::cutlass_scaled_mm`` block-scaled (torch, fp32, per 128-K
block), vLLM's Triton ``per_token_group_quant_fp8`` replaced by its torch form
on CPU tensors (the interpreter's fp32->fp8 cast is wrong), and
``vllm::apply_w8a8_block_fp8_linear`` (registered by vLLM for CUDA only)
served on CPU by vLLM's own Python body (``stand_ins._python_stand_ins``).
"""
import pytest
import torch

import stand_ins
import vllm_overlay
from cpu_harness.compile import ModelSpec, compile_model
from tests.test_execute import (TOLERANCE, _fused_launches,
                                 assert_captured_pieces_read_fixed_addresses,
                                 assert_eager_pieces_equal_inductor, rel)

N = 2
ON = (("enable_attn_fusion", True), )
MODES = ["piecewise", "full"]


def spec(mode, fused=False, fmt="fp8-block", **kw):
    return ModelSpec(mode=mode, num_layers=N, fmt=fmt,
                     pass_config=ON if fused else (), **kw)


def _launches(compiled):
    """Each kernel launch's (out dtype, group-scale strides) over a re-run
    of the steps (``_fused_launches``; the outputs must repeat exactly)."""
    def record(out, kwargs):
        s = kwargs.get("output_group_scale")
        return out.dtype, None if s is None else s.stride()
    return _fused_launches(compiled, record)


@pytest.mark.parametrize("mode", MODES)
def test_block_fp8_fused_runs_bit_identical_to_unfused(overlay_compiled, mode):
    off = overlay_compiled(spec(mode))
    on = overlay_compiled(spec(mode, fused=True))
    for a, b in zip(on.outputs, off.outputs):
        assert torch.equal(a.hidden, b.hidden)
        assert torch.equal(a.logits, b.logits)
    kv_on, kv_off = on.runner.written_kv(), off.runner.written_kv()
    assert all(torch.equal(kv_on[k], kv_off[k]) for k in kv_off)
    launches = _launches(on)
    steps = len(on.outputs)
    # FP8 out with [T, H] scales (CUTLASS path: sm_90).  Observed: the
    # kernel gets them row-major although the graph allocates them
    # column-major (block_fp8_mm restores CUTLASS's layout; see the report).
    assert [d for d, _ in launches] == [torch.float8_e4m3fn] * (N * steps)
    assert all(st is not None for _, st in launches), launches
    assert _launches(off) == [(torch.bfloat16, None)] * (N * steps)
    ops = on.post_grad_ops()
    assert ops["vllm.unified_attention_with_output.output_group_scale"] == N
    assert ops["vllm.block_fp8_group_quant"] == 0
    assert ops["vllm.block_fp8_mm"] == N


@pytest.mark.parametrize("mode", MODES)
def test_block_fp8_compiled_runs_agree_with_eager(overlay_compiled, mode):
    ref = overlay_compiled(spec("eager"))
    for fused in (False, True):
        compiled = overlay_compiled(spec(mode, fused))
        for out, want in zip(compiled.outputs, ref.outputs):
            assert rel(out.hidden, want.hidden) <= TOLERANCE
            assert rel(out.logits, want.logits) <= TOLERANCE


def test_block_fp8_decomposed_unfused_equals_stock(overlay_compiled,
                                                   monkeypatch):
    """Decomposed but not fused (the pass refuses the group key): quant +
    GEMM ops give exactly stock ``apply_w8a8_block_fp8_linear``'s output."""
    import conftest
    from vllm_overlay import attn_fusion
    monkeypatch.setattr(attn_fusion.AttnFusionPass, "fusable_keys",
                        lambda self, name: [vllm_overlay.attention_quant.FP8_STATIC_TENSOR])
    split = compile_model(spec("full", fused=True),
                          work_dir=conftest.WORK_DIR)
    stock = overlay_compiled(spec("full"))
    ops = split.post_grad_ops()
    assert ops["vllm.block_fp8_group_quant"] == N and ops["vllm.block_fp8_mm"] == N
    for a, b in zip(split.outputs, stock.outputs):
        assert torch.equal(a.hidden, b.hidden)
        assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_block_fp8_passes_never_change_piece_inputs(overlay_compiled, mode, fused):
    compiled = overlay_compiled(spec(mode, fused))
    assert compiled.post_grad
    for pg in compiled.post_grad:
        assert pg.inputs_after == pg.inputs_before


def test_block_fp8_captured_pieces(overlay_compiled):
    """CUDA-graph contract: every captured piece reads model inputs,
    parameters, or tensors made inside captured pieces (the FP8 o_proj input
    and its scales are allocated in the piece before the attention); the
    o_proj GEMM stays in a captured piece, the group quant (fused) in the
    uncaptured attention piece."""
    compiled = overlay_compiled(spec("piecewise", fused=True))
    captured = assert_captured_pieces_read_fixed_addresses(compiled)
    for piece in compiled.pieces:
        ops = compiled.piece_ops(piece)
        if piece.name in captured:
            assert ops["vllm.block_fp8_group_quant"] == 0
        else:
            assert ops["vllm.block_fp8_group_quant"] == 1
            assert ops["vllm.block_fp8_mm"] == 0
    assert sum(compiled.piece_ops(p)["vllm.block_fp8_mm"] for p in compiled.pieces
               if p.name in captured) == N


def test_block_fp8_sticky_pieces_run_eager_form(overlay_compiled):
    """The fused group-quant sticky pieces run as plain GraphModules
    (``fused_eager_piece``: no Inductor wrapper on the per-step host path),
    bit-identical to Inductor's compiled pieces."""
    assert_eager_pieces_equal_inductor(overlay_compiled(spec("piecewise", fused=True)))


def _reasons(monkeypatch):
    from vllm_overlay import block_fp8_quant
    logged = []
    monkeypatch.setattr(block_fp8_quant.logger, "info",
                        lambda msg, *a: logged.append(msg % a))
    return logged


@pytest.mark.parametrize("case", ["head64", "flash_attn"])
def test_block_fp8_not_fusable_stays_stock(monkeypatch, case):
    """Group 128 spanning two 64-wide heads, or a backend that cannot write
    FP8: no decomposition, stock op counts, the reason logged."""
    import conftest
    logged = _reasons(monkeypatch)
    kw = dict(fmt="fp8-block-d64") if case == "head64" else \
        dict(attention_backend="FLASH_ATTN_VLLM_V1")
    compiled = compile_model(spec("piecewise", fused=True, **kw),
                             work_dir=conftest.WORK_DIR, execute=False)
    ops = compiled.dynamo_ops()
    assert ops["vllm.apply_w8a8_block_fp8_linear"] == 4 * N
    assert ops["vllm.block_fp8_group_quant"] == ops["vllm.block_fp8_mm"] == 0
    want = "!= head size 64" if case == "head64" else \
        "backend cannot write per-token-group FP8 output"
    assert sum(want in line for line in logged) == N, logged
    assert all(not p.is_splitting_graph or len(compiled.piece_ops(p)) == 1
               for p in compiled.pieces)


# --- ops and stand-ins -------------------------------------------------------

def _block_gemm_float64(q, sx, w, sw):
    """x @ w.T dequantized in float64: q [M, K] fp8, sx [M, K/128], w [N, K],
    sw [N/128, K/128]."""
    x = q.double() * sx.double().repeat_interleave(128, 1)
    wd = w.double() * sw.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    return x @ wd.t()


def test_block_scaled_mm_stand_in_and_gemm_op_paths(overlay_compiled, monkeypatch):
    """``_C::cutlass_scaled_mm`` stand-in with block scales vs float64;
    ``vllm::block_fp8_mm`` takes vLLM's path: CUTLASS with column-major
    scales and ``weight.T``, else the Triton GEMM with row-major scales."""
    import vllm_overlay.triton_paged_attention as tpa
    from vllm.model_executor.layers.quantization.utils import fp8_utils
    overlay_compiled(spec("eager"))        # harness, overlay, vLLM loaded
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 256, generator=g) * 2).to(torch.bfloat16)
    w = (torch.randn(384, 256, generator=g) * 64).to(torch.float8_e4m3fn)
    sw = torch.rand(3, 2, generator=g) + 0.5
    q, sx = tpa.group_fp8_quant_reference(x, 128, column_major=True)
    with stand_ins.registered("CPU"):
        got = torch.ops.vllm.block_fp8_mm(q, sx, w, [128, 128], sw, None, True,
                                          torch.bfloat16)
        stock = torch.ops.vllm.apply_w8a8_block_fp8_linear(
            x, w, [128, 128], sw, None, None, True)
    want = _block_gemm_float64(q, sx, w, sw)
    assert float((got.double() - want).norm() / want.norm()) < 4e-3
    assert torch.equal(got, stock)
    calls = []
    monkeypatch.setattr(fp8_utils, "w8a8_block_fp8_matmul",
                        lambda A, B, As, Bs, bs, output_dtype: calls.append(
                            (As.stride(), B is w)) or torch.zeros(
                                5, 384, dtype=output_dtype))
    q_r, sx_r = tpa.group_fp8_quant_reference(x, 128)
    torch.ops.vllm.block_fp8_mm(q_r, sx_r, w, [128, 128], sw, None, False,
                                torch.bfloat16)
    assert calls == [((2, 1), True)]


def test_group_quant_op_and_stand_in(overlay_compiled):
    """``vllm::block_fp8_group_quant`` on CPU and the harness's
    ``per_token_group_quant_fp8`` write the oracle's bits, both layouts."""
    import vllm_overlay.triton_paged_attention as tpa
    from vllm.model_executor.layers.quantization.utils import fp8_utils
    overlay_compiled(spec("eager"))
    x = (torch.randn(7, 256) * 5).to(torch.bfloat16)
    for cm in (False, True):
        want_q, want_s = tpa.group_fp8_quant_reference(x, 128, column_major=cm)
        q = torch.empty(7, 256, dtype=torch.float8_e4m3fn)
        s = torch.empty(2, 7).t() if cm else torch.empty(7, 2)
        torch.ops.vllm.block_fp8_group_quant(q, x, s, 128, cm)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(s, want_s)
        with stand_ins.registered("CPU"):
            q2, s2 = fp8_utils.per_token_group_quant_fp8(
                x, 128, column_major_scales=cm)
        assert torch.equal(q2.view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(s2, want_s) and s2.stride() == want_s.stride()
