"""The fp8-output kernels read K/V like the bf16-output kernel (compiled for sm_90 here, no GPU).

Triton's coalescing gives every load and store that shares index arithmetic the widest vector any of
them can use. Before `_out_cols`, the fp8 output store (16 one-byte elements per thread) widened the
bf16 K/V tile copies of the main loop to 16 elements per thread wherever the K/V tile had the output
tile's shape (BLOCK_N == BLOCK_M): triton 3.2's 128x128 config, 8-10% slower than the bf16 kernel on
the H100 (docs/kernel.md item 9). This compiles each prefill config the kernel uses on the venv's
triton (3.2, vLLM 0.8.5's) with tools/sm90_codegen.py and compares the per-thread vector of the K/V
copies of the static-fp8 and group-fp8 kernels with the bf16 kernel's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import vllm_overlay.triton_paged_attention as tpa

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sm90_codegen.py"


def _configs_in_use():
    """(head size, BLOCK_M, BLOCK_N, warps, stages) of every prefill entry for this triton family."""
    return sorted({(min(d_lim, 256), c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])
                   for (d_lim, _wide), c in tpa._PREFILL_CFGS[tpa._version_family()]})


def test_fp8_outputs_keep_the_bf16_kv_copy_vector():
    configs = [f"{bm},{bn},{w},{st},{d}" for d, bm, bn, w, st in _configs_in_use()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a compile, not the interpreter
    run = subprocess.run([sys.executable, str(TOOL), "--json", "--configs", *configs], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 3 * len(configs)
    vec = {(tuple(r["config"]), r["output"]): r["kv_vec"] for r in rows}
    for cfg in {c for c, _ in vec}:
        assert vec[cfg, "bf16"] == ["[1, 8]"], (cfg, vec[cfg, "bf16"])  # 8 bf16: one 16-byte cp.async
        assert vec[cfg, "fp8"] == vec[cfg, "bf16"] and vec[cfg, "group"] == vec[cfg, "bf16"], \
            (cfg, {o: vec[cfg, o] for o in ("bf16", "fp8", "group")})
