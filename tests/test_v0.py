"""V0: the overlay's kernel behind ``TRITON_ATTN_VLLM_V0``, fused through
``unified_attention(..., output_scale)`` in vLLM's ``-O 3`` full graph.

Executed on the CPU like tests/test_execute.py (same steps in V0 batch
order: prefills first, decodes last; same stand-ins, same tolerance).
"""
import pytest
import torch

import vllm_overlay
from cpu_harness.compile import ModelSpec
from tests.test_execute import N, ON, TOLERANCE, _fused_launches, rel

V0 = dict(engine="v0", attention_backend="TRITON_ATTN_VLLM_V0", num_layers=N)
FUSED = "vllm.unified_attention.output_scale"


def test_v0_full_graph_fuses_every_layer_and_runs(overlay_compiled):
    eager = overlay_compiled(ModelSpec(mode="eager", **V0))
    off = overlay_compiled(ModelSpec(mode="full", **V0))
    on = overlay_compiled(ModelSpec(mode="full", pass_config=ON, **V0))
    layer = next(iter(on.vllm_config.compilation_config.static_forward_context.values()))
    assert type(layer.impl).__name__ == "TritonFusedV0AttentionImpl"
    assert not layer.use_output            # V0: no output buffer
    (pg_on, ), (pg_off, ) = on.post_grad, off.post_grad
    assert pg_off.targets_after.count("vllm.unified_attention") == N
    assert pg_on.targets_after.count(FUSED) == N
    assert pg_on.targets_after.count("_C.static_scaled_fp8_quant") == \
        pg_off.targets_after.count("_C.static_scaled_fp8_quant") - N
    for a, b, want in zip(on.outputs, off.outputs, eager.outputs):
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.logits, b.logits)
        assert rel(a.hidden, want.hidden) <= TOLERANCE
    kv_on, kv_off = on.runner.written_kv(), off.runner.written_kv()
    assert all(torch.equal(kv_on[k], kv_off[k]) for k in kv_off)
    assert _fused_launches(on) == [torch.float8_e4m3fn] * (N * len(on.outputs))


def test_v0_backend_selected_only_by_its_name(monkeypatch):
    vllm_overlay.install()
    from vllm.platforms import current_platform
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "TRITON_ATTN_VLLM_V0")
    args = (None, 64, torch.bfloat16, "auto", 16)
    assert current_platform.get_attn_backend_cls(*args, False, False).endswith(
        "TritonFusedV0Backend")
    # V1 or MLA, or another name: stock choice
    assert "TritonFusedV0Backend" not in current_platform.get_attn_backend_cls(
        *args, True, False)
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "XFORMERS")
    assert "TritonFusedV0Backend" not in current_platform.get_attn_backend_cls(
        *args, False, False)


@pytest.mark.parametrize("seq_lens", [[5, 40, 17], [200, 1, 1000]])
def test_decode_launch_from_an_upper_bound_is_exact(seq_lens):
    """V0 captures decode CUDA graphs with ``max_decode_seq_len =
    max_seq_len_to_capture`` and replays them for any shorter batch: the
    grid and split count derived from the bound must give the right answer
    for every length up to it (splits past a sequence's end stay empty).
    Interpreter; the graph replay itself: tests/gpu/test_v0_decode_graph_gpu.py."""
    kernel = vllm_overlay.active("triton_paged_attention")
    from tests.test_triton_paged_attention import make_batch, poison
    bound, b = 1024, len(seq_lens)
    q, kc, vc, qsl, sl, bt = make_batch([1] * b, [bound] * b, 4, 2, 32, 16)
    sl.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    assert kernel._num_splits(b, 2, bound, 64, kernel._num_sms(q.device)) > 1
    scale = torch.tensor([0.02])
    out, out8 = poison(q.shape, torch.bfloat16), poison(q.shape, torch.float8_e4m3fn)
    launch = (q, kc, vc)
    kernel.paged_attention(*launch, out, qsl, sl, bt, 1, bound, 32 ** -0.5)
    kernel.paged_attention(*launch, out8, qsl, sl, bt, 1, bound, 32 ** -0.5,
                           output_scale=scale)
    ref = kernel.reference_paged_attention(q, kc, vc, qsl, sl, bt,
                                           softmax_scale=32 ** -0.5)
    assert not out.isnan().any()
    assert rel(out, ref) < 1e-2
    own = kernel.static_fp8_quant_reference(out, scale)
    assert torch.equal(out8.view(torch.uint8), own.view(torch.uint8))
