"""tests/gpu runs as several pytest processes beside the benchmark's warm-up on one GPU
(benchmarks/attention_quant.py --tests): each test hands its cached blocks back to the driver, so the
large cases (batch 533 with 40 heads) are not refused memory that another process merely caches."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _release_cuda_cache():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
