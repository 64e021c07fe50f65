"""Foundation: real vLLM 0.8.5 op schemas and real compiled graphs on CPU."""
import pytest
import torch

import cpu_harness
from cpu_harness.compile import ModelSpec

N_LAYERS = 2


def test_real_c_schemas_loaded_without_cuda():
    import vllm
    from vllm.platforms import current_platform
    assert vllm.__version__ == "0.8.5.post1"
    schema = str(torch.ops._C.static_scaled_fp8_quant.default._schema)
    assert schema.startswith("_C::static_scaled_fp8_quant(Tensor(")
    assert "Tensor input, Tensor scale) -> ()" in schema
    for namespace, op in (("_C", "cutlass_scaled_mm"),
                          ("_C", "dynamic_per_token_scaled_fp8_quant"),
                          ("_C", "rms_norm"),
                          ("_C_cache_ops", "reshape_and_cache_flash")):
        packet = getattr(getattr(torch.ops, namespace), op)
        assert packet.default._schema.name == f"{namespace}::{op}"
    assert type(current_platform).__name__ == "HarnessPlatform"
    assert current_platform.get_device_capability().to_int() == 90
    assert not torch.cuda.is_available()
    assert not torch.cuda.is_initialized()


def test_stub_refuses_next_to_a_real_driver(monkeypatch):
    monkeypatch.setattr(cpu_harness, "_stub", None)
    monkeypatch.setattr(cpu_harness.os.path, "exists",
                        lambda p: p == "/dev/nvidiactl")
    with pytest.raises(cpu_harness.HarnessRefused, match="real NVIDIA driver"):
        cpu_harness.activate()


def _o_proj_chains(summary_graph_chains):
    return [c for c in summary_graph_chains if c.gemm_weight and "o_proj" in c.gemm_weight]


@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_stock_graphs_have_one_quant_per_attention(stock_compiled, mode):
    summary = stock_compiled(ModelSpec(mode=mode, num_layers=N_LAYERS))
    dyn = summary["dynamo_ops"]
    assert dyn["vllm.unified_attention_with_output"] == N_LAYERS
    # 4 linear layers per decoder layer (qkv, o, gate_up, down), each quantized.
    assert dyn["_C.static_scaled_fp8_quant"] == 4 * N_LAYERS
    assert dyn["_C.cutlass_scaled_mm"] == 4 * N_LAYERS
    pieces = summary["pieces"]
    if mode == "piecewise":
        assert len(pieces) == 2 * N_LAYERS + 1
        attn = [p for p in pieces if p["is_splitting_graph"]]
        assert [p["ops"] for p in attn] == [
            {"vllm.unified_attention_with_output": 1}] * N_LAYERS
        # The o_proj quant is in the next piece: Inductor never sees the pair.
        assert len(summary["post_grad"]) == N_LAYERS + 1
    else:
        assert len(pieces) == 1 and not pieces[0]["is_splitting_graph"]
        assert len(summary["post_grad"]) == 1
        after = summary["post_grad"][0]["targets_after"]
        assert after.count("vllm.unified_attention_with_output") == N_LAYERS
        assert after.count("_C.static_scaled_fp8_quant") == 4 * N_LAYERS


@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_each_attention_feeds_its_o_proj_quant(overlay_compiled, mode):
    """In the real Dynamo graph every attention output reaches, through
    views only, a static FP8 quant whose result feeds that layer's o_proj."""
    from cpu_harness.graphs import attention_chains, layer_name
    compiled = overlay_compiled(ModelSpec(mode=mode, num_layers=N_LAYERS))
    chains = attention_chains(compiled.dynamo_graph.graph)
    assert len(chains) == N_LAYERS
    for i, chain in enumerate(chains):
        assert layer_name(chain.attention) == f"model.layers.{i}.self_attn.attn"
        assert chain.quant_op == "_C.static_scaled_fp8_quant"
        assert f"layers_modules_{i}_modules_self_attn_modules_o_proj" in chain.gemm_weight
