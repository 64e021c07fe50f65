"""GPU-box bundle only (gpu_harness/vllm_bundle.py copies this file to
``vllm/_C.py``): vLLM 0.8.5's compiled ``_C`` does not exist for torch 2.11.
vLLM imports ``vllm._C`` (platforms/cuda.py, _custom_ops.py) before any
module that reads ``torch.ops._C``; this module registers the torch / Triton
stand-ins on the real schemas instead (``stand_ins``), and the torch-2.11
compat shims (``gpu_harness.box``).  Needs this repository on sys.path."""
try:
    from gpu_harness import box as _box
except ImportError as exc:   # pragma: no cover - box setup error
    raise ImportError("vllm._C stand-in: put the vllm_overlay repository on "
                      f"PYTHONPATH ({exc})") from exc
_box.activate()
