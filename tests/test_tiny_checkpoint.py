"""Tests for cpu_harness/tiny_checkpoint.py (CPU only, offline).

The module is loaded from its file so that these tests do not run the
overlay's ``install()`` (``import vllm_overlay`` patches vLLM).
"""
import hashlib
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cpu_harness import tiny_checkpoint as tc  # noqa: E402


ARCHS = ("llama", "qwen2", "mistral")
FMTS = ("fp8", "compressed-tensors", "fp8-dynamic")
DIMS = dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
            intermediate_size=256, vocab_size=512)
HEAD_DIM = 32
VLLM_QUANT = {"fp8": "fp8", "compressed-tensors": "compressed-tensors",
              "fp8-dynamic": "compressed-tensors"}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    cache = {}

    def get(arch, fmt):
        if (arch, fmt) not in cache:
            d = tmp_path_factory.mktemp(f"{arch}_{fmt}")
            cache[arch, fmt] = tc.build_checkpoint(d, arch=arch, fmt=fmt)
        return cache[arch, fmt]

    return get


def _state(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _hashes(path):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
    }


def _expected_tensors(arch, fmt):
    """name -> (dtype, shape) that vLLM's loader expects for this format."""
    h, q, kv, inter, v = 128, 4 * HEAD_DIM, 2 * HEAD_DIM, 256, 512
    out = {
        "model.embed_tokens.weight": (torch.bfloat16, (v, h)),
        "model.norm.weight": (torch.bfloat16, (h, )),
        "lm_head.weight": (torch.bfloat16, (v, h)),
    }
    lin = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
           "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
           "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
           "mlp.down_proj": (h, inter)}
    scalar = {"fp8": (), "compressed-tensors": (1, )}.get(fmt)
    for i in range(2):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (torch.bfloat16, (h, ))
        out[p + "post_attention_layernorm.weight"] = (torch.bfloat16, (h, ))
        for m, shape in lin.items():
            out[p + m + ".weight"] = (torch.float8_e4m3fn, shape)
            if fmt == "fp8-dynamic":
                out[p + m + ".weight_scale"] = (torch.float32, (shape[0], 1))
            else:
                out[p + m + ".weight_scale"] = (torch.float32, scalar)
                out[p + m + ".input_scale"] = (torch.float32, scalar)
        if arch == "qwen2":
            for m, n in (("q", q), ("k", kv), ("v", kv)):
                out[p + f"self_attn.{m}_proj.bias"] = (torch.bfloat16, (n, ))
    return out


# ----------------------------------------------------------------- files


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FMTS)
def test_tensor_names_dtypes_shapes(built, arch, fmt):
    state = _state(built(arch, fmt))
    got = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    assert got == _expected_tensors(arch, fmt)
    for k, v in state.items():
        if k.endswith("_scale"):
            assert torch.isfinite(v).all() and (v > 0).all(), k
        else:
            assert torch.isfinite(v.float()).all(), k


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantized_weights_close_to_reference(built, fmt):
    state = _state(built("llama", fmt))
    ref = tc.reference_weights("llama", seed=0)
    assert set(ref) == {k for k in state if not k.endswith("_scale")}
    n_quant = 0
    for k, w in ref.items():
        deq = tc.dequantize(state, k)
        if tc.is_quantized_linear(k):
            n_quant += 1
            # e4m3 has 3 mantissa bits: relative error per element <= 1/16
            rel = (deq - w).norm() / w.norm()
            assert 1e-4 < rel < 0.05, (k, float(rel))
            # the largest element maps (close) to the fp8 max
            assert state[k].float().abs().max() >= 400
        else:
            torch.testing.assert_close(deq, w, rtol=0, atol=0)
    assert n_quant == 2 * 7


def test_static_activation_scales_from_calibration(built):
    state = _state(built("llama", "fp8"))
    config = json.loads((built("llama", "fp8") / "config.json").read_text())
    amax = tc.calibrate_input_amax(config, tc.reference_weights("llama"),
                                   tc.calibration_token_ids(512))
    assert len(amax) == 2 * 7
    for module, a in amax.items():
        s = float(state[module + ".input_scale"])
        # scale = amax / 448 with amax rounded up to 8 significant bits
        assert a / 448 <= s <= a / 448 * (1 + 2**-7), module
    # q/k/v (and gate/up) see the same input, hence the same scale
    p = "model.layers.1."
    assert float(state[p + "self_attn.q_proj.input_scale"]) == float(
        state[p + "self_attn.v_proj.input_scale"])
    # o_proj / down_proj inputs differ from the normed hidden state
    assert float(state[p + "self_attn.o_proj.input_scale"]) != float(
        state[p + "self_attn.q_proj.input_scale"])


