"""GPU-box bundle only (first on PYTHONPATH, so every process, the spawned
ones too, runs it): empty stand-in modules for vLLM 0.8.5's optional imports
that nothing run here uses (guided decoding, Mistral tokenizer, Ray,
tracing, the API server).  ``import outlines.fsm.guide`` and the like then
succeed and give placeholder objects; using one raises."""
import importlib.abc
import importlib.machinery
import sys
import types

STUBS = ("outlines", "xgrammar", "llguidance", "lm_format_enforcer",
         "mistral_common", "ray", "opentelemetry", "depyf", "watchfiles",
         "prometheus_fastapi_instrumentator", "uvicorn", "interegular",
         "pythonjsonlogger", "xformers")


class _Placeholder:
    def __init__(self, *args, **kwargs):
        raise ImportError("gpu-box stand-in module: not available here")

    def __class_getitem__(cls, item):
        return cls


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Placeholder,), {"__module__": self.__name__})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        mod.__version__ = "0.0.0"
        return mod

    def exec_module(self, module):
        pass


if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.append(_StubFinder())      # after the real finders
