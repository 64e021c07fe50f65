"""Sticky ops: keep the quant after attention in the attention piece (RFC
#16220, change 2).

vLLM 0.8.5 V1 splits the Dynamo graph at every attention op; attention
pieces run eagerly, never reach Inductor, and the o_proj quant lands in the
next (CUDA-graphed) piece, out of the fusion pass's sight.  With sticky ops
the split becomes::

    stock:   [... qkv, rope, out]  [attention]  [view, view, size, empty, quant, o_proj, ...]
    sticky:  [... qkv, rope, out, buf]  [attention, view, view, size, quant]  [o_proj, ...]

A sticky op (``STICKY_OPS`` by name, or ``is_sticky(node)``) consumes the
attention output through views only; it moves into the attention piece
together with what it needs that is computed after the attention
(views of the output, ``size``); its FP8 result buffer ``buf`` is allocated
before the attention, in the preceding captured piece, so every piece vLLM
captures into a CUDA graph reads only tensors at fixed addresses
(``preallocate_results``).  Nothing that
merely reads the output for something else moves, and a layer is sticky
only if its backend can fuse and the output has no other reader.  With no
sticky layer the split is exactly vLLM's.

Sticky attention pieces are compiled by Inductor (so ``AttnFusionPass``
runs on them) but never captured into a CUDA graph; all other pieces stay
``PiecewiseBackend`` (compiled + captured) as stock.
"""
import logging
import operator
from unittest.mock import patch

import torch
import torch.fx as fx

import vllm_overlay.attention_quant as attention_quant
import vllm_overlay.block_fp8_quant as block_fp8_quant

VLLM_TARGET = "vllm/compilation/sticky_split.py"
VLLM_HOOKS = ("vllm/compilation/backends.py", )

logger = logging.getLogger("vllm.overlay")

STICKY_OPS = ("_C.static_scaled_fp8_quant",
              "vllm." + block_fp8_quant.GROUP_QUANT)
# Nodes computed after attention that may follow a sticky op into its piece.
_VIEW_METHODS = ("view", "reshape")
_ALLOWED_METHODS = _VIEW_METHODS + ("size", )
_ALLOWED_FUNCTIONS = (torch.empty, operator.getitem, torch.reshape)

_active_config = None   # VllmConfig of the VllmBackend currently splitting


def _name(node):
    return str(node.target) if node.op == "call_function" else None


def _is_view(node):
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or \
        (node.op == "call_function" and node.target is torch.reshape)


def _allowed(node):
    return (node.op == "call_method" and node.target in _ALLOWED_METHODS) or \
        (node.op == "call_function" and node.target in _ALLOWED_FUNCTIONS)


def _attention_output(node):
    if _name(node) == "vllm.unified_attention_with_output":
        return node.kwargs.get("output", node.args[3] if len(node.args) > 3 else None)
    return node


def _layer_name(node):
    return node.kwargs.get("layer_name", node.args[-1])


def _root(node):
    while _is_view(node):
        node = node.args[0]
    return node


def sticky_nodes(attn, is_sticky):
    """Nodes after ``attn`` that join its piece: the first sticky op fed by
    its output (through views), and that op's post-attention inputs.  None
    if there is none, or anything else reads the output after ``attn``."""
    order = {n: i for i, n in enumerate(attn.graph.nodes)}
    after = lambda n: order[n] > order[attn]  # noqa: E731
    # Every view of the written buffer aliases the attention output.
    aliases, sticky = [_root(_attention_output(attn))], None
    for alias in aliases:
        for user in sorted(alias.users, key=order.get):
            if _is_view(user) and user.args[0] is alias:
                aliases.append(user)
            elif user is not attn and after(user) and is_sticky(user) \
                    and alias in user.all_input_nodes:
                sticky = sticky or user
    if sticky is None:
        return None
    pulled, stack = {sticky}, [sticky]
    while stack:
        for node in stack.pop().all_input_nodes:
            if node in pulled or not after(node):
                continue
            if not _allowed(node):
                return None
            pulled.add(node)
            stack.append(node)
    # The bf16 output must have no reader outside the piece.
    for alias in aliases:
        for user in alias.users:
            if user is attn or not after(user) or user in pulled \
                    or user in aliases:
                continue
            return None
    return sorted(pulled, key=order.get)


