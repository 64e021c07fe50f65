"""A Llama checkpoint with real dimensions for the engine benchmark.

Llama-3-8B shapes (hidden 4096, 32 query / 8 KV heads of 128, intermediate
14336, vocab 128256), ``num_layers`` layers (default 8), vLLM's FP8 format
with static activation scales (``quant_method: fp8``, ``activation_scheme:
static``): random unit-scale FP8 weights with ``weight_scale``
1/sqrt(fan_in), one fixed ``input_scale`` (0.02: inputs up to ~9 after the
RMSNorms), bf16 embeddings / norms / LM head.  The tokenizer is the tiny
checkpoint's (512 tokens): the benchmark feeds token ids and does not
detokenize.  Built on the GPU when there is one (seconds).

    python3 gpu_harness/big_checkpoint.py OUT_DIR [--layers 8]
"""
import argparse
import math
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256)
INPUT_SCALE = 0.02
MAX_POSITIONS = 4096


def build(path, num_layers=8, seed=0):
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import save_file

    from cpu_harness import tiny_checkpoint as tc
    dims = tc.Dims(num_layers=num_layers, **LLAMA3_8B)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    h, d, hq, hkv, inter = (dims.hidden_size, dims.head_dim, dims.num_heads,
                            dims.num_kv_heads, dims.intermediate_size)
    state = {}

    def bf16(*shape, std):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(torch.bfloat16).cpu()

    state["model.embed_tokens.weight"] = bf16(dims.vocab_size, h, std=1.0)
    state["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    state["lm_head.weight"] = bf16(dims.vocab_size, h, std=1 / math.sqrt(h))
    linears = {"self_attn.q_proj": (hq * d, h), "self_attn.k_proj": (hkv * d, h),
               "self_attn.v_proj": (hkv * d, h), "self_attn.o_proj": (h, hq * d),
               "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
               "mlp.down_proj": (h, inter)}
    for i in range(num_layers):
        pre = f"model.layers.{i}."
        state[pre + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        state[pre + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        for name, (out_f, in_f) in linears.items():
            w = torch.randn(out_f, in_f, generator=g, device=dev).clamp(-448, 448)
            state[pre + name + ".weight"] = w.to(torch.float8_e4m3fn).cpu()
            state[pre + name + ".weight_scale"] = torch.tensor(1 / math.sqrt(in_f))
            state[pre + name + ".input_scale"] = torch.tensor(INPUT_SCALE)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = tc.make_config("llama", dims, "fp8")
    config["max_position_embeddings"] = MAX_POSITIONS
    config["rope_theta"] = 500000.0
    tc._write_json(path / "config.json", config)
    tc._write_json(path / "generation_config.json",
                   {"bos_token_id": tc.BOS_ID, "eos_token_id": tc.EOS_ID,
                    "do_sample": False, "transformers_version": tc.TRANSFORMERS_VERSION})
    tc._write_tokenizer(path, 512)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    print(build(a.out_dir, a.layers))
