"""Fuse the FP8 quant that follows attention into the attention op.

An Inductor post-grad pass (``PassConfig.enable_attn_fusion``, off by
default).  For every attention layer whose backend can write static FP8::

    out  = auto_functionalized(unified_attention_with_output, ..., output=buf)[1]
    x    = reshape(...reshape(out))                  # views only
    q    = auto_functionalized(static_scaled_fp8_quant, result=r,
                               input=x, scale=s)[1]
    o_proj GEMM(q, ...)

becomes::

    fp8  = auto_functionalized(unified_attention_with_output.output_scale, ...,
                               output=reshape(r, [T, H, D]),
                               output_scale=s)[1]
    o_proj GEMM(reshape(fp8, [T, H * D]), ...)

where ``r``, the FP8 result, is a fresh ``empty`` (full graph) or the
sticky piece's input buffer (``sticky_split.preallocate_results``); and
likewise for ``unified_attention`` (no output buffer; fresh ``r`` only).
The bf16 attention output must have no other reader.  The graph's inputs
never change (an unused one stays: the caller passes it).  Layers whose backend cannot
fuse, and dynamic quants, are left alone; each skip is logged with its
reason.  Logs ``Fused quant onto N attention nodes``.

``install()`` also adds the flag to vLLM's ``PassConfig`` (and its uuid,
so compile caches never mix), keeps noop elimination on when the flag is
set on V1, and registers the pass right after noop elimination.
"""
import logging
import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

import vllm_overlay.attention_ops as attention_ops
import vllm_overlay.attention_quant as attention_quant

VLLM_TARGET = "vllm/compilation/attn_fusion.py"
VLLM_HOOKS = ("vllm/config.py", "vllm/compilation/pass_manager.py")

logger = logging.getLogger("vllm.overlay")

ATTENTION_OPS = {
    "unified_attention_with_output": lambda: torch.ops.vllm.unified_attention_with_output.default,
    "unified_attention": lambda: torch.ops.vllm.unified_attention.default,
}
VIEW_OPS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)
STATIC_QUANT = lambda: torch.ops._C.static_scaled_fp8_quant.default  # noqa: E731
DYNAMIC_QUANTS = lambda: (torch.ops._C.dynamic_scaled_fp8_quant.default,  # noqa: E731
                          torch.ops._C.dynamic_per_token_scaled_fp8_quant.default)


def GROUP_QUANT():
    """vllm::block_fp8_group_quant (block_fp8_quant), None if not installed."""
    packet = getattr(torch.ops.vllm, "block_fp8_group_quant", None)
    return None if packet is None else packet.default


_FRESH = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
          torch.ops.aten.empty_like.default)


def _root(node, through=VIEW_OPS):
    """The node under ``node``'s chain of ``through`` ops (views)."""
    while node.target in through:
        node = node.args[0]
    return node


def _fresh_or_input(node):
    """A fresh buffer or a graph input, or a view of one (``empty_like``
    decomposes to ``permute(empty)``)."""
    node = _root(node, VIEW_OPS + (torch.ops.aten.permute.default, ))
    return node.op == "placeholder" or node.target in _FRESH


def _wrapped(node):
    """The op an auto_functionalized node wraps (else None)."""
    if node.op == "call_function" and node.target is auto_functionalized:
        return node.args[0]
    return None


def attention_flavour(node):
    """'unified_attention_with_output' / 'unified_attention' or None."""
    for flavour, op in ATTENTION_OPS.items():
        if _wrapped(node) is op() or (node.op == "call_function"
                                      and node.target is op()):
            return flavour
    return None


def _getitem_user(node, index):
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


class Match:
    """attention -> views -> quant, found in a post-grad graph."""

    def __init__(self, attn, flavour, out, views, quant, write_back,
                 group=False):
        self.attn, self.flavour, self.out = attn, flavour, out
        self.write_back = write_back
        self.views, self.quant = views, quant
        self.result = quant.kwargs["result"]
        self.scale = quant.kwargs["scale"]
        self.quant_out = _getitem_user(quant, 1)
        # Dynamic per-token-group quant: the scales are an output too.
        self.group = group
        self.scale_out = _getitem_user(quant, 2) if group else None
        self.key = attention_quant.fp8_group_key(quant.kwargs["group_size"]) \
            if group else attention_quant.FP8_STATIC_TENSOR


