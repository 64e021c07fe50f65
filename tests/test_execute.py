"""Execute what is compiled: every compiled configuration runs
``cpu_harness.execute.STEPS`` (prefills, a chunked prefill with context,
decodes; the second step reads the KV cache the first wrote) and is
compared with the same model run eagerly (no torch.compile, same weights
from the embedded checkpoint through vLLM's loader).

- fused vs unfused, both compiled: bit-identical hidden states, logits and
  KV cache (the kernel writes fp8(bf16(out)), exactly what the unfused path
  quantizes);
- compiled vs eager: relative L2 <= TOLERANCE.  Inductor fuses RMSNorm, RoPE
  and residual adds with other rounding than eager torch; one bf16 ulp of
  difference in a quant input flips an FP8 code (one e4m3 step is 6-12% of
  the element), so the two drift apart at FP8 rounding level per layer
  (measured ~0.025 for 2 layers).  Breaking attention (a sliding window of
  one token) moves the output by ~0.55: 7x the tolerance, 20x the noise.

STAND-INS: the ``_C`` ops run as ``stand_ins`` CPU kernels on the real
schemas; attention runs the overlay's Triton kernel in the interpreter.
"""
import operator

import pytest
import torch

import vllm_overlay
from cpu_harness.compile import ModelSpec

N = 2
ON = (("enable_attn_fusion", True), )
TOLERANCE = 0.08
ARCHS = ["llama", "qwen2"]
MODES = ["piecewise", "full"]


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def spec(arch, mode, fused=False, kv="auto"):
    return ModelSpec(arch=arch, mode=mode, num_layers=N,
                     pass_config=ON if fused else (), kv_cache_dtype=kv)


@pytest.fixture(scope="session")
def eager(overlay_compiled):
    return lambda arch: overlay_compiled(spec(arch, "eager"))


def _fused_launches(compiled, record=lambda out, kwargs: out.dtype):
    """Run the steps again on a fresh KV cache, recording each kernel
    launch (by default its output dtype); the outputs must repeat exactly."""
    from cpu_harness.execute import Runner
    kernel = vllm_overlay.active("triton_paged_attention")
    real, launches = kernel.paged_attention, []

    def counting(query, key_cache, value_cache, out, *args, **kwargs):
        launches.append(record(out, kwargs))
        return real(query, key_cache, value_cache, out, *args, **kwargs)

    kernel.paged_attention = counting
    try:
        outputs = Runner(compiled.model, compiled.vllm_config,
                         engine=compiled.spec.engine).run()
    finally:
        kernel.paged_attention = real
    for again, first in zip(outputs, compiled.outputs):
        assert torch.equal(again.hidden, first.hidden)
    return launches


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_runs_bit_identical_to_unfused(overlay_compiled, arch, mode):
    off = overlay_compiled(spec(arch, mode))
    on = overlay_compiled(spec(arch, mode, fused=True))
    for a, b in zip(on.outputs, off.outputs):
        assert torch.equal(a.hidden, b.hidden)
        assert torch.equal(a.logits, b.logits)
    kv_on, kv_off = on.runner.written_kv(), off.runner.written_kv()
    assert all(torch.equal(kv_on[k], kv_off[k]) for k in kv_off)
    steps = len(on.outputs)
    assert _fused_launches(on) == [torch.float8_e4m3fn] * (N * steps)
    assert _fused_launches(off) == [torch.bfloat16] * (N * steps)


@pytest.mark.parametrize("arch", ARCHS)
def test_sticky_pieces_run_fused_eager_form_identical_to_inductor(
        overlay_compiled, arch):
    """Fused sticky pieces run as plain GraphModules (``fused_eager_piece``:
    no Inductor wrapper on the per-step host path); running Inductor's
    compiled piece instead gives the same bits."""
    compiled = overlay_compiled(spec(arch, "piecewise", fused=True))
    assert_eager_pieces_equal_inductor(compiled)


def assert_eager_pieces_equal_inductor(compiled):
    """Every sticky piece of ``compiled`` (N layers, fused) runs its eager
    form; re-running the steps through Inductor's pieces gives the same
    hidden states and logits."""
    from cpu_harness.execute import Runner
    sticky = [compiled.backend.split_gm.__dict__[p.name] for p in compiled.pieces
              if p.is_splitting_graph]
    assert len(sticky) == N and all(p.eager is not None for p in sticky)
    assert all(p.run is p.eager for p in sticky)
    for piece in sticky:
        piece.run = piece.compiled
    try:
        outputs = Runner(compiled.model, compiled.vllm_config).run()
    finally:
        for piece in sticky:
            piece.run = piece.eager
    for a, b in zip(outputs, compiled.outputs):
        assert torch.equal(a.hidden, b.hidden)
        assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_runs_agree_with_eager(overlay_compiled, eager, arch, mode):
    ref = eager(arch)
    for fused in (False, True):
        compiled = overlay_compiled(spec(arch, mode, fused))
        for out, want in zip(compiled.outputs, ref.outputs):
            assert rel(out.hidden, want.hidden) <= TOLERANCE
            assert rel(out.logits, want.logits) <= TOLERANCE
        kv, kv_ref = compiled.runner.written_kv(), ref.runner.written_kv()
        for layer in kv_ref:
            assert rel(kv[layer], kv_ref[layer]) <= TOLERANCE


