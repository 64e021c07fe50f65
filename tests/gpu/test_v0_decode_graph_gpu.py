"""V0's decode CUDA graphs around the kernel (needs CUDA; skipped otherwise).

vLLM 0.8.5's V0 runner captures one graph per decode batch size with
``max_decode_seq_len = max_seq_len_to_capture`` and dummy lengths, then
replays it for real batches after copying seq_lens / block tables / slot
mapping into the captured buffers.  The kernel inside (TRITON_ATTN_VLLM_V0)
keeps the grid, split count and workspace it derived at capture: each replay,
with sequences shorter and longer than those at capture, must equal a fresh
launch with the same bound (bit for bit) and the float32 reference.
Run: ``python3 -m pytest -q tests/gpu`` on the GPU box.
"""
import torch

from test_triton_paged_attention_gpu import _SI, FP8, HAVE_CUDA, make_batch, poison, tpa

try:
    import pytest
    pytestmark = [pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU"),
                  pytest.mark.skipif(_SI != 0, reason="other shard")]
except ImportError:  # script mode
    pytest = None


def test_v0_decode_graph_replays_other_lengths():
    B, Hq, Hkv, D, bs, bound = 8, 32, 8, 128, 16, 4096
    q, kc, vc, qsl, sl, bt = make_batch([1] * B, [bound] * B, Hq, Hkv, D, bs)
    scale = torch.tensor([0.02], device="cuda")
    out = poison(q.shape, FP8)
    launch = lambda o: tpa.paged_attention(  # noqa: E731
        q, kc, vc, o, qsl, sl, bt, 1, bound, D ** -0.5, output_scale=scale)
    sl.fill_(1)                               # V0 captures with dummy lengths
    launch(out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(out)
    gen = torch.Generator(device="cuda").manual_seed(7)
    for lens in ([900] * B, [1, 7, 4096, 33, 1000, 512, 17, 4095], [4096] * B):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen).to(q.dtype))
        out.view(torch.uint8).fill_(0xFF)
        graph.replay()
        fresh = poison(q.shape, FP8)
        launch(fresh)
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.uint8), fresh.view(torch.uint8)), lens
        ref = tpa.reference_paged_attention(q, kc, vc, qsl, sl, bt,
                                            softmax_scale=D ** -0.5)
        got = out.float() * scale
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 4e-2, (lens, err)    # FP8 output: ~2-3% relative
