"""The GPU box (torch 2.11, triton 3.6, no vLLM) running vLLM 0.8.5.post1
from the bundle (``gpu_harness/vllm_bundle.py``).

``activate()`` runs when vLLM imports ``vllm._C`` (the bundle's
``vllm/_C.py``), in every process:

1. ``stand_ins.register("CUDA", define=True)``: the ``_C`` /
   ``_C_cache_ops`` ops on their real schemas (torch implementations, CUDA
   fast paths for the FP8 GEMM and the static quant; schema-only entries for
   ops vLLM only references);
2. torch-version shims in vLLM's compiler adaptor, only when torch is not
   2.6 (what vLLM 0.8.5 is built and tested for), each applied when its
   module is imported (``SHIMS``).

Nothing here is used on a real vLLM GPU box (its ``_C`` exists).
"""
import importlib.abc
import importlib.util
import os
import sys

_active = False
_libs = []     # the stand-ins' torch.library.Library objects: a collected
               # Library unregisters its ops, so they live as long as we do


def _shim_compiler_interface(mod):
    """torch >= 2.8's Inductor reads ``shape_env.var_to_hint_override``
    (FX graph cache lookup, ``_get_shape_env``); vLLM 0.8.5's stand-in shape
    env ``AlwaysHitShapeEnv`` predates it.  An empty mapping = no override,
    as a fresh ShapeEnv has."""
    cls = mod.AlwaysHitShapeEnv
    if not hasattr(cls, "var_to_hint_override"):
        cls.var_to_hint_override = {}
        _log("AlwaysHitShapeEnv.var_to_hint_override = {}")


# module -> shim (applied right after the module executes)
SHIMS = {
    "vllm.compilation.compiler_interface": _shim_compiler_interface,
}


def _log(msg):
    print(f"gpu_harness.box: shim: {msg}", file=sys.stderr, flush=True)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs SHIMS[name](module) once ``name`` has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in SHIMS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, shim = spec.loader, SHIMS[fullname]
        orig_exec = loader.exec_module

        def exec_module(module):
            orig_exec(module)
            shim(module)
        loader.exec_module = exec_module
        return spec


def torch_needs_shims():
    import torch
    return not torch.__version__.startswith("2.6")


def activate():
    global _active
    if _active:
        return
    _active = True
    import stand_ins
    _libs.extend(stand_ins.register("CUDA", define=True))
    if torch_needs_shims():
        for name, shim in SHIMS.items():
            if name in sys.modules:
                shim(sys.modules[name])
        sys.meta_path.insert(0, _PostImportHook())
    if os.environ.get("GPU_BOX_VERBOSE"):
        print(f"gpu_harness.box: stand-ins registered (pid {os.getpid()})",
              file=sys.stderr, flush=True)