def test_broken_attention_is_far_outside_the_tolerance(eager):
    """The weights make attention matter: a one-token sliding window (the
    kernel then sees only the diagonal) moves the output >> TOLERANCE."""
    from cpu_harness.execute import Runner
    ref = eager("llama")
    layers = ref.vllm_config.compilation_config.static_forward_context.values()
    windows = [layer.impl.sliding_window for layer in layers]
    for layer in layers:
        layer.impl.sliding_window = (0, 0)
    try:
        broken = Runner(ref.model, ref.vllm_config).run()
    finally:
        for layer, window in zip(layers, windows):
            layer.impl.sliding_window = window
    for out, want in zip(broken, ref.outputs):
        assert rel(out.hidden, want.hidden) > 4 * TOLERANCE


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_passes_never_change_piece_inputs(overlay_compiled, mode, fused):
    """vLLM calls every compiled piece with the inputs it had before the
    post-grad passes; the passes may leave one unused, never drop it."""
    compiled = overlay_compiled(spec("llama", mode, fused))
    assert compiled.post_grad
    for pg in compiled.post_grad:
        assert pg.inputs_after == pg.inputs_before


_VIEWS = ("view", "reshape")


def _is_view(node):
    return (node.op == "call_method" and node.target in _VIEWS) or \
        (node.op == "call_function" and node.target in (torch.reshape, ))


def _fixed_address(arg, split_gm, captured):
    """``arg`` (a node of vLLM's split graph) is a model input / parameter,
    or made inside a captured piece, directly or through views of one."""
    if arg.op == "placeholder":
        return True
    piece, index = arg, None
    if arg.op == "call_function" and arg.target is operator.getitem:
        piece, index = arg.args
    assert piece.op == "call_module", arg.format_node()
    if piece.target in captured:
        return True
    # An uncaptured piece (attention, sticky): follow its output back.
    submod = getattr(split_gm, piece.target)
    submod = getattr(submod, "graph", submod)      # StickyAttentionPiece
    (output, ) = [n for n in submod.graph.nodes if n.op == "output"]
    node = output.args[0] if index is None else output.args[0][index]
    while _is_view(node):
        node = node.args[0]
    if node.op != "placeholder":
        return False
    inputs = [n for n in submod.graph.nodes if n.op == "placeholder"]
    return _fixed_address(piece.args[inputs.index(node)], split_gm, captured)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [False, True])
def test_captured_pieces_read_fixed_addresses(overlay_compiled, arch, fused):
    """vLLM replays a captured piece without copying its inputs: each
    tensor input must be a model input, a parameter, or made inside a
    captured piece (its graph-pool address is fixed per capture size)."""
    assert_captured_pieces_read_fixed_addresses(
        overlay_compiled(spec(arch, "piecewise", fused)))


def assert_captured_pieces_read_fixed_addresses(compiled):
    """The check above on one compiled model; returns the captured pieces."""
    from vllm.compilation.backends import PiecewiseBackend
    split_gm = compiled.backend.split_gm
    captured = {p.name for p in compiled.pieces
                if isinstance(split_gm.__dict__.get(p.name), PiecewiseBackend)}
    assert len(captured) == N + 1
    for node in split_gm.graph.nodes:
        if node.op != "call_module" or node.target not in captured:
            continue
        for arg in node.all_input_nodes:
            if isinstance(arg.meta.get("example_value"), torch.SymInt):
                continue
            assert _fixed_address(arg, split_gm, captured), \
                f"{node.target} reads {arg.name}, made outside a captured piece"
    return captured


def test_sliding_window_runs_fused(overlay_compiled):
    """Mistral with an 8-token window (the harness's sequences reach 20
    tokens): fused == unfused bit for bit, within tolerance of eager, and
    the window is live (the layers carry it)."""
    ref = overlay_compiled(spec("mistral-sw", "eager"))
    off = overlay_compiled(spec("mistral-sw", "piecewise"))
    on = overlay_compiled(spec("mistral-sw", "piecewise", fused=True))
    layers = on.vllm_config.compilation_config.static_forward_context.values()
    assert all(layer.impl.sliding_window == (7, 0) for layer in layers)
    for a, b, want in zip(on.outputs, off.outputs, ref.outputs):
        assert torch.equal(a.hidden, b.hidden)
        assert rel(a.hidden, want.hidden) <= TOLERANCE
    assert _fused_launches(on) == [torch.float8_e4m3fn] * (N * len(on.outputs))


def test_fp8_kv_cache_runs_fused(overlay_compiled):
    """V1 + --kv-cache-dtype fp8 (a uint8 cache holding e4m3; the kernel
    reads it as FP8): fused == unfused bit for bit, both within the
    tolerance of the eager model with the same FP8 cache."""
    ref = overlay_compiled(spec("llama", "eager", kv="fp8"))
    off = overlay_compiled(spec("llama", "piecewise", kv="fp8"))
    on = overlay_compiled(spec("llama", "piecewise", fused=True, kv="fp8"))
    assert next(iter(on.runner.kv_caches.values())).dtype == torch.uint8
    for a, b, want in zip(on.outputs, off.outputs, ref.outputs):
        assert torch.equal(a.hidden, b.hidden)
        assert rel(a.hidden, want.hidden) <= TOLERANCE
    kv_on, kv_off = on.runner.written_kv(), off.runner.written_kv()
    assert all(torch.equal(kv_on[k], kv_off[k]) for k in kv_off)
    assert _fused_launches(on) == [torch.float8_e4m3fn] * (N * len(on.outputs))