def find_sticky(graph: fx.GraphModule, splitting_ops, vllm_config,
                is_sticky=None):
    """{node: attention node} for every layer that can fuse, else {}."""
    if vllm_config is None or not getattr(
            vllm_config.compilation_config.pass_config, "enable_attn_fusion",
            False):
        return {}
    is_sticky = is_sticky or (lambda n: _name(n) in STICKY_OPS)
    layers = vllm_config.compilation_config.static_forward_context
    sticky, skipped = {}, []
    for attn in graph.graph.nodes:
        if attn.op != "call_function" or _name(attn) not in splitting_ops:
            continue
        layer = layers.get(_layer_name(attn))
        if layer is None or not attention_quant.fusable_keys(layer):
            skipped.append(f"{_layer_name(attn)} (backend cannot fuse)")
            continue
        nodes = sticky_nodes(attn, is_sticky)
        if nodes is None:
            skipped.append(f"{_layer_name(attn)} (no fusable quant after it)")
            continue
        sticky.update((n, attn) for n in nodes)
    if skipped:
        logger.info("Sticky ops: stock split for %s", ", ".join(skipped))
    return sticky


def preallocate_results(graph: fx.GraphModule, sticky):
    """Allocate each sticky quant's FP8 result in front of its attention op,
    i.e. in the preceding (CUDA-graphed) piece, as stock allocates the bf16
    attention output there::

        before:  [out = empty(T, H*D)]  [attn(.., out), v = view(out), r = empty(v.size(), fp8), quant(r, v)]  [o_proj(r)]
        after:   [out = empty(T, H*D), buf = empty_like(out.view(T, H, D), fp8)]  [attn(.., out), v = view(out), r = buf.view(v.size()), quant(r, v)]  [o_proj(r)]

    vLLM replays a captured piece without copying its inputs: whatever it
    reads must live at an address fixed per capture size, which holds for
    tensors allocated inside a captured piece (graph pool) and their views.
    ``buf`` has the attention output's shape, so that the fused op can write
    into the piece's input itself (``attn_fusion.rewrite``).  ``sticky`` ({node: attention node}) is updated in place."""
    for empty, attn in list(sticky.items()):
        if not (empty.op == "call_function" and empty.target is torch.empty):
            continue
        with graph.graph.inserting_before(attn):
            buf = graph.graph.call_function(
                torch.empty_like, (_attention_output(attn), ),
                {"dtype": empty.kwargs["dtype"]})
        with graph.graph.inserting_before(empty):
            view = graph.graph.call_method("view", (buf, *empty.args))
        empty.replace_all_uses_with(view)
        graph.graph.erase_node(empty)
        del sticky[empty]
        sticky[view] = attn
    graph.recompile()


def split_graph(graph: fx.GraphModule, ops):
    """vLLM's ``split_graph`` with sticky nodes placed in their attention
    node's piece (their FP8 result allocated before it); exactly vLLM's
    split when there is nothing sticky."""
    # Block-FP8 o_proj: its group quant becomes a separate (sticky) op, its
    # buffers allocated before the attention (any mode, also full graph).
    block_fp8_quant.decompose(graph, _active_config)
    sticky = find_sticky(graph, ops, _active_config)
    if not sticky:
        return _stock_split_graph(graph, ops)
    preallocate_results(graph, sticky)
    import torch.fx.passes.split_module as split_module_lib
    real = split_module_lib.split_module

    def split_module(gm, root, split_callback, **kwargs):
        return real(gm, root, lambda n: split_callback(sticky.get(n, n)),
                    **kwargs)

    with patch.object(split_module_lib, "split_module", split_module):
        split_gm, items = _stock_split_graph(graph, ops)
    # An attention piece is sticky when it holds more than its attention op.
    split_gm._vllm_overlay_sticky = {
        item.submod_name for item in items if item.is_splitting_graph and sum(
            n.op == "call_function" for n in item.graph.graph.nodes) > 1}
    logger.info("Sticky ops: %d attention pieces keep their quant",
                len(split_gm._vllm_overlay_sticky))
    return split_gm, items


# The quants a fused sticky piece may hold -> the fused op is the group one.
EAGER_QUANTS = {"_C.static_scaled_fp8_quant": False,
                "vllm.block_fp8_group_quant": True}


