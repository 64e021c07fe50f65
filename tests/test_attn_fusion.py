"""Attention + static FP8 quant fusion on real vLLM 0.8.5 graphs (full graph:
one graph holding every layer, as V0 compiles and upstream fused)."""
import pytest
import torch

from cpu_harness.compile import ModelSpec
from cpu_harness.graphs import attention_chains, layer_name

N = 2
FUSION_ON = (("enable_attn_fusion", True), )
FUSED = "vllm.unified_attention_with_output.output_scale"
QUANT = "_C.static_scaled_fp8_quant"


def full(**kw):
    return ModelSpec(mode="full", num_layers=N, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fuses_every_layer(overlay_compiled, arch):
    compiled = overlay_compiled(full(arch=arch, pass_config=FUSION_ON))
    (pg, ) = compiled.post_grad
    assert pg.targets_before.count("vllm.unified_attention_with_output") == N
    assert pg.targets_after.count(FUSED) == N
    assert pg.targets_after.count("vllm.unified_attention_with_output") == 0
    # one quant per layer fewer: 4 linear layers per decoder layer, o_proj's gone
    assert pg.targets_before.count(QUANT) == 4 * N
    assert pg.targets_after.count(QUANT) == 3 * N
    fused = [n for n in pg.after.nodes if FUSED in str(n.target)
             or (n.args and FUSED in str(n.args[0]))]
    assert len(fused) == N
    # Each fused op carries its own layer's o_proj input scale and writes an
    # FP8 buffer that o_proj's GEMM consumes (through views only).
    for chain in attention_chains(pg.after):
        assert chain.quant is None
    dyn = {layer_name(c.attention): c for c in attention_chains(compiled.dynamo_graph.graph)}
    for node in fused:
        kwargs = _op_kwargs(node)
        name = kwargs["layer_name"]
        scale = kwargs["output_scale"]
        assert scale.op == "placeholder"
        out = kwargs["output"]
        assert out.meta["val"].dtype == torch.float8_e4m3fn
        gemm = _gemm_reading(out)
        assert gemm is not None, f"{name}: o_proj GEMM does not read the fused output"
        # o_proj's GEMM dequantizes its input with the same scale: the fused
        # op quantizes with this layer's o_proj input scale.
        assert _op_kwargs(gemm)["a_scales"] is scale
        # and in Dynamo's graph that scale is this layer's o_proj.input_scale
        assert dyn[name].quant is not None
        assert f"layers_modules_{name.split('.')[2]}_modules_self_attn_modules_o_proj_" \
            f"parameters_input_scale" in dyn[name].quant.args[2].target


def _op_kwargs(node):
    """Arguments by name, whether the op is called directly or through
    auto_functionalized."""
    if node.target is torch.ops.higher_order.auto_functionalized:
        return dict(node.kwargs)
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def _gemm_reading(node):
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            target = str(user.args[0]) if user.args else ""
            if "cutlass_scaled_mm" in str(user.target) or "cutlass_scaled_mm" in target:
                return user
            if "reshape" in str(user.target) or "view" in str(user.target):
                stack.append(user)
    return None


def test_fusion_off_graph_identical_to_stock(overlay_compiled, stock_compiled):
    stock = stock_compiled(full())
    ours = overlay_compiled(full())
    assert [pg.targets_after for pg in ours.post_grad] == [
        pg["targets_after"] for pg in stock["post_grad"]]
    assert [str(pg.after) for pg in ours.post_grad] == [
        pg["after"] for pg in stock["post_grad"]]


def test_non_fusing_backend_is_left_alone(overlay_compiled, stock_compiled):
    """vLLM's FlashAttention V1 backend cannot write FP8: with the flag on,
    zero fusions; the graph is stock's but for the redundant reshapes that
    noop elimination (kept on by the flag) removes."""
    compiled = overlay_compiled(full(attention_backend="FLASH_ATTN_VLLM_V1",
                                     pass_config=FUSION_ON))
    (pg, ) = compiled.post_grad
    assert pg.targets_after.count("vllm.unified_attention_with_output") == N
    assert FUSED not in pg.targets_after
    assert pg.targets_after.count(QUANT) == 4 * N
    (stock, ) = stock_compiled(full())["post_grad"]
    views = ("aten.reshape", "aten.view")
    assert [t for t in pg.targets_after if t not in views] == \
        [t for t in stock["targets_after"] if t not in views]


def test_dynamic_per_token_checkpoint_untouched(overlay_compiled):
    compiled = overlay_compiled(full(fmt="fp8-dynamic", pass_config=FUSION_ON))
    (pg, ) = compiled.post_grad
    dyn = "_C.dynamic_per_token_scaled_fp8_quant"
    assert pg.targets_before.count(dyn) == 4 * N
    assert pg.targets_after.count(dyn) == 4 * N
    assert FUSED not in pg.targets_after
    from vllm_overlay.report import fusion_report
    report = fusion_report(compiled)
    assert report["fused"] == 0
    assert any("dynamic quant" in r for r in report["skipped"].values())


def test_tensor_parallel_rank_graph_fuses(tmp_path, overlay_compiled):
    """Two gloo ranks (processes) compile and run a TP=2 model: each rank's
    graph holds its share of heads, and the pattern matches on both."""
    import concurrent.futures
    import dataclasses
    import socket

    from cpu_harness.compile import compile_in_subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    specs = [full(pass_config=FUSION_ON, tp_size=2, tp_rank=r) for r in (0, 1)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        summaries = list(pool.map(
            lambda sp: compile_in_subprocess(sp, overlay=True,
                                             init_method=f"tcp://127.0.0.1:{port}"),
            specs))
    for summary in summaries:
        (pg, ) = summary["post_grad"]
        assert pg["targets_after"].count(FUSED) == N
        assert pg["targets_after"].count(QUANT) == 3 * N
        # 4 heads / 2 ranks = 2 heads of 32 per rank: attention output [T, 2, 32]
        assert "[-1, 2, 32]" in pg["before"]
    # Both ranks ran the harness steps (all-reduce over gloo): their
    # all-gathered logits are equal, and within the execution tolerance of
    # the same model fused on one rank (tests/test_execute.py).
    from tests.test_execute import TOLERANCE, rel
    ranks = [[torch.tensor(x) for x in s["logits"]] for s in summaries]
    single = overlay_compiled(full(pass_config=FUSION_ON)).outputs
    assert len(ranks[0]) == len(single) > 0
    for r0, r1, one in zip(*ranks, single):
        assert torch.equal(r0, r1)
        assert rel(r0, one.logits) <= TOLERANCE
