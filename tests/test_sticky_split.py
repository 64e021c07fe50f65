"""Sticky ops under V1 piecewise compilation, through vLLM's real
VllmBackend (split, PiecewiseCompileInterpreter, PiecewiseBackend)."""
import pytest
import torch

from cpu_harness.compile import ModelSpec, op_counts, op_name_of
import vllm_overlay

N = 2
FUSION_ON = (("enable_attn_fusion", True), )
FUSED = "vllm.unified_attention_with_output.output_scale"
ATTN = "vllm.unified_attention_with_output"
QUANT = "_C.static_scaled_fp8_quant"


def _sticky():
    return vllm_overlay.active("sticky_split")


def piecewise(**kw):
    return ModelSpec(mode="piecewise", num_layers=N, **kw)


def test_attention_pieces_hold_attention_and_quant(overlay_compiled, stock_compiled):
    from vllm.compilation.backends import PiecewiseBackend
    stock = stock_compiled(piecewise())
    compiled = overlay_compiled(piecewise(pass_config=FUSION_ON))
    split_gm = compiled.backend.split_gm
    assert len(compiled.pieces) == len(stock["pieces"]) == 2 * N + 1
    post_grad = iter(compiled.post_grad)   # one per compiled piece, in order
    prev_attention = False
    for piece, stock_piece in zip(compiled.pieces, stock["pieces"]):
        ops = op_counts(piece.graph.graph)
        runner = split_gm.__dict__[piece.name]
        pg = next(post_grad)
        assert piece.is_splitting_graph == stock_piece["is_splitting_graph"]
        if piece.is_splitting_graph:
            # before the pass: attention + its quant only; the FP8 buffer is
            # allocated by the preceding (captured) piece
            assert {k: v for k, v in ops.items() if k not in ("view", "size")} == {
                ATTN: 1, QUANT: 1}
            # after vLLM's passes: the fused op writing into that buffer,
            # views, and functionalization's write-back into the input ...
            assert pg.targets_after.count(FUSED) == 1
            assert set(pg.targets_after) <= {FUSED, "aten.reshape", "getitem",
                                              "aten.copy_"}
            # ... which Inductor reinplaces: the graph it lowers writes the
            # input in place, no allocation, clone or copy
            final = {op_name_of(n.target) for n in pg.after.nodes
                     if n.op == "call_function"}
            assert final <= {FUSED, "aten.reshape"}, final
            # compiled by Inductor, never captured into a CUDA graph
            assert isinstance(runner, _sticky().StickyAttentionPiece)
            assert not isinstance(runner, PiecewiseBackend)
        else:
            assert isinstance(runner, PiecewiseBackend)
            assert runner.cudagraph_capture_sizes, "stock pieces keep CUDA graphs"
            expected = stock_piece["ops"].get(QUANT, 0) - (1 if prev_attention else 0)
            assert ops.get(QUANT, 0) == expected
            assert FUSED not in pg.targets_after
        prev_attention = piece.is_splitting_graph
    fusion = [p for p in compiled.backend.post_grad_pass_manager.passes
              if type(p).__name__ == "AttnFusionPass"]
    assert len(fusion) == 1 and len(fusion[0].fused) == N


def _pieces_code(summary_or_compiled):
    if isinstance(summary_or_compiled, dict):
        return [(p["name"], p["is_splitting_graph"], p["code"])
                for p in summary_or_compiled["pieces"]]
    return [(p.name, p.is_splitting_graph, p.graph.code)
            for p in summary_or_compiled.pieces]


def test_fusion_off_split_identical_to_stock(overlay_compiled, stock_compiled):
    from vllm.compilation.backends import PiecewiseBackend
    ours = overlay_compiled(piecewise())
    assert _pieces_code(ours) == _pieces_code(stock_compiled(piecewise()))
    for piece in ours.pieces:
        runner = ours.backend.split_gm.__dict__.get(piece.name)
        assert piece.is_splitting_graph or isinstance(runner, PiecewiseBackend)
        assert not isinstance(runner, _sticky().StickyAttentionPiece)


def test_non_fusing_backend_split_identical_to_stock(overlay_compiled, stock_compiled):
    """vLLM's FlashAttention V1 backend cannot write FP8: with the flag on,
    nothing sticks and the pieces are exactly stock's."""
    ours = overlay_compiled(piecewise(attention_backend="FLASH_ATTN_VLLM_V1",
                                      pass_config=FUSION_ON))
    assert _pieces_code(ours) == _pieces_code(stock_compiled(piecewise()))
    assert not getattr(ours.backend.split_gm, "_vllm_overlay_sticky", set())
    assert sum(pg.targets_after.count(FUSED) for pg in ours.post_grad) == 0


# --- which nodes stick: real attention layers, a traced graph ---------------

