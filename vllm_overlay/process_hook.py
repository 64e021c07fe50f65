"""Keep the overlay active in a spawned V1 engine-core process.

vLLM 0.8.5 loads ``vllm.general_plugins`` in the front-end process and in
workers, but a V1 engine core started with the ``spawn`` method imports vLLM
afresh and never loads them (for more than one GPU).  After ``install()``,
the process target vLLM hands to ``BackgroundProcHandle`` is
:func:`run_engine_core`: unpickling it in the child imports ``vllm_overlay``
(which installs the overlay) before vLLM's own ``run_engine_core`` runs.

Overlay mode only: a patched vLLM carries the feature in its files.
"""
import logging

VLLM_TARGET = None
VLLM_HOOKS = ()

# A child of vLLM's configured "vllm" logger, in both modes.
logger = logging.getLogger("vllm.overlay")


def run_engine_core(*args, **kwargs):
    """Engine-core process entry: overlay first, then vLLM's loop."""
    import vllm_overlay
    from vllm.v1.engine.core import EngineCoreProc
    active = vllm_overlay.install()
    logger.info("vllm_overlay active in engine-core process (%s mode)", active)
    stock = getattr(EngineCoreProc.run_engine_core, "_vllm_overlay_stock",
                    EngineCoreProc.run_engine_core)
    return stock(*args, **kwargs)


def install():
    from vllm.v1.engine.core import EngineCoreProc
    current = EngineCoreProc.run_engine_core
    if getattr(current, "_vllm_overlay_stock", None) is not None:
        return
    # The function pickled for the child is importable by name.
    run_engine_core._vllm_overlay_stock = current
    EngineCoreProc.run_engine_core = staticmethod(run_engine_core)
