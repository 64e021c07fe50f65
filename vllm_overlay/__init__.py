"""Attention + FP8 output-quant fusion for vLLM 0.8.5.post1 (RFC #16220).

``import vllm_overlay`` patches the installed vLLM at runtime (overlay mode).
The same modules, copied into the vLLM tree by the patch series (``apply.py``),
give a patched vLLM (file mode); then importing this package changes nothing.

Every feature module listed in ``MODULES`` follows one contract:

- ``VLLM_TARGET``: path, inside the vLLM package, where the patch series puts a
  copy of the module (imports of ``vllm_overlay.<m>`` rewritten to the targets),
  or ``None`` for modules that exist only in overlay mode;
- ``VLLM_HOOKS``: vLLM files at whose end the patch series appends a call to
  the module's ``install()``;
- ``install()``: idempotent; applies the module's change to the live vLLM
  (absent in modules that only add code, like the kernel).

Without vLLM installed (e.g. a GPU box used only for kernel benchmarks) the
package imports and patches nothing; the kernel module needs torch and triton
only.
"""
import importlib
import importlib.util
import logging
import sys

from vllm_overlay.compile_cache import OVERLAY_VERSION as __version__

SUPPORTED_VLLM_VERSIONS = ("0.8.5.post1", )

# Install order == patch series order.
MODULES = (
    "vllm_overlay.compile_cache",
    "vllm_overlay.attention_quant",
    "vllm_overlay.attention_ops",
    "vllm_overlay.block_fp8_quant",
    "vllm_overlay.attn_fusion",
    "vllm_overlay.sticky_split",
    "vllm_overlay.triton_paged_attention",
    "vllm_overlay.triton_backend",
    "vllm_overlay.triton_backend_v0",
    "vllm_overlay.process_hook",
)

logger = logging.getLogger("vllm.overlay")

_mode = None  # "overlay" | "patched" once install() ran


class UnsupportedVllmVersion(RuntimeError):
    pass


def vllm_version():
    """The installed vLLM's version, or None when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def check_vllm_version(found=None):
    found = vllm_version() if found is None else found
    if found not in SUPPORTED_VLLM_VERSIONS:
        raise UnsupportedVllmVersion(
            f"vllm_overlay {__version__} supports vLLM "
            f"{', '.join(SUPPORTED_VLLM_VERSIONS)} only; found vLLM {found}. "
            "Nothing was patched.")


def active(module):
    """The live copy of feature module ``module`` ("sticky_split", ...): the
    one inside vLLM in patched mode, else this package's."""
    mod = importlib.import_module(f"vllm_overlay.{module}")
    if mode() == "patched" and getattr(mod, "VLLM_TARGET", None):
        return importlib.import_module(
            mod.VLLM_TARGET[:-len(".py")].replace("/", "."))
    return mod


def is_patched_vllm():
    """True when the installed vLLM carries the patch series (file mode)."""
    for name in MODULES:
        mod = importlib.import_module(name)
        target = getattr(mod, "VLLM_TARGET", None)
        if target is None:
            continue
        dotted = target[:-len(".py")].replace("/", ".")
        if importlib.util.find_spec(dotted) is None:
            return False
    return True


def mode():
    """'patched', 'overlay' or 'stock' (overlay not installed yet)."""
    return _mode or "stock"


def install():
    """Apply every module's change to the live vLLM, once."""
    global _mode
    if _mode is not None:
        return _mode
    check_vllm_version()
    # vLLM's compilation modules read torch.ops._C at import time; its
    # platform resolution (done here) loads _C first, as in vLLM's own entry
    # points.  A freshly spawned process may reach us before that.
    import vllm._custom_ops  # noqa: F401
    # vLLM modules patched by feature modules that a patched vLLM hooks
    # at their own import (attention_quant patches the loader).
    import vllm.model_executor.model_loader.loader  # noqa: F401
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        # Nothing to fuse: vLLM found no CUDA device (or could not load _C).
        logger.warning("vllm_overlay: vLLM platform is %s, not CUDA; nothing "
                       "installed (stock vLLM)", type(current_platform).__name__)
        _mode = "stock"
        return _mode
    if is_patched_vllm():
        _mode = "patched"
        return _mode
    for name in MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "install"):
            module.install()
    _mode = "overlay"
    logger.info("vllm_overlay %s installed (overlay mode)", __version__)
    return _mode


def register():
    """vLLM ``general_plugins`` entry point."""
    install()


# ``python -m vllm_overlay ...`` (sys.argv[0] is "-m" while Python locates
# the package) installs in its own time: on a machine without a GPU it first
# sets up the CPU harness, which must precede any vLLM import.
if vllm_version() is not None and sys.argv[:1] != ["-m"]:
    install()