def fused_eager_piece(submod: fx.GraphModule, fused_layers):
    """The sticky piece as the fusion pass left it, as a plain GraphModule,
    or None where the pass did not fuse its layer (or the piece is not one
    attention + one static or block-FP8 group quant)::

        attn(q, k, v, out, L); x = view(out); r = buf.view(x.size()); quant(r, x, s); return r
        ->  attn.output_scale(q, k, v, buf, L, s); x = view(out); r = buf.view(x.size()); return r

    (group quant: ``attn.output_group_scale(q, k, v, buf, L, s)``, ``s`` the
    [T, H] scale buffer the quant would have written.)

    Inductor compiles every sticky piece, so that ``AttnFusionPass`` decides
    and rewrites; but calling Inductor's output costs tens of microseconds
    of host time (AOTAutograd's runtime wrappers) per layer per step, on the
    uncaptured path of every decode step, where stock calls its eager
    attention piece.  This is the same single op call, run the way stock
    runs its attention piece.  Tests check it is bit-identical to the
    compiled piece."""
    import vllm_overlay.attention_ops as attention_ops
    nodes = [n for n in submod.graph.nodes if n.op == "call_function"
             and _name(n) != "getitem"]
    attn = [n for n in nodes if _name(n) == "vllm.unified_attention_with_output"]
    quant = [n for n in nodes if _name(n) in EAGER_QUANTS]
    if len(attn) != 1 or len(quant) != 1 or len(nodes) != 2:
        return None
    (attn, ), (quant, ) = attn, quant
    if _layer_name(attn) not in fused_layers:
        return None
    result, _, scale = quant.args[:3]
    group = EAGER_QUANTS[_name(quant)]
    buf = _root(result)
    if buf.op != "placeholder":
        return None
    graph, env = fx.Graph(), {}
    for node in submod.graph.nodes:
        if node is quant:
            continue
        if node is attn:
            q, k, v = (env[a] for a in attn.args[:3])
            env[node] = graph.call_function(
                attention_ops.fused_op("unified_attention_with_output", group),
                (q, k, v, env[buf], _layer_name(attn), env[scale]))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(submod, graph)


class StickyAttentionPiece:
    """An attention piece compiled by Inductor and run without CUDA graphs
    (stands where vLLM would keep the eager piece); where the pass fused
    it, the call runs ``fused_eager_piece`` instead of Inductor's output."""

    capturable = False

    def __init__(self, graph, compiled, eager=None):
        self.graph, self.compiled, self.eager = graph, compiled, eager
        self.run = eager if eager is not None else compiled

    def __call__(self, *args):
        return self.run(*args)


_stock_split_graph = None


def install():
    global _stock_split_graph
    import vllm.compilation.backends as backends
    if _stock_split_graph is not None:
        return
    _stock_split_graph = backends.split_graph
    backends.split_graph = split_graph

    stock_backend_call = backends.VllmBackend.__call__

    def __call__(self, graph, example_inputs):
        global _active_config
        _active_config = self.vllm_config
        try:
            return stock_backend_call(self, graph, example_inputs)
        finally:
            _active_config = None

    backends.VllmBackend.__call__ = __call__

    interpreter = backends.PiecewiseCompileInterpreter
    stock_call_module = interpreter.call_module

    def call_module(self, target, args, kwargs):
        output = stock_call_module(self, target, args, kwargs)
        sticky = getattr(self.module, "_vllm_overlay_sticky", ())
        if target in sticky:
            submod = self.fetch_attr(target)
            index = len(self.compile_submod_names) + sorted(sticky).index(target)
            # No per-call input size asserts: the piece runs uncaptured on
            # every step, where each microsecond of host time shows.
            inductor_config = dict(
                self.compilation_config.inductor_compile_config,
                size_asserts=False)
            compiled = self.vllm_backend.compiler_manager.compile(
                submod, args, inductor_config,
                self.compilation_config, graph_index=index,
                num_graphs=len(self.compile_submod_names) + len(sticky),
                runtime_shape=None)
            fused = set().union(*(
                p.fused for p in self.vllm_backend.post_grad_pass_manager.passes
                if type(p).__name__ == "AttnFusionPass"))
            self.module.__dict__[target] = StickyAttentionPiece(
                submod, compiled, fused_eager_piece(submod, fused))
        return output

    interpreter.call_module = call_module
