"""Compile a real vLLM 0.8.5 model through ``VllmBackend`` on a CPU.

``compile_model(spec)`` builds the model class vLLM would build for a tiny
HF config (FP8 linear layers with static activation scales by default)
inside a real ``VllmConfig``, triggers ``@support_torch_compile`` with a
forward call, lets vLLM's own ``VllmBackend`` split the Dynamo graph and
compile every piece with Inductor (post-grad passes included), and stops
before the compiled model would run a CUDA kernel.  It returns the graphs
vLLM produced:

    dynamo graph --split_graph--> pieces --Inductor--> post-grad graphs

Configurations:
  ``piecewise``  vLLM V1 as shipped: the two attention ops split the graph;
  ``full``       one graph (``splitting_ops=[]``), as V0 compiles and as
                 upstream later fused attention + quant;
  ``eager``      no torch.compile (the reference for executed runs).

With ``execute`` (the default) the weights come from the embedded
checkpoint through vLLM's loader and the model runs ``execute.STEPS``: the
first step triggers the compilation, and every compiled piece then runs
(``CompiledModel.outputs``); without it, compilation stops before anything
executes (stock vLLM's graphs, compared in a subprocess).
"""
import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import tempfile
from collections import Counter
from typing import Optional

import cpu_harness

ATTENTION_OPS = ("vllm.unified_attention", "vllm.unified_attention_with_output")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    arch: str = "llama"              # key of tiny_checkpoint.ARCHS
    num_layers: int = 2
    mode: str = "piecewise"          # "piecewise" | "full"
    engine: str = "v1"               # "v1" | "v0" (VLLM_USE_V1)
    attention_backend: str = "TRITON_ATTN_VLLM_V1"
    fmt: str = "fp8"                 # tiny_checkpoint format
    pass_config: tuple = ()          # ((field, value), ...) set after VllmConfig init
    tp_size: int = 1
    tp_rank: int = 0
    kv_cache_dtype: str = "auto"     # "auto" | "fp8" (uint8 cache, e4m3 values)


@dataclasses.dataclass
class Piece:
    name: str
    is_splitting_graph: bool          # vLLM's SplitItem flag: runs eagerly
    graph: object                     # fx.GraphModule of the piece (Dynamo level)


@dataclasses.dataclass
class PostGrad:
    before: str                       # graph code before vLLM's post-grad passes
    after: object                     # fx.Graph after them
    targets_before: list
    targets_after: list
    inputs_before: list               # placeholder names before the passes
    inputs_after: list                # ... and right after them


@dataclasses.dataclass
class CompiledModel:
    spec: ModelSpec
    vllm_config: object
    model: object
    backend: object                   # the VllmBackend that compiled it (None: eager)
    dynamo_graph: object
    pieces: list
    post_grad: list
    runner: object = None             # execute.Runner (its KV caches)
    outputs: list = None              # execute.StepOutput per step

    def piece_ops(self, piece):
        return op_counts(piece.graph.graph)

    def dynamo_ops(self):
        return op_counts(self.dynamo_graph.graph)

    def post_grad_ops(self):
        total = Counter()
        for pg in self.post_grad:
            total.update(pg.targets_after)
        return total


def op_name(node):
    """Name of a call_function node's op: '_C.static_scaled_fp8_quant',
    'vllm.unified_attention_with_output', 'aten.reshape', 'getitem', ..."""
    if node.op != "call_function":
        return None
    return op_name_of(node.target)


def op_name_of(target):
    import torch
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket,
                           torch._ops.HigherOrderOperator)):
        name = str(target)
        return name[:-len(".default")] if name.endswith(".default") else name
    return getattr(target, "__name__", str(target))


def auto_functionalized_target(node):
    """Name of the op wrapped by an auto_functionalized node, else None."""
    if op_name(node) in ("auto_functionalized", "higher_order.auto_functionalized"):
        return op_name_of(node.args[0])
    return None


def op_counts(graph):
    """Count ops, looking through auto_functionalized wrappers."""
    counts = Counter()
    for node in graph.nodes:
        name = auto_functionalized_target(node) or op_name(node)
        if name:
            counts[name] += 1
    return counts


