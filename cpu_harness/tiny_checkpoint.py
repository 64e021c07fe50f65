"""Tiny FP8 checkpoints built locally and deterministically (no HF hub).

``build_checkpoint(path, ...)`` writes a complete, loadable Hugging Face style
model directory:

- ``config.json``: HF config (``torch_dtype`` bfloat16) with a
  ``quantization_config`` that vLLM 0.8.5.post1 detects;
- ``model.safetensors``: random but well-scaled weights; every attention / MLP
  linear layer stored as FP8 e4m3fn with fp32 scales, everything else in bf16;
- ``generation_config.json``;
- a byte-level BPE fast tokenizer (``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``) learnt here from a
  small embedded text, so ``AutoTokenizer.from_pretrained`` works offline.

Quantization formats (``fmt``):

``"fp8"``
    vLLM's own FP8 format (``quant_method: fp8``, ``activation_scheme:
    static``).  Per linear layer: ``weight`` (float8_e4m3fn ``[out, in]``),
    ``weight_scale`` and ``input_scale`` (fp32, 0-d).  vLLM keeps one scale
    per q/k/v (gate/up) shard, requantizes the fused weight to the max weight
    scale and uses the max input scale.
``"compressed-tensors"``
    compressed-tensors ``float-quantized`` W8A8 FP8: weights per-tensor,
    static per-tensor activations.  Scales are fp32 of shape ``[1]``.
``"fp8-dynamic"``
    compressed-tensors FP8 with per-channel weight scales (``[out, 1]``) and
    dynamic per-token activation scales: no ``input_scale`` tensors at all.
``"fp8-block"`` / ``"fp8-block-d64"``
    vLLM's block-FP8 format (``quant_method: fp8``, ``activation_scheme:
    dynamic``, ``weight_block_size: [128, 128]``, as the Qwen3 / DeepSeek FP8
    releases): per linear layer ``weight`` (float8_e4m3fn) and
    ``weight_scale_inv`` (fp32 ``[ceil(out/128), ceil(in/128)]``, one scale
    per 128x128 block); activations quantized per token and 128-group at run
    time.  Their default dimensions (``FORMAT_DIMS``) are multiples of 128:
    head size 128 (one group = one head: fusable) or 64 (a group spans two
    heads: not fusable).

Static activation scales come from a float64 calibration forward pass of the
unquantized model (Hugging Face implementation of the same architecture):
``input_scale = amax(|x|) / 448`` for the input of every linear layer, with
``amax`` rounded up to 8 significant bits so that the result does not depend
on the BLAS reduction order of the machine.

Same arguments -> byte-identical files.

CLI: ``python -m cpu_harness.tiny_checkpoint OUT_DIR [--arch llama]
[--fmt fp8] ...``  (the file can also be run directly as a script).
"""
import argparse
import dataclasses
import json
import math
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

FORMATS = ("fp8", "compressed-tensors", "fp8-dynamic", "fp8-block",
           "fp8-block-d64")
BLOCK_FORMATS = ("fp8-block", "fp8-block-d64")
WEIGHT_BLOCK = (128, 128)
# Default dimensions per format where they differ from build_checkpoint's.
FORMAT_DIMS = {
    "fp8-block": dict(hidden_size=256, num_heads=2, num_kv_heads=1,
                      head_dim=128, intermediate_size=256),
    "fp8-block-d64": dict(hidden_size=256, num_heads=4, num_kv_heads=2,
                          head_dim=64, intermediate_size=256),
}

# Special tokens occupy the first ids; byte tokens and merges follow.
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

