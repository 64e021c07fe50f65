"""The embedded checkpoint through vLLM 0.8.5's own loader, on CPU.

Real vLLM code throughout: ``ModelConfig``/``LoadConfig``, the model class,
``DefaultModelLoader.get_all_weights`` (safetensors iterator),
``model.load_weights`` and ``_process_weights_after_loading``.  Nothing is
compiled and no CUDA kernel runs.

STAND-IN: the requantization of per-tensor FP8 shards to the largest shard
scale (``requantize_with_max_scale`` -> ``_C::static_scaled_fp8_quant``, a
CUDA-only kernel) runs on ``cpu_harness.load.cpu_static_scaled_fp8_quant``.
Its semantics are checked here against an independent float64 reference; its
agreement with the CUDA kernel on hardware is NOT checked here (no GPU).
Expected values come from the safetensors file read directly, never from
vLLM.
"""
import pytest
import torch

import cpu_harness
from cpu_harness.compile import ModelSpec

pytestmark = pytest.mark.skipif(
    cpu_harness.real_driver_present(),
    reason="CPU-harness test: a real NVIDIA driver is present")

FP8 = torch.float8_e4m3fn
N_LAYERS = 2
MERGED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ATTN_SCALE_PARAMS = ("attn.k_scale", "attn.v_scale", "attn.q_scale",
                     "attn.prob_scale")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """Checkpoint dir + loaded model per (arch, fmt), built once per module
    (the name makes tests/conftest.py skip these next to a real driver)."""
    cache = {}

    def get(arch="llama", fmt="fp8"):
        if (arch, fmt) not in cache:
            from cpu_harness.load import load_embedded_model
            model_dir = tmp_path_factory.mktemp(f"{arch}-{fmt}")
            spec = ModelSpec(arch=arch, fmt=fmt, num_layers=N_LAYERS)
            cache[arch, fmt] = (model_dir, load_embedded_model(model_dir, spec))
        return cache[arch, fmt]

    return get


# ---------------------------------------------------------------- helpers --

def _fp8_within_one_step(a, b):
    """Elementwise: fp8 tensors a, b equal or adjacent on the e4m3fn grid."""
    ua = a.view(torch.uint8).to(torch.int16)
    ub = b.view(torch.uint8).to(torch.int16)
    ma, mb = ua & 0x7F, ub & 0x7F
    same_sign = (ua & 0x80) == (ub & 0x80)
    near_zero = (torch.minimum(ma, mb) == 0) & ((ma - mb).abs() <= 1)
    return (same_sign & ((ma - mb).abs() <= 1)) | near_zero


def _ref_quant(x64, scale):
    """Independent reference: fp8(clamp(x / scale)) computed in float64."""
    return (x64 / float(scale)).clamp(-448.0, 448.0).to(torch.float32).to(FP8)


# ------------------------------------------------- what needs CUDA: proof --

def test_stock_post_processing_needs_cuda_only_for_requantization(harness, tmp_path):
    """Without the stand-in, vLLM's own post-processing fails on CPU, and
    only in requantize_with_max_scale -> _C::static_scaled_fp8_quant."""
    from cpu_harness.load import load_embedded_model
    with pytest.raises(NotImplementedError) as info:
        load_embedded_model(tmp_path / "ck", ModelSpec(fmt="fp8"),
                            use_standin=False)
    msg = str(info.value)
    assert "_C::static_scaled_fp8_quant" in msg and "'CPU' backend" in msg
    frames = [f.name for f in info.traceback]
    assert "requantize_with_max_scale" in frames
    assert "process_weights_after_loading" in frames
    # The stand-in is registered only inside its context: nothing leaked.
    out = torch.empty(2, 2, dtype=FP8)
    with pytest.raises(NotImplementedError):
        torch.ops._C.static_scaled_fp8_quant(out, torch.ones(2, 2),
                                             torch.ones(1))
    assert not torch.cuda.is_initialized()


