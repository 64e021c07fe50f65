"""What the fp8-output kernels compile to for sm_90, here on the CPU (no GPU): tools/sm90_codegen.py.

Triton's coalescing gives every load and store that shares index arithmetic (and the tensor shape) the
widest vector any of them can use. The fp8 output store can use 16 one-byte elements per thread, so
where a K/V tile has the output tile's shape (BLOCK_N == BLOCK_M: triton 3.2's 128x128 and 64x64
configs) the main loop's bf16 K/V copies widen from the bf16 kernel's 8 to 16 elements per thread;
on the H100 the fp8 kernel was 8-10% slower than the bf16 kernel at 128x128 (docs/kernel.md items
4 and 9). Narrow fp8 stores (`_out_cols`, CONFIG_OVERRIDE["narrow_fp8_store"]; by default for static
FP8 output of d128 prefills from 2048 query tokens) give the fp8 kernels the bf16 kernel's copies at every prefill config
in use on the venv's triton (3.2, vLLM 0.8.5's).
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


def test_narrow_fp8_store_keeps_the_bf16_kv_copy_vector():
    configs = [f"{bm},{bn},{w},{st},{d}" for d, bm, bn, w, st in _configs_in_use()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a compile, not the interpreter
    run = subprocess.run([sys.executable, str(TOOL), "--json", "--configs", *configs], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    vec = {(tuple(r["config"]), r["output"]): r["kv_vec"] for r in rows}
    cfgs = {c for c, _ in vec}
    assert len(cfgs) == len(configs) and len(rows) == 5 * len(configs)
    for cfg in cfgs:
        assert vec[cfg, "bf16"] == ["[1, 8]"], (cfg, vec[cfg, "bf16"])  # 8 bf16: one 16-byte cp.async
        for out in ("fp8 narrow", "group narrow"):
            assert vec[cfg, out] == vec[cfg, "bf16"], (cfg, out, vec[cfg, out])
    # the mechanism narrow stores undo: at 128x128 (3.2's long-prefill config) the plain fp8 store widens them
    wide = [c for c in cfgs if c[:2] == (128, 128)]
    assert wide and all(vec[c, "fp8"] == ["[1, 16]"] for c in wide), {c: vec[c, "fp8"] for c in wide}
