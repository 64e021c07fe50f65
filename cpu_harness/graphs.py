"""Find attention -> (views) -> FP8 quant -> o_proj GEMM chains in FX graphs.

Works on Dynamo graphs (``call_method`` views, op packets) and on post-grad
graphs (``aten.reshape``, ``auto_functionalized`` wrappers) alike.
"""
import dataclasses
from typing import Optional

from cpu_harness.compile import auto_functionalized_target, op_name

ATTENTION = ("vllm.unified_attention", "vllm.unified_attention_with_output")
QUANTS = ("_C.static_scaled_fp8_quant", "_C.dynamic_scaled_fp8_quant",
          "_C.dynamic_per_token_scaled_fp8_quant")
VIEWS = ("view", "reshape", "aten.view", "aten.reshape", "aten._unsafe_view")


def name(node):
    return auto_functionalized_target(node) or op_name(node) or (
        node.target if node.op == "call_method" else None)


def root(node):
    """Follow view/reshape back to the tensor they alias."""
    while name(node) in VIEWS:
        node = node.args[0]
    return node


def _call_args(node):
    """(args, kwargs) of the op itself, also inside auto_functionalized."""
    if auto_functionalized_target(node):
        return (), node.kwargs
    return node.args, node.kwargs


def attention_output(node):
    """The tensor an attention node writes: its output buffer or itself."""
    args, kwargs = _call_args(node)
    if name(node) == "vllm.unified_attention_with_output":
        return kwargs["output"] if "output" in kwargs else args[3]
    return node


def layer_name(node):
    args, kwargs = _call_args(node)
    if "layer_name" in kwargs:
        return kwargs["layer_name"]
    return args[-1]


@dataclasses.dataclass
class Chain:
    attention: object
    quant: Optional[object]
    quant_op: Optional[str]
    gemm: Optional[object]
    gemm_weight: Optional[str]


def attention_chains(graph):
    """For every attention node: the quant reading its output and the GEMM
    reading that quant's result (None where absent)."""
    nodes = list(graph.nodes)
    chains = []
    for attn in (n for n in nodes if name(n) in ATTENTION):
        out_root = root(attention_output(attn))
        quant = gemm = weight = None
        for node in nodes[nodes.index(attn) + 1:]:
            if name(node) in QUANTS:
                args, kwargs = _call_args(node)
                src = kwargs.get("input", args[1] if len(args) > 1 else None)
                if src is not None and root(src) is out_root:
                    quant = node
                    break
        if quant is not None:
            args, kwargs = _call_args(quant)
            qout = root(kwargs.get("result", args[0] if args else None))
            for node in nodes[nodes.index(quant) + 1:]:
                if name(node) == "_C.cutlass_scaled_mm":
                    a_args, a_kwargs = _call_args(node)
                    a = a_kwargs.get("a", a_args[1] if len(a_args) > 1 else None)
                    if a is not None and root(a) is qout:
                        gemm = node
                        b = a_kwargs.get("b", a_args[2] if len(a_args) > 2 else None)
                        weight = str(root(b).target) if b is not None else None
                        break
        chains.append(Chain(attn, quant, name(quant) if quant else None, gemm,
                            weight))
    return chains