def find_match(attn):
    """Match at ``attn`` or a string saying why not."""
    flavour = attention_flavour(attn)
    out = _getitem_user(attn, 1) if flavour == "unified_attention_with_output" \
        else attn
    if out is None:
        return "attention output unused"
    # In a sticky attention piece the output buffer is a graph input, so
    # functionalization writes the result back with copy_(input, out).  Sticky
    # splitting only happens when nothing outside the piece reads that buffer
    # (sticky_split.sticky_nodes), so the write-back can go with the fusion.
    write_back = [u for u in out.users if u.target is torch.ops.aten.copy_.default
                  and u.args[1] is out and u.args[0].op == "placeholder"]
    views, cur = [], out
    while True:
        users = [u for u in cur.users if u not in write_back]
        if len(users) != 1:
            return "attention output has other readers"
        user = users[0]
        if user.target in VIEW_OPS and user.args[0] is cur:
            views.append(user)
            cur = user
            continue
        if _wrapped(user) is STATIC_QUANT() and user.kwargs["input"] is cur:
            match = Match(attn, flavour, out, views, user, write_back)
            fresh = match.result.target is torch.ops.aten.empty.memory_format
            if not fresh and not _is_input_view(match.result):
                return "quant result is neither a fresh buffer nor a graph input"
            if not fresh and flavour == "unified_attention":
                return "quant result is a graph input; unified_attention " \
                    "allocates its own output"
            if _val(match.result).dtype != torch.float8_e4m3fn:
                return "quant result is not float8_e4m3fn"
            return match
        group = GROUP_QUANT() is not None and _wrapped(user) is GROUP_QUANT()
        if group and user.kwargs["input"] is cur:
            if flavour != "unified_attention_with_output":
                return "group quant after unified_attention (no output buffer)"
            match = Match(attn, flavour, out, views, user, write_back, group=True)
            for buf in (match.result, match.scale):
                if not _fresh_or_input(buf):
                    return "group quant buffers are neither fresh nor graph inputs"
            if _val(match.result).dtype != torch.float8_e4m3fn:
                return "quant result is not float8_e4m3fn"
            return match
        if _wrapped(user) in DYNAMIC_QUANTS():
            return "dynamic quant (needs scales computed after attention)"
        return f"next op is {user.target}, not a static FP8 quant"


def _is_input_view(node):
    """``node`` is a graph input or a view of one (a sticky piece's FP8
    buffer, allocated by the preceding piece)."""
    return _root(node).op == "placeholder"


def _input_of_shape(node, shape):
    """The placeholder under ``node``'s views if it has ``shape``, else None."""
    node = _root(node)
    same = [str(d) for d in _val(node).shape] == [str(d) for d in shape]
    return node if node.op == "placeholder" and same else None


def _layer_name(attn):
    return attn.kwargs["layer_name"] if "layer_name" in attn.kwargs \
        else attn.args[-1]


def _val(node):
    return node.meta.get("val")


def _add(graph, target, args, kwargs=None, val=None):
    node = graph.call_function(target, args, kwargs or {})
    if val is not None:
        node.meta["val"] = val
    return node


