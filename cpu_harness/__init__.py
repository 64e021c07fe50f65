"""GPU-less harness: compile real vLLM 0.8.5 models on a CPU-only machine.

Three stand-ins make the official CUDA wheel usable without a GPU; nothing
else is faked and no CUDA kernel ever runs:

1. ``cuda_stub.c``: a libcuda.so.1 that answers "no device", so vLLM's ``_C``
   loads and the real op schemas (``torch.ops._C.static_scaled_fp8_quant``,
   ``cutlass_scaled_mm``, ...) register;
2. ``platform.HarnessPlatform``: vLLM's CUDA platform with a fixed device
   (capability 9.0) instead of NVML detection, so layers pick the CUDA code
   paths (custom attention op, FP8 CUTLASS linear);
3. ``compile.py`` stops after ``VllmBackend`` compiled every piece, before
   the compiled model would execute.

Call :func:`activate` before anything imports vLLM.  It refuses to run where
a real NVIDIA driver exists.
"""
import ctypes
import hashlib
import os
import pathlib
import subprocess

ENV_FLAG = "VLLM_OVERLAY_CPU_HARNESS"
_STUB_SOURCE = pathlib.Path(__file__).with_name("cuda_stub.c")
_stub = None


class HarnessRefused(RuntimeError):
    pass


def real_driver_present():
    """True if this machine has an NVIDIA driver (then the stub must not load)."""
    if _stub is not None:
        return False
    if any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0")):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "vllm_overlay"


def build_stub():
    """Compile the driver stub once per source version; return its path."""
    src = _STUB_SOURCE.read_bytes()
    out_dir = _cache_dir() / ("cuda_stub-" + hashlib.sha256(src).hexdigest()[:12])
    lib = out_dir / "libcuda.so.1"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"libcuda.so.1.{os.getpid()}"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1",
                        "-o", str(tmp), str(_STUB_SOURCE)], check=True)
        os.replace(tmp, lib)
    return lib


def activate():
    """Load the driver stub and select the harness platform (idempotent).

    Must run before vLLM resolves its platform (i.e. before ``import vllm``);
    child processes inherit ``VLLM_OVERLAY_CPU_HARNESS=1`` and activate again
    through the ``vllm.platform_plugins`` entry point.
    """
    global _stub
    if _stub is not None:
        return
    if real_driver_present():
        raise HarnessRefused(
            "A real NVIDIA driver is present: the CPU harness (libcuda stub) "
            "must not be used on this machine.")
    _stub = ctypes.CDLL(str(build_stub()), mode=ctypes.RTLD_GLOBAL)
    os.environ[ENV_FLAG] = "1"


def platform_plugin():
    """``vllm.platform_plugins`` entry point: active only in harness
    processes (``VLLM_OVERLAY_CPU_HARNESS=1``, inherited by children).  It
    loads the stub before the platform module imports ``vllm._C``."""
    if os.environ.get(ENV_FLAG) != "1":
        return None
    activate()
    return "cpu_harness.platform.HarnessPlatform"
