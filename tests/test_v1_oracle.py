"""Which engine a user gets: vLLM 0.8.5's V1 oracle with the overlay.

``--kv-cache-dtype fp8`` sends stock vLLM 0.8.5 to V0 unless FlashAttention
3 serves it; with the overlay's Triton backend (which reads an e4m3 cache)
V1 stays on.  Everything else decides as stock.  Real ``EngineArgs`` on the
embedded checkpoint; nothing runs.
"""
import pytest

import vllm_overlay
from cpu_harness.compile import ModelSpec, ensure_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_checkpoint(tmp_path_factory.mktemp("oracle"), ModelSpec())


def _v1_chosen(model_dir, monkeypatch, backend, kv_dtype):
    from vllm.engine.arg_utils import EngineArgs
    monkeypatch.delenv("VLLM_USE_V1", raising=False)
    if backend is None:
        monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)
    else:
        monkeypatch.setenv("VLLM_ATTENTION_BACKEND", backend)
    args = EngineArgs(model=str(model_dir), kv_cache_dtype=kv_dtype,
                      skip_tokenizer_init=True, max_model_len=256)
    return args._is_v1_supported_oracle(args.create_model_config())


@pytest.mark.parametrize("backend, kv_dtype, v1", [
    ("TRITON_ATTN_VLLM_V1", "fp8", True),
    ("TRITON_ATTN_VLLM_V1", "fp8_e4m3", True),
    ("TRITON_ATTN_VLLM_V1", "fp8_e5m2", False),      # the kernel reads e4m3 only
    ("TRITON_ATTN_VLLM_V1", "auto", True),
    ("FLASHINFER_VLLM_V1", "fp8", False),            # stock decides
])
def test_fp8_kv_cache_keeps_v1_for_the_overlay_backend(model_dir, monkeypatch,
                                                       backend, kv_dtype, v1):
    vllm_overlay.install()
    assert _v1_chosen(model_dir, monkeypatch, backend, kv_dtype) is v1


def test_stock_oracle_falls_back_to_v0(model_dir, monkeypatch):
    """What the overlay changes: the stock oracle refuses the same case."""
    vllm_overlay.install()
    from vllm.engine.arg_utils import EngineArgs
    oracle = EngineArgs._is_v1_supported_oracle
    stock = oracle.__closure__[
        oracle.__code__.co_freevars.index("stock")].cell_contents
    monkeypatch.setattr(EngineArgs, "_is_v1_supported_oracle", stock)
    assert _v1_chosen(model_dir, monkeypatch, "TRITON_ATTN_VLLM_V1", "fp8") is False