def rewrite(graph, m: Match):
    """Replace ``m`` by one attention op writing FP8 (see module doc)."""
    result_shape = list(_val(m.result).shape)
    fused = attention_ops.fused_op(m.flavour, group=m.group)
    # At the quant's place: the attention inputs and the FP8 result buffer
    # (fresh, or the piece's input) are all defined by then.
    with graph.inserting_before(m.quant):
        if m.flavour == "unified_attention_with_output":
            orig_out = m.attn.kwargs["output"]
            out_shape = list(_val(orig_out).shape)
            view = _input_of_shape(m.result, out_shape)
            if view is None:
                view = _add(graph, torch.ops.aten.reshape.default,
                            (m.result, out_shape),
                            val=_val(m.result).reshape(out_shape))
            if m.group:
                # [T, H] fp32 scales, written by the kernel: (None, fp8, scales)
                kwargs = dict(m.attn.kwargs, output=view,
                              output_group_scale=m.scale)
                vals = (None, torch.empty_like(_val(view)),
                        torch.empty_like(_val(m.scale)))
            else:
                kwargs = dict(m.attn.kwargs, output=view, output_scale=m.scale)
                vals = (None, torch.empty_like(_val(view)))
            new_attn = _add(graph, auto_functionalized, (fused, ), kwargs, vals)
            fp8 = _add(graph, operator.getitem, (new_attn, 1),
                       val=new_attn.meta["val"][1])
        else:
            kwargs = dict(m.attn.kwargs, output_scale=m.scale)
            fp8 = _add(graph, fused, m.attn.args, kwargs,
                       torch.empty_like(_val(m.attn), dtype=torch.float8_e4m3fn))
        flat = _add(graph, torch.ops.aten.reshape.default, (fp8, result_shape),
                    val=_val(fp8).reshape(_val(m.result).shape))
    m.quant_out.replace_all_uses_with(flat)
    if m.group and m.scale_out is not None:
        # Readers of the quant's scales (the GEMM, or the piece's write-back
        # into its scale input) now read the kernel's.
        with graph.inserting_after(new_attn):
            scales = _add(graph, operator.getitem, (new_attn, 2),
                          val=new_attn.meta["val"][2])
        m.scale_out.replace_all_uses_with(scales)
    if m.flavour == "unified_attention_with_output" and view.op == "placeholder":
        # The piece writes its input back with copy_(input, ...); make it
        # copy_(input, fp8) so Inductor reinplaces the op into the input.
        for user in list(view.users):
            if user.target is torch.ops.aten.copy_.default and user.args[0] is view:
                user.args = (view, fp8)
    leftovers = (m.result, m.attn.kwargs.get("output"))
    # (the scale buffer stays: the fused op writes it)
    dead = [*m.write_back, m.quant_out, *([m.scale_out] if m.scale_out is not None
                                          else []), m.quant, *reversed(m.views)]
    if m.out is not m.attn:
        dead.append(m.out)
    dead.append(m.attn)
    for node in dead:
        graph.erase_node(node)
    # Unused buffers go, but never a placeholder: the caller (vLLM's piece
    # runner) still passes every input the graph had.
    for node in leftovers:
        while node is not None and not node.users and node.op != "placeholder":
            parent = node.args[0] if node.target in VIEW_OPS else None
            graph.erase_node(node)
            node = parent


def _pass_base():
    from vllm.compilation.vllm_inductor_pass import VllmInductorPass
    return VllmInductorPass


class AttnFusionPass(_pass_base()):
    """See the module docstring."""

    def __init__(self, config):
        super().__init__(config)
        self.layers = config.compilation_config.static_forward_context
        self.matched_count = 0   # fusions in the last graph
        self.fused = set()       # layer names fused, over every graph
        self.skipped = {}        # layer name -> why not

    def fusable_keys(self, layer_name):
        """The output quants the layer's backend can write ([] if none)."""
        layer = self.layers.get(layer_name)
        if layer is None or not hasattr(layer, "can_fuse_output_quant"):
            return []
        return attention_quant.fusable_keys(layer)

    def __call__(self, graph: torch.fx.Graph):
        self.begin()
        self.dump_graph(graph, "before_attn_fusion")
        count = 0
        for attn in [n for n in graph.nodes if attention_flavour(n)]:
            name = _layer_name(attn)
            keys = self.fusable_keys(name)
            if not keys:
                self.skipped[name] = "backend cannot write FP8 output"
                continue
            match = find_match(attn)
            if isinstance(match, str):
                self.skipped[name] = match
                continue
            if match.key not in keys:
                self.skipped[name] = f"backend cannot write {match.key} output"
                continue
            rewrite(graph, match)
            self.fused.add(name)
            self.skipped.pop(name, None)
            count += 1
        self.matched_count = count
        for name, reason in sorted(self.skipped.items()):
            logger.info("Attention fusion skipped %s: %s", name, reason)
        logger.info("Fused quant onto %s attention nodes", count)
        self.dump_graph(graph, "after_attn_fusion")
        self.end_and_log()