@pytest.fixture(scope="module")
def two_layer_config(monkeypatch_module):
    monkeypatch_module.setenv("VLLM_USE_V1", "1")
    monkeypatch_module.setenv("VLLM_ATTENTION_BACKEND", "TRITON_ATTN_VLLM_V1")
    import vllm_overlay
    vllm_overlay.install()
    from vllm.attention import Attention
    from vllm.config import (CacheConfig, CompilationConfig, VllmConfig,
                             set_current_vllm_config)
    config = VllmConfig(compilation_config=CompilationConfig.from_cli(
        '{"pass_config": {"enable_attn_fusion": true}}'))
    with set_current_vllm_config(config):
        for i in range(2):
            Attention(4, 32, 32 ** -0.5, num_kv_heads=2,
                      cache_config=CacheConfig(block_size=16, swap_space=0),
                      prefix=f"model.layers.{i}.self_attn.attn")
    return config


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _layer(x, q, k, v, scale, weight, i, debug=None):
    out = torch.empty(q.shape, dtype=q.dtype)
    torch.ops.vllm.unified_attention_with_output(
        q.view(-1, 4, 32), k.view(-1, 2, 32), v.view(-1, 2, 32),
        out.view(-1, 4, 32), f"model.layers.{i}.self_attn.attn")
    a = out.view(-1, 128)
    if debug is not None:
        debug.append(a.sum())          # reads the bf16 output for something else
    qbuf = torch.empty(a.size(), dtype=torch.float8_e4m3fn)
    torch.ops._C.static_scaled_fp8_quant(qbuf, a, scale)
    y = torch.empty(q.shape, dtype=q.dtype)
    torch.ops._C.cutlass_scaled_mm(y, qbuf, weight, scale, scale, None)
    return x + y


class _Traced(Exception):
    pass


def _trace(with_debug):
    """The Dynamo graph of a two-layer toy (what VllmBackend receives)."""
    def model(x, q, k, v, s0, s1, w):
        debug = [] if with_debug else None
        x = _layer(x, q, k, v, s0, w, 0, debug)
        x = _layer(x, q * 2, k, v, s1, w, 1)
        return (x, *debug) if debug else x

    captured = {}

    def backend(gm, example_inputs):
        captured["gm"] = gm
        raise _Traced()

    bf16 = dict(dtype=torch.bfloat16)
    inputs = (torch.randn(4, 128, **bf16), torch.randn(4, 128, **bf16),
              torch.randn(4, 64, **bf16), torch.randn(4, 64, **bf16),
              torch.tensor(0.1), torch.tensor(0.2),
              torch.randn(128, 128).to(torch.float8_e4m3fn))
    torch._dynamo.reset()
    with pytest.raises(Exception):
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return captured["gm"]


SPLIT = ["vllm.unified_attention", ATTN]


def test_sticky_takes_only_its_own_quant(two_layer_config):
    gm = _trace(with_debug=False)
    sticky = _sticky().find_sticky(gm, SPLIT, two_layer_config)
    quants = [n for n in sticky if str(n.target) == QUANT]
    assert len(quants) == 2
    for quant in quants:
        attn = sticky[quant]
        layer = attn.args[-1].split(".")[2]
        assert quant.args[2].name == f"l_s{layer}_"   # its own layer's scale
    assert not any("cutlass" in str(n.target) or n.op == "placeholder"
                   or str(n.target) == "add" for n in sticky)
    _sticky()._active_config = two_layer_config
    try:
        split_gm, items = _sticky().split_graph(gm, SPLIT)
    finally:
        _sticky()._active_config = None
    attn_items = [i for i in items if i.is_splitting_graph]
    assert len(items) == 5 and len(attn_items) == 2
    for item in attn_items:
        ops = op_counts(item.graph.graph)
        assert ops[QUANT] == 1 and ops[ATTN] == 1
        assert "_C.cutlass_scaled_mm" not in ops
    assert split_gm._vllm_overlay_sticky == {i.submod_name for i in attn_items}


def test_output_with_another_reader_is_not_sticky(two_layer_config):
    gm = _trace(with_debug=True)
    sticky = _sticky().find_sticky(gm, SPLIT, two_layer_config)
    layers = {attn.args[-1] for attn in sticky.values()}
    assert layers == {"model.layers.1.self_attn.attn"}   # layer 0 has a debug read
    assert not any(str(n.target) == "sum" or n.target == "sum" for n in sticky)


def test_fusion_off_means_no_sticky(two_layer_config):
    from vllm.config import CompilationConfig, VllmConfig
    gm = _trace(with_debug=False)
    off = VllmConfig(compilation_config=CompilationConfig())
    off.compilation_config.static_forward_context = \
        two_layer_config.compilation_config.static_forward_context
    assert _sticky().find_sticky(gm, SPLIT, off) == {}