def test_standin_semantics(harness):
    """STAND-IN check: RTNE, clamp to +-448, multiply by 1/scale, any input
    dtype; equal to a float64 reference on random data; registered only
    inside cpu_fp8_quant_standin()."""
    from cpu_harness.load import (cpu_fp8_quant_standin,
                                  cpu_static_scaled_fp8_quant)
    scale = torch.tensor([0.5])
    x = torch.tensor([0.53125, 0.59375, -0.53125, 250.0, -1000.0,
                      float("nan"), 2.0 ** -11, 3 * 2.0 ** -12, 0.0])
    out = torch.empty_like(x, dtype=FP8)
    cpu_static_scaled_fp8_quant(out, x, scale)
    # x/scale: 1.0625 (tie -> 1.0, even), 1.1875 (tie -> 1.25), 500 -> 448,
    # -2000 -> -448, NaN -> 448 (fminf/fmaxf drop NaN), 2^-10 (tie -> 0),
    # 1.5 * 2^-10 -> 2^-9 (smallest subnormal).
    assert out.float().tolist() == [1.0, 1.25, -1.0, 448.0, -448.0, 448.0,
                                    0.0, 2.0 ** -9, 0.0]
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = (torch.randn(64, 96, generator=gen) * 3).to(dtype)
        s = torch.tensor(0.013)
        out = torch.empty(64, 96, dtype=FP8)
        cpu_static_scaled_fp8_quant(out, x, s)
        ref = _ref_quant(x.double(), s)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), dtype
    with cpu_fp8_quant_standin() as log:
        from vllm import _custom_ops as ops
        q, _ = ops.scaled_fp8_quant(torch.full((2, 16), 3.0, dtype=torch.float16),
                                    torch.tensor([2.0]))
    assert q.float().unique().tolist() == [1.5]
    assert log.calls == [((2, 16), 2.0)]
    with pytest.raises(NotImplementedError):
        ops.scaled_fp8_quant(torch.ones(2, 16), torch.tensor([2.0]))


# ------------------------------------------------------ weights land right --

@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_per_tensor_fp8_weights_land_in_vllm_modules(harness, fmt):
    from cpu_harness.load import checkpoint_state, processed_linear, shards_of
    model_dir, loaded = harness("llama", fmt)
    state = checkpoint_state(model_dir)
    model = loaded.model
    assert type(model).__name__ == "LlamaForCausalLM"
    expected_calls = []
    for layer in range(N_LAYERS):
        for merged in MERGED:
            mod = processed_linear(model, layer, merged)
            prefix = f"model.layers.{layer}." + (
                "self_attn." if merged in ("qkv_proj", "o_proj") else "mlp.")
            shards = shards_of(merged)
            w_file = [state[prefix + s + ".weight"] for s in shards]
            s_file = [state[prefix + s + ".weight_scale"].reshape(())
                      for s in shards]
            x_file = [state[prefix + s + ".input_scale"].reshape(())
                      for s in shards]
            s_max = max(s_file, key=float)
            # vLLM stores the processed weight transposed: [in, out].
            weight = mod.weight.t()
            assert mod.weight.dtype == FP8
            assert weight.shape == (sum(w.shape[0] for w in w_file),
                                    w_file[0].shape[1])
            assert mod.weight_scale.dtype == torch.float32
            assert mod.weight_scale.numel() == 1
            assert float(mod.weight_scale) == float(s_max)
            assert float(mod.input_scale) == max(float(x) for x in x_file)
            start = 0
            for name, w, s in zip(shards, w_file, s_file):
                got = weight[start:start + w.shape[0]]
                start += w.shape[0]
                expected_calls.append((tuple(w.shape), float(s_max)))
                where = f"layer {layer} {name}"
                if float(s) == float(s_max):
                    # requantized to its own scale: the file's bytes
                    assert torch.equal(got.view(torch.uint8),
                                       w.view(torch.uint8)), where
                    continue
                ref = _ref_quant(w.double() * float(s), s_max)
                near = _fp8_within_one_step(got, ref)
                assert bool(near.all()), where
                exact = (got.view(torch.uint8) == ref.view(torch.uint8))
                assert exact.float().mean() > 0.99, where
                # dequantized values agree with the file's within FP8 rounding
                deq = got.double() * float(s_max)
                deq_file = w.double() * float(s)
                bound = deq_file.abs() * 2.0 ** -4 + float(s_max) * 2.0 ** -9
                assert bool(((deq - deq_file).abs() <= bound).all()), where
    # The stand-in served exactly vLLM's requantizations, in module order.
    assert loaded.standin.calls == expected_calls
    assert not torch.cuda.is_initialized()