# --- PassConfig flag, V1 post-init, pass registration -----------------------

def _install_pass_config():
    from vllm.compilation.inductor_pass import InductorPass
    from vllm.config import CompilationConfig
    if "enable_attn_fusion" in CompilationConfig.PassConfig.model_fields:
        return
    stock = CompilationConfig.PassConfig

    class PassConfig(stock):
        __doc__ = (stock.__doc__ or "") + (
            "- enable_attn_fusion: fuse the FP8 quant after attention into the "
            "attention op (vllm_overlay).\n")
        enable_attn_fusion: bool = False

        def uuid(self):
            dict_ = self.model_dump(include={
                "enable_fusion", "enable_noop", "enable_sequence_parallelism",
                "enable_attn_fusion"})
            return InductorPass.hash_dict(dict_)

    PassConfig.__qualname__ = "PassConfig"
    globals()["PassConfig"] = PassConfig
    field = CompilationConfig.model_fields["pass_config"]
    field.annotation = PassConfig
    field.default_factory = PassConfig
    CompilationConfig.PassConfig = PassConfig
    CompilationConfig.model_rebuild(force=True)


def _install_json_cli():
    """vLLM 0.8.5 parses ``-O`` with ``ast.literal_eval`` only, so the JSON
    spelling ``{"pass_config": {"enable_attn_fusion": true}}`` (what later
    vLLM and its docs use) fails; accept JSON too."""
    import json

    from vllm.config import CompilationConfig
    stock = CompilationConfig.from_cli.__func__
    if getattr(stock, "_vllm_overlay", False):
        return

    def from_cli(cls, cli_value: str):
        try:
            return stock(cls, cli_value)
        except (ValueError, SyntaxError):
            return cls.model_validate(json.loads(cli_value))

    from_cli._vllm_overlay = True
    CompilationConfig.from_cli = classmethod(from_cli)


def _install_post_init():
    from vllm.config import VllmConfig
    if getattr(VllmConfig.__post_init__, "_vllm_overlay", False):
        return
    stock = VllmConfig.__post_init__

    def __post_init__(self):
        stock(self)
        pass_config = self.compilation_config.pass_config
        if getattr(pass_config, "enable_attn_fusion", False) \
                and not pass_config.enable_noop:
            logger.info("enable_attn_fusion: keeping noop elimination on")
            pass_config.enable_noop = True

    __post_init__._vllm_overlay = True
    VllmConfig.__post_init__ = __post_init__


def _install_pass_manager():
    from vllm.compilation.noop_elimination import NoOpEliminationPass
    from vllm.compilation.pass_manager import PostGradPassManager
    if getattr(PostGradPassManager.configure, "_vllm_overlay", False):
        return
    stock = PostGradPassManager.configure

    def configure(self, config):
        stock(self, config)
        if not getattr(self.pass_config, "enable_attn_fusion", False):
            return
        noop = [i for i, p in enumerate(self.passes)
                if isinstance(p, NoOpEliminationPass)]
        if not noop:
            self.passes.insert(0, NoOpEliminationPass(config))
            noop = [0]
        self.passes.insert(noop[0] + 1, AttnFusionPass(config))

    configure._vllm_overlay = True
    PostGradPassManager.configure = configure


def install():
    import sys
    _install_pass_config()
    _install_json_cli()
    _install_post_init()
    # vLLM's compilation modules need vllm._C loaded; in a patched vLLM the
    # config.py hook runs before that, and the pass_manager.py hook after.
    if "vllm.compilation.pass_manager" in sys.modules or hasattr(
            torch.ops._C, "static_scaled_fp8_quant"):
        _install_pass_manager()
