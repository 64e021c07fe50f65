"""benchmarks/dense_ceiling.py (the dense-Triton ceiling the benchmark times as variant x) against its
float64 reference, in the Triton interpreter: GQA and MHA, two sequences, both tile shapes it uses
(scaled down), a poisoned output so unwritten rows show."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, torch
sys.path.insert(0, "benchmarks")
from dense_ceiling import dense_causal_attention, dense_causal_reference
torch.manual_seed(0)
for B, L, hq, hkv, d, cfg in ((2, 64, 4, 2, 32, (32, 16, 4, 2)), (1, 48, 2, 2, 16, (16, 16, 4, 2))):
    q, k, v = (torch.randn(B * L, h, d, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    out = torch.full_like(q, float("nan"))
    dense_causal_attention(q, k, v, out, B, L, cfg)
    ref = dense_causal_reference(q, k, v, B, L)
    err = (out.double() - ref).abs().max().item()
    assert not out.isnan().any(), "unwritten output"
    assert err < 2e-2, err  # bf16 P and output rounding
    print("ok", B, L, hq, hkv, d, cfg, err)
"""


def test_dense_ceiling_matches_reference():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok") == 2, r.stdout