@pytest.mark.parametrize("arch,fmt", [("llama", "fp8"),
                                      ("qwen2", "compressed-tensors"),
                                      ("mistral", "fp8-dynamic")])
def test_fp8_emulation_tracks_float_model(built, arch, fmt):
    """Scales are realistic: the FP8 model (weights + activations rounded
    through FP8 as in vLLM) gives nearly the float model's logits."""
    dims = tc._dims(2, 128, 4, 2, None, 256, 512)
    ref = tc._hf_model(tc.make_config(arch, dims, None),
                       tc.reference_weights(arch), dtype=torch.float32)
    fp8 = tc.load_reference_model(built(arch, fmt), emulate_fp8=True)
    ids = torch.tensor([tc.calibration_token_ids(512)[1]])
    with torch.no_grad():
        a = ref(input_ids=ids).logits[0]
        b = fp8(input_ids=ids).logits[0]
    assert a.std() > 1.0  # not a flat distribution
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    assert not torch.equal(a, b)  # activations really went through FP8


def test_determinism_and_seed(tmp_path):
    a = tc.build_checkpoint(tmp_path / "a", arch="qwen2", fmt="fp8")
    b = tc.build_checkpoint(tmp_path / "b", arch="qwen2", fmt="fp8")
    c = tc.build_checkpoint(tmp_path / "c", arch="qwen2", fmt="fp8", seed=1)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert set(ha) == {"config.json", "generation_config.json",
                       "model.safetensors", "special_tokens_map.json",
                       "tokenizer.json", "tokenizer_config.json"}
    assert ha == hb
    assert hc["model.safetensors"] != ha["model.safetensors"]
    assert hc["tokenizer.json"] == ha["tokenizer.json"]


def test_cli_in_fresh_process_is_byte_identical(tmp_path, built):
    """``python -m cpu_harness.tiny_checkpoint`` in a fresh process
    (new hash seeds, package import) writes the same bytes as an in-process
    build."""
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m",
                        "cpu_harness.tiny_checkpoint", str(out),
                        "--arch", "llama", "--fmt", "fp8"],
                       cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith(str(out))
    assert _hashes(out) == _hashes(built("llama", "fp8"))


def test_cli_arguments(tmp_path):
    assert tc.main([str(tmp_path / "m"), "--arch", "qwen2", "--fmt",
                    "fp8-dynamic", "--num-layers", "1", "--hidden-size",
                    "64", "--num-heads", "2", "--num-kv-heads", "1",
                    "--vocab-size", "300"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (1, 64, 32, 1,
                                                               300)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    with pytest.raises(ValueError):
        tc.build_checkpoint(tmp_path / "x", arch="gpt2")
    with pytest.raises(ValueError):
        tc.build_checkpoint(tmp_path / "x", fmt="int8")


# --------------------------------------------------- transformers config/tok


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FMTS)
def test_transformers_config(built, arch, fmt):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(built(arch, fmt))
    spec = tc.ARCHS[arch]
    assert cfg.model_type == spec.model_type
    assert cfg.architectures == [spec.architecture]
    assert cfg.torch_dtype == torch.bfloat16
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size) == (2, 128, 4, 2, 32, 256, 512)
    assert cfg.max_position_embeddings == 512
    assert cfg.quantization_config["quant_method"] == VLLM_QUANT[fmt]


def test_tokenizer_roundtrip(built):
    from transformers import AutoTokenizer
    path = built("llama", "fp8")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.is_fast and len(tok) == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for text in ("Hello world! The cat sat on the mat.",
                 "  odd   spacing\tand\nnewlines ",
                 "unseen: Zebra quux 42 \u00fcber \U0001F642"):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert max(ids) < 512
        assert tok.decode(ids, skip_special_tokens=True) == text
    # merges were learnt: common words are single tokens
    assert len(tok("the").input_ids) == 2
    assert len(tok(" the cat").input_ids) < len(" the cat")
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id


# ------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm")
    import vllm.distributed as vd
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        vd.init_distributed_environment(
            world_size=1, rank=0, local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            backend="gloo")
    vd.ensure_model_parallel_initialized(1, 1)
    return vd


