"""Test and benchmark harness helpers (tiny local checkpoints, CPU stubs)."""
