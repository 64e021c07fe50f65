"""Put the overlay's identity into vLLM's torch.compile cache key.

vLLM 0.8.5 keys its compile cache on the traced model sources and the
config, not on the sources of post-grad passes or kernels.  A changed or
newly enabled pass could silently reuse stale graphs.  After ``install()``,
``CompilationConfig.compute_hash()`` also covers ``identity()``: the overlay
version and a hash of the sources of every feature module.
"""
import hashlib
import pathlib

VLLM_TARGET = "vllm/compilation/overlay_cache_key.py"
VLLM_HOOKS = ("vllm/config.py", )

OVERLAY_VERSION = "0.1.0"

def source_files():
    """The modules whose source decides what the compiled graphs look like."""
    import vllm_overlay.attention_ops as attention_ops
    import vllm_overlay.attention_quant as attention_quant
    import vllm_overlay.attn_fusion as attn_fusion
    import vllm_overlay.sticky_split as sticky_split
    import vllm_overlay.triton_backend as triton_backend
    import vllm_overlay.triton_paged_attention as triton_paged_attention
    modules = (attention_quant, attention_ops, attn_fusion, sticky_split,
               triton_paged_attention, triton_backend)
    return [pathlib.Path(m.__file__) for m in modules]


def identity():
    """'<version>-<sha256 of the feature modules' sources>'."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{OVERLAY_VERSION}-{digest.hexdigest()[:16]}"


def install():
    from vllm.config import CompilationConfig
    if getattr(CompilationConfig.compute_hash, "_vllm_overlay", False):
        return
    stock_compute_hash = CompilationConfig.compute_hash

    def compute_hash(self) -> str:
        stock = stock_compute_hash(self)
        return hashlib.sha256(f"{stock}|{identity()}".encode()).hexdigest()

    compute_hash._vllm_overlay = True
    compute_hash.__doc__ = stock_compute_hash.__doc__
    CompilationConfig.compute_hash = compute_hash