class _CompiledStop(Exception):
    """Raised right after VllmBackend compiled the model (nothing executes)."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_dist_ready = None


def _init_distributed(tp_size, tp_rank, init_method=None):
    global _dist_ready
    from vllm.distributed import (ensure_model_parallel_initialized,
                                  init_distributed_environment)
    if _dist_ready is None:
        init_distributed_environment(
            world_size=tp_size, rank=tp_rank, local_rank=tp_rank,
            distributed_init_method=init_method or f"tcp://127.0.0.1:{_free_port()}",
            backend="gloo")
        ensure_model_parallel_initialized(tp_size, 1)
        _dist_ready = (tp_size, tp_rank)
    elif _dist_ready != (tp_size, tp_rank):
        raise RuntimeError(f"process already initialised for TP {_dist_ready}")


def setup_process(work_dir=None):
    """Environment for compiling on CPU; call before importing vLLM."""
    cpu_harness.activate()
    work_dir = pathlib.Path(work_dir or tempfile.mkdtemp(prefix="vllm_harness_")).resolve()
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_DISABLE_COMPILE_CACHE": "1",
        "VLLM_CACHE_ROOT": str(work_dir / "vllm_cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(work_dir / "inductor"),
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        # Triton kernels run in the interpreter (set before they are defined).
        "TRITON_INTERPRET": "1",
    }
    for key, value in env.items():
        os.environ.setdefault(key, value)
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    return work_dir


@contextlib.contextmanager
def default_dtype(dtype):
    """Like vLLM's ``set_default_torch_dtype``, which (in 0.8.5) leaves the
    dtype changed when the body raises."""
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _build_vllm_config(spec, model_dir):
    from vllm.config import (CacheConfig, CompilationConfig, CompilationLevel,
                             DeviceConfig, LoadConfig, ModelConfig,
                             ParallelConfig, SchedulerConfig, VllmConfig)
    eager = spec.mode == "eager"
    model_config = ModelConfig(
        model=str(model_dir), task="generate", tokenizer=str(model_dir),
        tokenizer_mode="auto", trust_remote_code=False, dtype="bfloat16",
        seed=0, skip_tokenizer_init=True, max_model_len=256,
        enforce_eager=eager)
    # eager: no torch.compile, and the same native ops the compiled model
    # traces (V1 compiles with custom_ops=["none"]).
    compilation_config = CompilationConfig(
        level=CompilationLevel.NO_COMPILATION, custom_ops=["none"]) if eager \
        else CompilationConfig(level=CompilationLevel.PIECEWISE)
    if spec.mode == "full":
        compilation_config.splitting_ops = []
    vllm_config = VllmConfig(
        model_config=model_config,
        cache_config=CacheConfig(block_size=16, gpu_memory_utilization=0.9,
                                 swap_space=0, cache_dtype=spec.kv_cache_dtype,
                                 sliding_window=model_config.get_sliding_window()),
        parallel_config=ParallelConfig(tensor_parallel_size=spec.tp_size),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=256,
                                         max_num_seqs=8, max_model_len=256),
        device_config=DeviceConfig(device="cuda"),
        load_config=LoadConfig(load_format="dummy"),
        compilation_config=compilation_config,
    )
    if spec.mode == "full":
        # V1's post-init re-adds the attention ops when the list is empty.
        vllm_config.compilation_config.splitting_ops = []
    if spec.engine == "v0":
        # STAND-IN: vLLM's V0 RMSNorm+quant fusion traces its patterns with
        # CUDA tensors; off on a CPU (unrelated to the attention fusion).
        vllm_config.compilation_config.pass_config.enable_fusion = False
    for field, value in spec.pass_config:
        setattr(vllm_config.compilation_config.pass_config, field, value)
    vllm_config.parallel_config.rank = spec.tp_rank
    return vllm_config


def _set_compile_dirs(vllm_config, work_dir, spec):
    """Explicit cache dirs; Inductor's output must live inside vLLM's.

    With its cache disabled, vLLM's Inductor adaptor searches the compiled
    function's closure for the generated file unless that file sits under
    the compile cache dir; CPU code has no closure (TypeError).  Inductor's
    FX graph cache would also let identical layers skip the post-grad passes.
    """
    compilation_config = vllm_config.compilation_config
    compilation_config.cache_dir = str(work_dir / "compile" / spec_key(spec))
    compilation_config.inductor_compile_config["fx_graph_cache"] = False
    local = os.path.join(compilation_config.cache_dir, f"rank_{spec.tp_rank}_0")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(local, "inductor")


def spec_key(spec):
    import hashlib
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:10]
    return f"{spec.arch}-{spec.mode}-{spec.engine}-{digest}"


@contextlib.contextmanager
def spec_env(spec):
    """``spec``'s engine and attention backend, freshly selected: vLLM caches
    the backend choice keyed without VLLM_ATTENTION_BACKEND."""
    with _env(VLLM_USE_V1="1" if spec.engine == "v1" else "0",
              VLLM_ATTENTION_BACKEND=spec.attention_backend):
        from vllm.attention.selector import _cached_get_attn_backend
        _cached_get_attn_backend.cache_clear()
        yield


def ensure_checkpoint(model_dir, spec):
    """``model_dir``, with the embedded checkpoint of ``spec`` built there if
    it holds none."""
    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").exists():
        from cpu_harness.tiny_checkpoint import build_checkpoint
        build_checkpoint(model_dir, arch=spec.arch, num_layers=spec.num_layers,
                         fmt=spec.fmt)
    return model_dir


def build_model(vllm_config):
    """The model class vLLM picks for the config, constructed on CPU."""
    import torch
    from unittest.mock import patch

    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import get_model_architecture

    # Stand-in for device detection: vLLM's FlashAttention backend asks
    # torch.cuda for the capability directly (the harness platform says 9.0).
    with set_current_vllm_config(vllm_config), \
            default_dtype(vllm_config.model_config.dtype), \
            patch("torch.cuda.get_device_capability", lambda *a, **k: (9, 0)):
        model_cls, _ = get_model_architecture(vllm_config.model_config)
        return model_cls(vllm_config=vllm_config)


def executable(spec: ModelSpec) -> bool:
    """Whether the CPU harness can run ``spec`` with the overlay installed:
    attention must be the overlay's Triton backend (vLLM's FlashAttention
    and stock Triton kernels have no CPU stand-in; V1 or its V0 twin).
    Tensor-parallel ranks all-reduce over gloo (``platform.GlooCommunicator``)."""
    return spec.attention_backend in ("TRITON_ATTN_VLLM_V1", "TRITON_ATTN_VLLM_V0")


def compile_model(spec: ModelSpec = ModelSpec(), work_dir=None,
                  dist_init_method: Optional[str] = None,
                  execute: Optional[bool] = None) -> CompiledModel:
    """Build, compile, capture (and run, by default where ``executable``);
    see the module docstring."""
    work_dir = setup_process(work_dir)
    if execute is None:
        execute = executable(spec)
    with spec_env(spec):
        return _compile(spec, work_dir, dist_init_method, execute)


def _compile(spec, work_dir, dist_init_method, execute):
    import torch
    import vllm.compilation.backends as backends
    from vllm.compilation.pass_manager import PostGradPassManager
    from vllm.config import CompilationConfig, set_current_vllm_config
    from vllm.forward_context import set_forward_context

    model_dir = ensure_checkpoint(
        work_dir / f"{spec.arch}-{spec.fmt}-{spec.num_layers}l", spec)
    vllm_config = _build_vllm_config(spec, model_dir)
    _set_compile_dirs(vllm_config, work_dir, spec)
    _init_distributed(spec.tp_size, spec.tp_rank, dist_init_method)

    # VllmBackend asks CUDA for a graph pool at construction: give it a token.
    if backends.global_graph_pool is None:
        backends.global_graph_pool = object()

    captured = {}
    post_grad = []
    orig_init_backend = CompilationConfig.init_backend
    orig_pass_call = PostGradPassManager.__call__

    def init_backend(self, cfg):
        vllm_backend = orig_init_backend(self, cfg)
        captured["backend"] = vllm_backend
        if execute:
            return vllm_backend

        def stop_after_compile(graph, example_inputs):
            vllm_backend(graph, example_inputs)
            captured["backend"] = vllm_backend
            raise _CompiledStop()

        return stop_after_compile

    def pass_call(self, graph):
        before = str(graph)
        targets_before, inputs_before = _targets(graph), _inputs(graph)
        orig_pass_call(self, graph)
        post_grad.append(PostGrad(before, graph, targets_before, _targets(graph),
                                  inputs_before, _inputs(graph)))

    CompilationConfig.init_backend = init_backend
    PostGradPassManager.__call__ = pass_call
    runner = outputs = None
    try:
        model = build_model(vllm_config)
        from cpu_harness.load import load_weights
        load_weights(model, vllm_config)
        if execute:
            from cpu_harness.execute import Runner
            runner = Runner(model, vllm_config, engine=spec.engine)
            outputs = runner.run()
            return _result(spec, vllm_config, model, captured, post_grad,
                           runner, outputs)
        num_tokens = 8
        input_ids = torch.randint(0, 100, (num_tokens, ), dtype=torch.long)
        positions = torch.arange(num_tokens, dtype=torch.long)
        with set_current_vllm_config(vllm_config), torch.inference_mode(), \
                set_forward_context(None, vllm_config):
            try:
                model(input_ids, positions)
            except Exception as exc:  # Dynamo wraps backend exceptions
                if not _is_stop(exc):
                    raise
    finally:
        CompilationConfig.init_backend = orig_init_backend
        PostGradPassManager.__call__ = orig_pass_call
    return _result(spec, vllm_config, model, captured, post_grad, None, None)


def _result(spec, vllm_config, model, captured, post_grad, runner, outputs):
    if spec.mode == "eager":
        return CompiledModel(spec, vllm_config, model, None, None, [], [],
                             runner, outputs)
    if "backend" not in captured:
        raise RuntimeError("VllmBackend was never called: nothing compiled")
    vllm_backend = captured["backend"]
    pieces = [Piece(item.submod_name, item.is_splitting_graph, item.graph)
              for item in vllm_backend.piecewise_graphs]
    return CompiledModel(spec, vllm_config, model, vllm_backend,
                         vllm_backend.graph, pieces, post_grad, runner, outputs)


def _inputs(graph):
    return [node.name for node in graph.nodes if node.op == "placeholder"]


def _targets(graph):
    return [name for node in graph.nodes
            if (name := auto_functionalized_target(node) or op_name(node))]


def _is_stop(exc):
    while exc is not None:
        if isinstance(exc, _CompiledStop):
            return True
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return False


def summarize(compiled: CompiledModel) -> dict:
    """A JSON-able summary, comparable across processes."""
    return {
        "spec": dataclasses.asdict(compiled.spec),
        "dynamo_ops": dict(compiled.dynamo_ops()),
        "pieces": [{"name": p.name, "is_splitting_graph": p.is_splitting_graph,
                    "ops": dict(op_counts(p.graph.graph)), "code": p.graph.code}
                   for p in compiled.pieces],
        "post_grad": [{"targets_before": pg.targets_before,
                       "targets_after": pg.targets_after, "before": pg.before,
                       "after": str(pg.after)} for pg in compiled.post_grad],
        "logits": [o.logits.tolist() for o in compiled.outputs or ()],
    }


def compile_in_subprocess(spec: ModelSpec, overlay: bool = False,
                          timeout=900, init_method: str = "") -> dict:
    """Compile in a fresh process; stock vLLM unless ``overlay`` (only the
    harness platform plugin loads there); return summarize()."""
    import subprocess
    import sys
    with tempfile.TemporaryDirectory(prefix="vllm_harness_sub_") as tmp:
        out = pathlib.Path(tmp) / "summary.json"
        env = dict(os.environ, VLLM_PLUGINS="cpu_harness")
        for key in ("TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT"):
            env.pop(key, None)
        proc = subprocess.run(
            [sys.executable, "-m", "cpu_harness.compile", json.dumps(
                dataclasses.asdict(spec)), str(out), tmp, str(int(overlay)),
             init_method],
            env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"harness subprocess failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _main(argv):
    fields = json.loads(argv[0])
    fields["pass_config"] = tuple(tuple(kv) for kv in fields.get("pass_config", ()))
    if argv[3] == "1":
        setup_process(argv[2])
        import vllm_overlay
        vllm_overlay.install()
    compiled = compile_model(ModelSpec(**fields), work_dir=argv[2],
                             dist_init_method=argv[4] or None,
                             execute=None if argv[3] == "1" else False)
    pathlib.Path(argv[1]).write_text(json.dumps(summarize(compiled)))


if __name__ == "__main__":
    import sys
    _main(sys.argv[1:])