@pytest.fixture(scope="module")
def inprocess_model_inspection():
    """vLLM's registry inspects each architecture in a fresh subprocess
    (~15 s each on this box, to keep CUDA out of the parent); the model
    modules import fine on CPU, so inspect them in-process instead."""
    pytest.importorskip("vllm")
    from vllm.model_executor.models import registry
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_run_in_subprocess", lambda fn: fn())
        yield


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FMTS)
def test_vllm_config_detects_quantization(built, inprocess_model_inspection,
                                          arch, fmt):
    from vllm.config import ModelConfig
    from vllm.transformers_utils.config import get_config
    path = built(arch, fmt)
    hf = get_config(str(path), trust_remote_code=False)
    assert hf.architectures == [tc.ARCHS[arch].architecture]
    mc = ModelConfig(model=str(path), task="generate", tokenizer=str(path),
                     tokenizer_mode="auto", trust_remote_code=False,
                     dtype="auto", seed=0)
    assert mc.quantization == VLLM_QUANT[fmt]
    assert mc.dtype == torch.bfloat16
    assert mc.max_model_len == 512
    assert mc.get_head_size() == HEAD_DIM
    assert mc.get_vocab_size() == 512
    assert mc.architectures == [tc.ARCHS[arch].architecture]


def test_vllm_tokenizer(built):
    pytest.importorskip("vllm")
    from vllm.transformers_utils.tokenizer import get_tokenizer
    tok = get_tokenizer(str(built("qwen2", "fp8")))
    assert len(tok) == 512
    text = "Question: what color is the sky? Answer: blue."
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.eos_token_id == 1


def _vllm_quant_config(path, monkeypatch):
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability
    # compressed-tensors picks W8A8 (not W8A16) only on >= sm89
    monkeypatch.setattr(current_platform, "get_device_capability",
                        lambda *a, **k: DeviceCapability(9, 0))
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    return get_quantization_config(qcfg["quant_method"]).from_config(qcfg)


@pytest.mark.parametrize("arch,fmt", [("llama", "fp8"), ("qwen2", "fp8"),
                                      ("llama", "compressed-tensors"),
                                      ("qwen2", "compressed-tensors"),
                                      ("mistral", "fp8-dynamic")])
