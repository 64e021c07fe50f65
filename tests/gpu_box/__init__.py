"""Tests that need vLLM 0.8.5.post1 and a CUDA GPU; they skip elsewhere."""