def test_per_channel_dynamic_fp8_needs_no_standin(harness):
    """fp8-dynamic (compressed-tensors channel/token): no requantization,
    bytes and per-channel scales as in the file, no input scale."""
    from cpu_harness.load import checkpoint_state, processed_linear, shards_of
    model_dir, loaded = harness("llama", "fp8-dynamic")
    state = checkpoint_state(model_dir)
    assert loaded.standin.calls == []
    for layer in range(N_LAYERS):
        for merged in MERGED:
            mod = processed_linear(loaded.model, layer, merged)
            prefix = f"model.layers.{layer}." + (
                "self_attn." if merged in ("qkv_proj", "o_proj") else "mlp.")
            shards = shards_of(merged)
            w = torch.cat([state[prefix + s + ".weight"] for s in shards])
            s = torch.cat([state[prefix + s + ".weight_scale"] for s in shards])
            assert torch.equal(mod.weight.t().view(torch.uint8),
                               w.view(torch.uint8)), (layer, merged)
            assert torch.equal(mod.weight_scale.reshape(-1), s.reshape(-1))
            assert getattr(mod, "input_scale", None) is None


@pytest.mark.parametrize("fmt", ["fp8", "fp8-dynamic"])
def test_every_checkpoint_tensor_is_loaded(harness, fmt):
    """load_weights consumed every parameter; unquantized tensors are the
    file's values; attention KV scales (not in the checkpoint) keep 1.0."""
    from cpu_harness.load import checkpoint_state
    model_dir, loaded = harness("llama", fmt)
    state = checkpoint_state(model_dir)
    params = dict(loaded.model.named_parameters())
    missing = {n for n in params if n not in loaded.loaded}
    assert all(n.endswith(ATTN_SCALE_PARAMS) for n in missing), missing
    renamed = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    for key in state:
        parts = key.split(".")
        if len(parts) > 2:
            parts[-2] = renamed.get(parts[-2], parts[-2])
        assert ".".join(parts) in loaded.loaded, key
    for key in ("model.embed_tokens.weight", "model.norm.weight",
                "lm_head.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight"):
        assert params[key].dtype == torch.bfloat16
        assert torch.equal(params[key], state[key]), key
    for layer in range(N_LAYERS):
        attn = loaded.model.model.layers[layer].self_attn.attn
        assert float(attn._k_scale) == 1.0 and float(attn._v_scale) == 1.0


def test_qwen2_qkv_bias_lands(harness):
    from cpu_harness.load import checkpoint_state, processed_linear
    model_dir, loaded = harness("qwen2", "fp8")
    state = checkpoint_state(model_dir)
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    for layer in range(N_LAYERS):
        mod = processed_linear(loaded.model, layer, "qkv_proj")
        prefix = f"model.layers.{layer}.self_attn."
        bias = torch.cat([state[prefix + s + ".bias"]
                          for s in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(mod.bias, bias)
        assert float(mod.input_scale) == max(
            float(state[prefix + s + ".input_scale"])
            for s in ("q_proj", "k_proj", "v_proj"))
    assert len(loaded.standin.calls) == 7 * N_LAYERS


# ------------------------------------------------ invalid activation scales --

@pytest.mark.parametrize("bad", [0.0, -0.05, float("nan"), float("inf")])
def test_invalid_o_proj_scale_is_refused_at_load(harness, tmp_path, bad):
    """With enable_attn_fusion, vLLM's DefaultModelLoader.load_model (the
    loader the engine uses) refuses a checkpoint whose o_proj input scale is
    0, negative, NaN or inf, naming the layer; never garbage FP8."""
    import shutil

    from safetensors.torch import load_file, save_file

    import stand_ins
    import vllm_overlay
    from cpu_harness.compile import _build_vllm_config, spec_env
    from vllm.model_executor.model_loader.loader import DefaultModelLoader
    vllm_overlay.install()
    good_dir, _ = harness()
    model_dir = tmp_path / "bad"
    shutil.copytree(good_dir, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.input_scale"
    state[name] = torch.full_like(state[name], bad)
    save_file(state, str(model_dir / "model.safetensors"))
    spec = ModelSpec(num_layers=N_LAYERS, pass_config=(("enable_attn_fusion", True), ))
    def load(spec):
        config = _build_vllm_config(spec, model_dir)
        config.load_config.load_format = "safetensors"
        config.device_config.device = torch.device("cpu")
        return DefaultModelLoader(config.load_config).load_model(vllm_config=config)

    with spec_env(spec), stand_ins.registered("CPU"):
        with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj"
                           r"\.input_scale"):
            load(spec)
        # the same checkpoint with fusion off loads as stock vLLM would
        load(ModelSpec(num_layers=N_LAYERS))
