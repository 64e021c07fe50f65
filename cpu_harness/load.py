"""Load a tiny FP8 checkpoint through vLLM 0.8.5's own loader on a CPU.

``load_embedded_model(model_dir, spec)`` does what vLLM's
``DefaultModelLoader.load_model`` does, on the CPU harness (no CUDA kernel
runs, CUDA is never initialised):

1. ``ModelConfig`` / ``LoadConfig(load_format="safetensors")`` for the
   checkpoint directory (the config of ``cpu_harness.compile``, with the real
   loader instead of ``dummy``);
2. the model class vLLM picks for the checkpoint, built under
   ``set_current_vllm_config`` + a default bf16 dtype with a gloo
   single-process distributed init (``cpu_harness.compile`` helpers);
3. ``model.load_weights(DefaultModelLoader(...).get_all_weights(...))``:
   vLLM's safetensors iterator feeding the model's own weight loaders
   (q/k/v and gate/up shards into the merged parameters, one scale per shard);
4. vLLM's ``_process_weights_after_loading`` (every quant method's
   ``process_weights_after_loading``), with ``target_device=cpu``.

Where step 4 needs CUDA (found by running it, see ``tests/test_load.py``):
for per-tensor FP8 with more than one logical shard (``qkv_proj``,
``gate_up_proj``) both ``Fp8LinearMethod`` and compressed-tensors
``CompressedTensorsW8A8Fp8`` call ``w8a8_utils.requantize_with_max_scale``,
which dequantizes each shard with plain torch ops (fine on CPU) and
requantizes it to the largest shard scale with ``ops.scaled_fp8_quant`` ->
``torch.ops._C.static_scaled_fp8_quant``.  That op has CUDA and Meta kernels
only: on CPU it raises ``NotImplementedError`` ("Could not run
'_C::static_scaled_fp8_quant' with arguments from the 'CPU' backend").
Everything else in step 4 (transposes, max of input scales, KV-cache scale
handling, per-channel formats) is plain torch and runs unchanged.

STAND-IN: :func:`cpu_static_scaled_fp8_quant` is a CPU kernel for exactly
that one op, registered for the CPU dispatch key only while
:func:`cpu_fp8_quant_standin` is active (during step 4) and removed after.
vLLM's Python wrapper (output allocation, dtype choice) still runs; only the
kernel body is replaced.  It follows the CUDA kernel's source
(``csrc/quantization/fp8/common.cu{,h}``): ``inv = 1.0f / scale``;
``y = fmax(-448, fmin(float(x) * inv, 448))``; ``fp8_e4m3fn(y)``
round-to-nearest-even (i.e. fp8(clamp(x / scale))).  Not verified against
the CUDA kernel on hardware (no GPU here); fast-math reciprocal differences
would show up as rare one-ulp differences in requantized weights.
"""
import contextlib
import dataclasses
import pathlib
from typing import List, NamedTuple, Optional

import stand_ins

from cpu_harness.compile import (ModelSpec, _build_vllm_config, _init_distributed,
                                 build_model, default_dtype, ensure_checkpoint,
                                 setup_process, spec_env)

FP8_MAX = 448.0  # vLLM's FP8_E4M3_MAX for float8_e4m3fn


def cpu_static_scaled_fp8_quant(result, input, scale):
    """STAND-IN (CPU) for ``_C::static_scaled_fp8_quant`` (the shared
    ``stand_ins`` kernel; it also refuses a non-FP8 result)."""
    import torch
    if result.dtype != torch.float8_e4m3fn:
        raise TypeError(f"stand-in writes float8_e4m3fn, got {result.dtype}")
    stand_ins.static_scaled_fp8_quant(result, input, scale)


@dataclasses.dataclass
class StandinLog:
    """Every call the CPU stand-in served: (input shape, scale value)."""
    calls: List[tuple] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def cpu_fp8_quant_standin():
    """Register :func:`cpu_static_scaled_fp8_quant` as the CPU kernel of
    ``_C::static_scaled_fp8_quant`` for the duration (yields a StandinLog)."""
    import torch
    import vllm._custom_ops  # noqa: F401  (loads _C: the op must exist)
    log = StandinLog()

    def kernel(result, input, scale):
        log.calls.append((tuple(input.shape), float(scale.reshape(-1)[0])))
        cpu_static_scaled_fp8_quant(result, input, scale)

    lib = torch.library.Library("_C", "IMPL")
    try:
        lib.impl("static_scaled_fp8_quant", kernel, "CPU")
        yield log
    finally:
        lib._destroy()


class LoadedModel(NamedTuple):
    model: object          # the vLLM model (e.g. LlamaForCausalLM), on CPU
    vllm_config: object
    loaded: frozenset      # parameter names model.load_weights reported
    standin: StandinLog    # requantizations done by the CPU stand-in


def load_embedded_model(model_dir, spec: ModelSpec = ModelSpec(),
                        work_dir=None, use_standin: bool = True) -> LoadedModel:
    """Load ``model_dir`` (built with ``tiny_checkpoint.build_checkpoint``
    from ``spec`` if it has no config.json) through vLLM's loader on CPU;
    see the module docstring.  ``use_standin=False`` runs vLLM's
    post-processing as is (fails on CPU for fused per-tensor FP8 shards)."""
    setup_process(work_dir)
    model_dir = ensure_checkpoint(model_dir, spec)
    with spec_env(spec):
        return _load(model_dir, spec, use_standin)


def _load(model_dir, spec, use_standin):
    vllm_config = _build_vllm_config(spec, model_dir)
    _init_distributed(spec.tp_size, spec.tp_rank)
    model = build_model(vllm_config)
    loaded, log = load_weights(model, vllm_config, use_standin)
    return LoadedModel(model.eval(), vllm_config, loaded, log)


def load_weights(model, vllm_config, use_standin: bool = True):
    """Steps 3 and 4 of the module docstring for a built ``model``: returns
    (parameter names loaded, StandinLog)."""
    import torch
    from vllm.config import LoadConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.loader import (
        DefaultModelLoader, _process_weights_after_loading)

    vllm_config.load_config = LoadConfig(load_format="safetensors")
    model_config = vllm_config.model_config
    loader = DefaultModelLoader(vllm_config.load_config)
    with set_current_vllm_config(vllm_config), \
            default_dtype(model_config.dtype):
        loaded = model.load_weights(
            loader.get_all_weights(model_config, model))
        standin = contextlib.nullcontext(StandinLog())
        if use_standin:
            standin = cpu_fp8_quant_standin()
        with standin as log:
            _process_weights_after_loading(model, model_config,
                                           torch.device("cpu"))
    return frozenset(loaded or ()), log


def processed_linear(model, layer: int, name: str):
    """The processed linear module ``qkv_proj`` / ``o_proj`` /
    ``gate_up_proj`` / ``down_proj`` of decoder ``layer``."""
    block = model.model.layers[layer]
    if name in ("qkv_proj", "o_proj"):
        return getattr(block.self_attn, name)
    return getattr(block.mlp, name)


def checkpoint_state(model_dir):
    """The checkpoint's tensors, read with safetensors directly (not vLLM)."""
    from safetensors.torch import load_file
    return load_file(str(pathlib.Path(model_dir) / "model.safetensors"))


def shards_of(name: str) -> Optional[tuple]:
    """Checkpoint modules stacked into vLLM's merged module ``name``."""
    return {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
            "o_proj": ("o_proj", ),
            "gate_up_proj": ("gate_proj", "up_proj"),
            "down_proj": ("down_proj", )}.get(name)