def test_vllm_linear_layers_load_checkpoint(built, vllm_env, monkeypatch,
                                            arch, fmt):
    """Feed the checkpoint through vLLM's own weight iterator, the name
    mapping of LlamaForCausalLM/Qwen2ForCausalLM.load_weights
    (packed_modules_mapping = stacked_params_mapping) and the weight_loaders
    of vLLM's fused linear layers built with the detected quant method.
    Every parameter must be filled with exactly the checkpoint's values."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear,
                                                   QKVParallelLinear,
                                                   RowParallelLinear)
    from vllm.model_executor.model_loader.weight_utils import (
        safetensors_weights_iterator)
    from vllm.model_executor.models import ModelRegistry

    path = built(arch, fmt)
    qc = _vllm_quant_config(path, monkeypatch)
    model_cls, _ = ModelRegistry.resolve_model_cls(
        [tc.ARCHS[arch].architecture])
    packed = model_cls.packed_modules_mapping
    assert packed == {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                      "gate_up_proj": ["gate_proj", "up_proj"]}
    shard_ids = {"q_proj": "q", "k_proj": "k", "v_proj": "v",
                 "gate_proj": 0, "up_proj": 1}
    stacked = {sub: fused for fused, subs in packed.items() for sub in subs}

    layers = {}
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with set_current_vllm_config(VllmConfig()):
            for i in range(2):
                p = f"model.layers.{i}."
                layers[p + "self_attn.qkv_proj"] = QKVParallelLinear(
                    128, HEAD_DIM, 4, 2, bias=tc.ARCHS[arch].qkv_bias,
                    quant_config=qc, prefix=p + "self_attn.qkv_proj")
                layers[p + "self_attn.o_proj"] = RowParallelLinear(
                    128, 128, bias=False, quant_config=qc,
                    prefix=p + "self_attn.o_proj")
                layers[p + "mlp.gate_up_proj"] = MergedColumnParallelLinear(
                    128, [256, 256], bias=False, quant_config=qc,
                    prefix=p + "mlp.gate_up_proj")
                layers[p + "mlp.down_proj"] = RowParallelLinear(
                    256, 128, bias=False, quant_config=qc,
                    prefix=p + "mlp.down_proj")
    finally:
        torch.set_default_dtype(old_dtype)

    params = {f"{m}.{n}": prm for m, layer in layers.items()
              for n, prm in layer.named_parameters()}
    # the quant method registered what the format needs
    qkv0 = layers["model.layers.0.self_attn.qkv_proj"]
    assert qkv0.weight.dtype == torch.float8_e4m3fn
    assert ("model.layers.0.self_attn.qkv_proj.input_scale" in params) == (
        fmt != "fp8-dynamic")

    loaded = set()
    n_seen = 0
    for name, w in safetensors_weights_iterator(
            [str(path / "model.safetensors")], False):
        n_seen += 1
        if ".layers." not in name or name.endswith("layernorm.weight"):
            continue  # embeddings / norms / lm_head: not quantized layers
        leaf = name.split(".")[-2]
        if leaf in stacked:
            target = name.replace("." + leaf + ".", "." + stacked[leaf] + ".")
            prm = params[target]
            prm.weight_loader(prm, w, shard_ids[leaf])
        else:
            target = name
            prm = params[target]
            prm.weight_loader(prm, w)
        loaded.add(target)
    assert n_seen == len(_expected_tensors(arch, fmt))
    assert loaded == set(params)  # every vLLM param has checkpoint data

    state = _state(path)
    for i in range(2):
        p = f"model.layers.{i}."
        for fused, subs in packed.items():
            sect = "self_attn." if fused == "qkv_proj" else "mlp."
            prm = params[p + sect + fused + ".weight"]
            want = torch.cat([state[p + sect + s + ".weight"] for s in subs])
            assert torch.equal(prm.data.view(torch.uint8),
                               want.view(torch.uint8))
            for sc in ("weight_scale", "input_scale"):
                key = p + sect + fused + "." + sc
                if key not in params:
                    continue
                parts = [state[p + sect + s + "." + sc] for s in subs]
                if parts[0].dim() == 2:  # per-channel: rows concatenated
                    want = torch.cat(parts)
                else:  # per-tensor: one scale per shard
                    want = torch.stack([t.reshape(()) for t in parts])
                assert torch.equal(params[key].data, want), key
        if tc.ARCHS[arch].qkv_bias:
            want = torch.cat([state[p + f"self_attn.{s}_proj.bias"]
                              for s in "qkv"])
            assert torch.equal(params[p + "self_attn.qkv_proj.bias"].data,
                               want)
        for m in ("self_attn.o_proj", "mlp.down_proj"):
            assert torch.equal(params[p + m + ".weight"].data.view(
                torch.uint8), state[p + m + ".weight"].view(torch.uint8))
    # no scale left at the "not loaded" sentinel
    for k, prm in params.items():
        if k.endswith("_scale"):
            assert (prm.data > 0).all() and torch.isfinite(prm.data).all(), k


@pytest.mark.parametrize("fmt,static", [("compressed-tensors", True),
                                        ("fp8-dynamic", False)])
def test_vllm_compressed_tensors_scheme(built, monkeypatch, fmt, static):
    pytest.importorskip("vllm")
    from compressed_tensors.quantization import QuantizationStrategy
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes \
        import CompressedTensorsW8A8Fp8
    qc = _vllm_quant_config(built("llama", fmt), monkeypatch)
    layer = torch.nn.Linear(4, 4)
    scheme = qc.get_scheme(layer, layer_name="model.layers.0.self_attn.o_proj")
    assert isinstance(scheme, CompressedTensorsW8A8Fp8)
    assert scheme.is_static_input_scheme == static
    assert scheme.strategy == (QuantizationStrategy.TENSOR if static else
                               QuantizationStrategy.CHANNEL)
    # lm_head stays unquantized
    assert qc.get_quant_method(torch.nn.Linear(4, 4), "lm_head") is None \
        or "Unquantized" in type(qc.get_quant_method(
            torch.nn.Linear(4, 4), "lm_head")).__name__


def test_vllm_fp8_config_static():
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    cfg = tc.make_config("llama", tc._dims(2, 128, 4, 2, None, 256, 512),
                         "fp8")
    qc = Fp8Config.from_config(cfg["quantization_config"])
    assert qc.is_checkpoint_fp8_serialized
    assert qc.activation_scheme == "static"
    assert qc.weight_block_size is None
    assert math.isclose(tc.FP8_MAX, torch.finfo(torch.float8_e4m3fn).max)
