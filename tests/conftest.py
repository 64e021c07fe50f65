"""Test session setup: GPU-less harness first, then vLLM and the overlay.

Compiled models are session-scoped: each configuration compiles once per
test run (about a minute each on two cores).
"""
import os

import pytest

import cpu_harness

GPU_BOX = cpu_harness.real_driver_present()
if not GPU_BOX:
    # Triton kernels run in the interpreter where there is no GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpu_harness.compile import (ModelSpec, compile_in_subprocess,  # noqa: E402
                                 compile_model, setup_process)

# The CPU harness (driver stub) must never load next to a real driver.
WORK_DIR = None if GPU_BOX else setup_process()


def pytest_collection_modifyitems(config, items):
    if not GPU_BOX:
        return
    skip = pytest.mark.skip(reason="CPU-harness test: this machine has an "
                            "NVIDIA driver, where the libcuda stub must not load")
    for item in items:
        if "harness" in item.fixturenames or any(
                f in item.fixturenames for f in ("stock_compiled", "overlay_compiled")):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _default_dtype_stays_float32():
    """vLLM model construction switches torch's default dtype; make sure no
    test leaks it into the next one."""
    import torch
    yield
    leaked = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    assert leaked == torch.float32, f"test left default dtype {leaked}"


class _Cache:
    def __init__(self, build):
        self.build, self.items = build, {}

    def __call__(self, spec):
        if spec not in self.items:
            self.items[spec] = self.build(spec)
        return self.items[spec]


@pytest.fixture(scope="session")
def stock_compiled():
    """spec -> summary of the graphs stock vLLM compiles (fresh process,
    overlay entry point not loaded)."""
    return _Cache(compile_in_subprocess)


@pytest.fixture(scope="session")
def overlay_compiled():
    """spec -> CompiledModel compiled in this process with the overlay on."""
    import vllm_overlay
    mode = vllm_overlay.install()
    # tests/test_patched_mode.py runs tests again on a patched vLLM copy
    assert mode == os.environ.get("VLLM_OVERLAY_EXPECT_MODE", "overlay")
    return _Cache(lambda spec: compile_model(spec, work_dir=WORK_DIR))


@pytest.fixture(scope="session")
def spec_factory():
    return ModelSpec