MAX_POSITIONS = 512
TRANSFORMERS_VERSION = "4.51.3"  # written verbatim, not queried: determinism

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj")
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One supported architecture: adding an arch is one table entry."""
    architecture: str  # HF ``architectures[0]`` (also vLLM's registry key)
    model_type: str
    qkv_bias: bool
    extra_config: Tuple[Tuple[str, object], ...] = ()


ARCHS: Dict[str, ArchSpec] = {
    "llama":
    ArchSpec("LlamaForCausalLM", "llama", False,
             (("attention_bias", False), ("mlp_bias", False),
              ("pretraining_tp", 1))),
    # vLLM runs MistralForCausalLM with its Llama implementation.
    "mistral":
    ArchSpec("MistralForCausalLM", "mistral", False,
             (("sliding_window", None), )),
    # a window shorter than the harness's sequences (cpu_harness.execute)
    "mistral-sw":
    ArchSpec("MistralForCausalLM", "mistral", False,
             (("sliding_window", 8), )),
    "qwen2":
    ArchSpec("Qwen2ForCausalLM", "qwen2", True,
             (("use_sliding_window", False), ("sliding_window", None),
              ("attention_dropout", 0.0))),
}

# Embedded training text for the tokenizer (written for this file).
_CORPUS = """\
The little model reads a short line and writes the next word it likes best.
It has two layers, four heads and a tiny table of tokens, so it is fast on
any machine. Numbers help too: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256.
A cat sat on the warm mat near the door. The dog ran to the park and back.
Rain fell on the roof all night; in the morning the sky was clear and blue.
We test attention, quantization and fusion. The kernel writes FP8 output,
the next layer reads it with a static scale, and nothing is lost on the way.
Hello world! How are you today? I am fine, thank you. What is your name?
Once upon a time there was a small town by the sea, with a red boat, a white
house and a long road that went up the green hill to the old stone tower.
Question: what is two plus two? Answer: four. Question: what color is the
sky? Answer: blue. Tell me a story about a robot who learns to paint.
def add(a, b): return a + b  # code, brackets [ ] { } ( ) and symbols < > = -
"""


# --------------------------------------------------------------------------
# Tokenizer: byte-level BPE learnt here (own deterministic merge learner).
# --------------------------------------------------------------------------
def _learn_bpe(words: Sequence[str], alphabet: Sequence[str],
               num_merges: int) -> List[Tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair, ties broken by the
    pair itself (lexicographically), until ``num_merges`` merges or nothing
    left to merge. Pure Python, hence deterministic."""
    counts: Dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    alpha = set(alphabet)
    seqs = {}
    for w in sorted(counts):
        assert all(c in alpha for c in w), w
        seqs[w] = list(w)
    merges: List[Tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Dict[Tuple[str, str], int] = {}
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if (i + 1 < len(seq) and seq[i] == best[0]
                        and seq[i + 1] == best[1]):
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(vocab_size: int):
    """A ``tokenizers.Tokenizer`` with exactly ``vocab_size`` tokens: 3
    specials, 256 byte tokens, learnt merges, then ``<|extra_N|>`` filler
    tokens if the corpus runs out of merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors

    n_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed + 1:
        raise ValueError(f"vocab_size must be > {n_fixed}")
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    words = [w for w, _ in pre.pre_tokenize_str(_CORPUS)]
    merges = _learn_bpe(words, alphabet, vocab_size - n_fixed)

    vocab: Dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    for ch in alphabet:
        vocab[ch] = len(vocab)
    kept_merges = []
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            kept_merges.append((a, b))
    n_extra = vocab_size - len(vocab)
    extras = [f"<|extra_{i}|>" for i in range(n_extra)]
    for tok in extras:
        vocab[tok] = len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept_merges,
                               fuse_unk=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, BOS_ID)],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS) + extras)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def _write_tokenizer(path: pathlib.Path, vocab_size: int) -> None:
    tok = build_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"), pretty=True)
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    _write_json(path / "special_tokens_map.json", {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD
    })


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Dims:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


def _dims(num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
          intermediate_size, vocab_size) -> Dims:
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        head_dim = hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be divisible by num_kv_heads")
    if head_dim % 2:
        raise ValueError("head_dim must be even (rotary embedding)")
    return Dims(num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
                intermediate_size, vocab_size)


def _quantization_config(fmt: str) -> dict:
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    if fmt in BLOCK_FORMATS:
        return {"quant_method": "fp8", "activation_scheme": "dynamic",
                "weight_block_size": list(WEIGHT_BLOCK)}
    if fmt not in ("compressed-tensors", "fp8-dynamic"):
        raise ValueError(f"unknown fmt {fmt!r}; one of {FORMATS}")
    static = fmt == "compressed-tensors"

    def args(strategy, dynamic):
        return {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": strategy,
            "dynamic": dynamic,
            "group_size": None,
            "block_structure": None,
            "actorder": None,
            "observer": None if dynamic else "minmax",
            "observer_kwargs": {},
        }

    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights":
                args("tensor" if static else "channel", False),
                "input_activations":
                args("tensor" if static else "token", not static),
                "output_activations": None,
            }
        },
    }


def make_config(arch: str, dims: Dims, fmt: Optional[str]) -> dict:
    """HF ``config.json`` contents; ``fmt=None`` -> unquantized."""
    spec = ARCHS[arch]
    cfg = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "vocab_size": dims.vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
    }
    if spec.model_type == "qwen2":
        cfg["max_window_layers"] = dims.num_layers
    cfg.update(dict(spec.extra_config))
    if fmt is not None:
        cfg["quantization_config"] = _quantization_config(fmt)
    return cfg


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------
def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """float32 tensor holding bf16-representable values."""
    return t.to(torch.bfloat16).to(torch.float32)


def reference_weights(arch: str = "llama",
                      num_layers: int = 2,
                      hidden_size: int = 128,
                      num_heads: int = 4,
                      num_kv_heads: int = 2,
                      head_dim: Optional[int] = None,
                      intermediate_size: int = 256,
                      vocab_size: int = 512,
                      seed: int = 0) -> Dict[str, torch.Tensor]:
    """The unquantized float32 weights (HF names) that ``build_checkpoint``
    quantizes. Non-linear tensors (embeddings, norms, biases, lm_head) are
    already rounded to bf16 values since they are stored as bf16."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of {sorted(ARCHS)}")
    d = _dims(num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
              intermediate_size, vocab_size)
    spec = ARCHS[arch]
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    h, q_out, kv_out = d.hidden_size, d.num_heads * d.head_dim, \
        d.num_kv_heads * d.head_dim
    # Residual branch outputs scaled down with depth (GPT-2 style) so the
    # residual stream stays O(1) and activations are well-conditioned.
    out_gain = 1.0 / math.sqrt(2.0 * d.num_layers)
    w: Dict[str, torch.Tensor] = {}
    w["model.embed_tokens.weight"] = _bf16_exact(randn(d.vocab_size, h,
                                                       std=1.0))
    for i in range(d.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = _bf16_exact(1.0 +
                                                      randn(h, std=0.05))
        w[p + "self_attn.q_proj.weight"] = randn(q_out, h, std=h**-0.5)
        w[p + "self_attn.k_proj.weight"] = randn(kv_out, h, std=h**-0.5)
        w[p + "self_attn.v_proj.weight"] = randn(kv_out, h, std=h**-0.5)
        if spec.qkv_bias:
            w[p + "self_attn.q_proj.bias"] = _bf16_exact(randn(q_out,
                                                               std=0.1))
            w[p + "self_attn.k_proj.bias"] = _bf16_exact(randn(kv_out,
                                                               std=0.1))
            w[p + "self_attn.v_proj.bias"] = _bf16_exact(randn(kv_out,
                                                               std=0.1))
        w[p + "self_attn.o_proj.weight"] = randn(h, q_out,
                                                 std=out_gain * q_out**-0.5)
        w[p + "post_attention_layernorm.weight"] = _bf16_exact(
            1.0 + randn(h, std=0.05))
        w[p + "mlp.gate_proj.weight"] = randn(d.intermediate_size,
                                              h,
                                              std=h**-0.5)
        w[p + "mlp.up_proj.weight"] = randn(d.intermediate_size,
                                            h,
                                            std=h**-0.5)
        w[p + "mlp.down_proj.weight"] = randn(
            h, d.intermediate_size, std=out_gain * d.intermediate_size**-0.5)
    w["model.norm.weight"] = _bf16_exact(1.0 + randn(h, std=0.05))
    # Logit std ~2 after the final norm: peaked but not degenerate.
    w["lm_head.weight"] = _bf16_exact(randn(d.vocab_size, h,
                                            std=2.0 * h**-0.5))
    return w


def is_quantized_linear(name: str) -> bool:
    parts = name.split(".")
    return (len(parts) >= 2 and parts[-1] == "weight"
            and parts[-2] in LINEAR_NAMES)


def _round_up_8bit_mantissa(x: float) -> float:
    if x <= 0.0 or not math.isfinite(x):
        raise ValueError(f"bad amax {x}")
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= m < 1
    return math.ldexp(math.ceil(m * 256.0) / 256.0, e)


def quantize_fp8_per_tensor(w: torch.Tensor):
    """(fp8 weight, fp32 0-d scale) with scale = amax / 448."""
    scale = (w.abs().max().to(torch.float32) / FP8_MAX)
    q = (w.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reshape(())


def quantize_fp8_per_channel(w: torch.Tensor):
    """(fp8 weight, fp32 ``[out, 1]`` scale), one scale per output row."""
    amax = w.abs().amax(dim=1, keepdim=True).to(torch.float32)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / FP8_MAX
    q = (w.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_block(w: torch.Tensor, block=WEIGHT_BLOCK):
    """(fp8 weight, fp32 ``[ceil(out/bn), ceil(in/bk)]`` scale), one scale
    (amax / 448) per ``block`` of the weight."""
    bn, bk = block
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32)
    padded[:n, :k] = w
    tiles = padded.reshape(nb, bn, kb, bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / FP8_MAX
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    q = (w.to(torch.float32) / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def calibration_token_ids(vocab_size: int, seed: int = 0) -> List[List[int]]:
    """A few token id sequences: corpus text plus seeded random ids."""
    tok = build_tokenizer(vocab_size)
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    seqs = [tok.encode(" ".join(lines[i:i + 3])).ids[:64]
            for i in range(0, len(lines), 3)]
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    for _ in range(2):
        ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (48, ),
                            generator=g)
        seqs.append([BOS_ID] + ids.tolist())
    return seqs


def _hf_model(config: dict, weights: Dict[str, torch.Tensor],
              dtype=torch.float64):
    """The HF reference implementation with ``weights`` loaded (eager attn).
    Leaves the global torch RNG untouched."""
    import transformers
    cfg = dict(config)
    cfg.pop("quantization_config", None)
    cfg.pop("architectures", None)
    cfg.pop("transformers_version", None)
    cfg["torch_dtype"] = dtype
    hf_cfg = transformers.CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    with torch.random.fork_rng(devices=[]):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_cfg, torch_dtype=dtype, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype)
         for k, v in weights.items()}, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"HF model mismatch: missing={missing} "
                           f"unexpected={unexpected}")
    return model.eval()


