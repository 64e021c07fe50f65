"""(placeholder: implemented in a later step)."""
VLLM_TARGET = None
VLLM_HOOKS = ()


def install():
    pass
