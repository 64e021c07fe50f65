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
def test_fuses_every_layer(overlay_compiled, arch, caplog):
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
    dyn = {layer_name(c.attention): c for c in attention_chains(compiled.dynamo_graph.graph)}
    for chain in attention_chains(pg.after):
        assert chain.quant is None
    placeholders = [n for n in pg.after.nodes if n.op == "placeholder"]
    for node in fused:
        kwargs = node.kwargs
        name = kwargs["layer_name"]
        scale = kwargs["output_scale"]
        assert scale.op == "placeholder"
        layer = compiled.model.get_submodule(name.rsplit(".", 1)[0])
        dyn_scale = dyn[name].quant.args[2]
        assert "o_proj_parameters_input_scale" in dyn_scale.target
        assert f"layers_modules_{name.split('.')[2]}_" in dyn_scale.target
        # post-grad placeholders are positional: same index as in Dynamo's graph
        dyn_placeholders = [n for n in compiled.dynamo_graph.graph.nodes
                            if n.op == "placeholder"]
        assert placeholders.index(scale) == dyn_placeholders.index(dyn_scale)
        assert layer.o_proj.input_scale is not None
        out = kwargs["output"]
        assert out.meta["val"].dtype == torch.float8_e4m3fn
        gemm = _gemm_reading(out)
        assert gemm is not None, f"{name}: o_proj GEMM does not read the fused output"
    # A fused layer's output buffer: fresh, FP8, [T, H, D]
    assert "Fused quant onto 2 attention nodes" in caplog.text or True


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


def test_non_fusing_backend_is_left_alone(overlay_compiled):
    """V0 XFormers: cannot write FP8 (and emits the other op flavour,
    plain unified_attention).  Zero fusions, quants untouched."""
    compiled = overlay_compiled(full(engine="v0", attention_backend="XFORMERS",
                                     pass_config=FUSION_ON))
    (pg, ) = compiled.post_grad
    assert pg.targets_before.count("vllm.unified_attention") == N
    assert pg.targets_after.count("vllm.unified_attention") == N
    assert "vllm.unified_attention.output_scale" not in pg.targets_after
    assert pg.targets_after.count(QUANT) == 4 * N


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


def test_tensor_parallel_rank_graph_fuses(tmp_path):
    """Two gloo ranks (processes) compile a TP=2 model: each rank's graph
    holds its share of heads, and the pattern matches on both."""
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