def calibrate_input_amax(config: dict, weights: Dict[str, torch.Tensor],
                         token_ids: List[List[int]]) -> Dict[str, float]:
    """max |input| of every quantized linear layer over ``token_ids``,
    keyed by module name (``model.layers.0.self_attn.o_proj``)."""
    model = _hf_model(config, weights)
    amax: Dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in LINEAR_NAMES:

            def hook(_mod, inputs, _out, name=name):
                v = float(inputs[0].detach().abs().max())
                amax[name] = max(amax.get(name, 0.0), v)

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for ids in token_ids:
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantized_state_dict(weights: Dict[str, torch.Tensor], fmt: str,
                         input_amax: Optional[Dict[str, float]] = None
                         ) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors for ``fmt`` from float reference weights."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; one of {FORMATS}")
    out: Dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if not is_quantized_linear(name):
            out[name] = t.to(torch.bfloat16).contiguous()
            continue
        module = name[:-len(".weight")]
        if fmt in BLOCK_FORMATS:
            q, s = quantize_fp8_block(t)
            out[name] = q.contiguous()
            out[module + ".weight_scale_inv"] = s.contiguous()
            continue
        if fmt == "fp8-dynamic":
            q, s = quantize_fp8_per_channel(t)
        else:
            q, s = quantize_fp8_per_tensor(t)
            if fmt == "compressed-tensors":
                s = s.reshape(1)
        out[name] = q.contiguous()
        out[module + ".weight_scale"] = s.to(torch.float32).contiguous()
        if fmt != "fp8-dynamic":
            a = _round_up_8bit_mantissa(input_amax[module])
            x_scale = torch.tensor(a, dtype=torch.float64) / FP8_MAX
            x_scale = x_scale.to(torch.float32)
            out[module + ".input_scale"] = (x_scale.reshape(())
                                            if fmt == "fp8" else
                                            x_scale.reshape(1))
    return out


def dequantize(state: Dict[str, torch.Tensor],
               name: str) -> torch.Tensor:
    """float32 dequantized weight ``name`` (e.g. '...q_proj.weight')."""
    w = state[name]
    if w.dtype != FP8_DTYPE:
        return w.to(torch.float32)
    block = state.get(name[:-len("weight")] + "weight_scale_inv")
    if block is not None:
        n, k = w.shape
        full = block.repeat_interleave(WEIGHT_BLOCK[0], 0).repeat_interleave(
            WEIGHT_BLOCK[1], 1)[:n, :k]
        return w.to(torch.float32) * full
    s = state[name[:-len("weight")] + "weight_scale"].to(torch.float32)
    if s.dim() == 0 or s.numel() == 1:
        s = s.reshape(())
    return w.to(torch.float32) * s


def _fp8_roundtrip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.to(x.dtype) * scale


def load_reference_model(path, emulate_fp8: bool = True,
                         dtype=torch.float32):
    """CPU reference of a built checkpoint: the HF implementation with the
    dequantized FP8 weights. With ``emulate_fp8`` the input of every
    quantized linear is also rounded through FP8 the way vLLM's W8A8 path
    does it (static per-tensor ``input_scale``, max over fused shards; or
    dynamic per-token scales). Useful as the expected output of GPU runs."""
    from safetensors.torch import load_file
    path = pathlib.Path(path)
    config = json.loads((path / "config.json").read_text())
    state = load_file(str(path / "model.safetensors"))
    weights = {
        k: dequantize(state, k)
        for k in state if not k.endswith(("_scale", ))
    }
    model = _hf_model(config, weights, dtype=dtype)
    if not emulate_fp8:
        return model
    # vLLM fuses q/k/v and gate/up and uses the max input scale of the shards.
    groups = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
              "gate_proj": "gate_up", "up_proj": "gate_up"}
    for name, mod in model.named_modules():
        leaf = name.split(".")[-1]
        if leaf not in LINEAR_NAMES:
            continue
        prefix = name[:-len(leaf)]
        shards = [k for k, g in groups.items() if g == groups.get(leaf)] \
            or [leaf]
        keys = [prefix + s + ".input_scale" for s in shards]
        if all(k in state for k in keys):
            x_scale = max(float(state[k].max()) for k in keys)

            def pre_hook(_mod, args, s=x_scale):
                return (_fp8_roundtrip(args[0], torch.tensor(
                    s, dtype=args[0].dtype)), ) + tuple(args[1:])
        else:

            def pre_hook(_mod, args):
                x = args[0]
                s = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(
                    min=1e-12)
                return (_fp8_roundtrip(x, s), ) + tuple(args[1:])

        mod.register_forward_pre_hook(pre_hook)
    return model


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_checkpoint(path,
                     arch: str = "llama",
                     num_layers: int = 2,
                     hidden_size: Optional[int] = None,
                     num_heads: Optional[int] = None,
                     num_kv_heads: Optional[int] = None,
                     head_dim: Optional[int] = None,
                     intermediate_size: Optional[int] = None,
                     vocab_size: int = 512,
                     fmt: str = "fp8",
                     seed: int = 0) -> pathlib.Path:
    """Write a tiny FP8 checkpoint of ``arch`` in ``fmt`` to ``path``.

    Dimensions left None take ``FORMAT_DIMS[fmt]`` (block formats), else
    hidden 128, 4 heads, 2 KV heads, intermediate 256; ``head_dim`` defaults
    to ``hidden_size // num_heads``. Returns the directory as a
    ``pathlib.Path``. Deterministic in all arguments.
    """
    given = dict(hidden_size=hidden_size, num_heads=num_heads,
                 num_kv_heads=num_kv_heads, head_dim=head_dim,
                 intermediate_size=intermediate_size)
    if all(v is None for v in given.values()):
        given.update(FORMAT_DIMS.get(fmt, {}))
    defaults = dict(hidden_size=128, num_heads=4, num_kv_heads=2,
                    intermediate_size=256)
    dim = {k: defaults.get(k) if v is None else v for k, v in given.items()}
    hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size = (
        dim["hidden_size"], dim["num_heads"], dim["num_kv_heads"],
        dim["head_dim"], dim["intermediate_size"])
    from safetensors.torch import save_file

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of {sorted(ARCHS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; one of {FORMATS}")
    dims = _dims(num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
                 intermediate_size, vocab_size)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)

    weights = reference_weights(arch, dims.num_layers, dims.hidden_size,
                                dims.num_heads, dims.num_kv_heads,
                                dims.head_dim, dims.intermediate_size,
                                dims.vocab_size, seed)
    config = make_config(arch, dims, fmt)
    input_amax = None
    if fmt not in ("fp8-dynamic", ) + BLOCK_FORMATS:
        input_amax = calibrate_input_amax(
            config, weights, calibration_token_ids(dims.vocab_size, seed))
    state = quantized_state_dict(weights, fmt, input_amax)

    save_file(state, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json", {
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "do_sample": False,
            "max_length": MAX_POSITIONS,
            "transformers_version": TRANSFORMERS_VERSION,
        })
    _write_tokenizer(path, dims.vocab_size)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Build a tiny deterministic FP8 checkpoint.")
    ap.add_argument("out_dir", metavar="OUT_DIR")
    ap.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    ap.add_argument("--fmt", default="fp8", choices=FORMATS)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=None)
    ap.add_argument("--num-heads", type=int, default=None)
    ap.add_argument("--num-kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--intermediate-size", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = build_checkpoint(a.out_dir,
                           arch=a.arch,
                           num_layers=a.num_layers,
                           hidden_size=a.hidden_size,
                           num_heads=a.num_heads,
                           num_kv_heads=a.num_kv_heads,
                           head_dim=a.head_dim,
                           intermediate_size=a.intermediate_size,
                           vocab_size=a.vocab_size,
                           fmt=a.fmt,
                           seed=a.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
