"""Compile the overlay's attention kernel for sm_90 (H100) without a GPU and report its code.

    .venv/bin/python tools/sm90_codegen.py [--configs 128,128,8,2 128,64,8,3 64,64,4,3,64] [--out DIR]

Triton lowers to TTGIR, PTX and a cubin without a device: a stand-in driver answers triton's "current
device / target" questions with sm_90, `JITFunction.warmup` compiles without launching, and the wheel's
own `cuobjdump` reads registers and stack (spills) from the cubin. Per prefill config (BLOCK_M,
BLOCK_N, warps, stages) and output (bf16, static fp8, group fp8) it prints registers, stack, shared
memory and the per-thread vector of the K/V tile copies (`sizePerThread` of their blocked layout),
with the installed triton (3.2 in .venv: what vLLM 0.8.5 users run). Costs no device time; the H100
measures speed (benchmarks/attention_quant.py), this shows the code the speed comes from.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("tools/sm90_codegen.py compiles: run it without TRITON_INTERPRET=1")
# the kernel module alone (no vllm_overlay package import: nothing of vLLM is needed to compile it)
_spec = importlib.util.spec_from_file_location(
    "triton_paged_attention", Path(__file__).resolve().parents[1] / "vllm_overlay" / "triton_paged_attention.py")
tpa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpa)

OUTPUTS = ("bf16", "fp8", "group")


class _Sm90Driver:
    """What JITFunction.warmup asks the active driver, answered for an H100."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def sm90():
    saved = dict(vars(driver))  # reset_active() would create the real (here: absent) CUDA driver
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        vars(driver).clear()
        vars(driver).update(saved)


def compile_prefill(output, block_m, block_n, num_warps, num_stages, D=128, dense=True, Hq=32, Hkv=8, bs=16):
    """The tile-mode launch of paged_attention (prefill, bf16 query, D a power of two) as a CompiledKernel
    for sm_90."""
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    G = Hq // Hkv
    q = torch.empty(16, Hq, D, dtype=bf16)  # CPU tensors: only dtypes and 16-byte alignment matter
    cache = torch.empty(16, bs, Hkv, D, dtype=bf16)
    out = torch.empty(16, Hq, D, dtype=bf16 if output == "bf16" else fp8)
    i32 = torch.empty(16, dtype=torch.int32)
    out_scale = torch.ones(1, dtype=torch.float32) if output == "fp8" else 1.0
    group = torch.empty(16, Hq, dtype=torch.float32) if output == "group" else q
    strides = (Hq * D, D, bs * Hkv * D, Hkv * D, D, bs * Hkv * D, Hkv * D, D, Hq * D, D, 256,
               Hq if output == "group" else 0, 1 if output == "group" else 0)
    dense_strides = (Hkv * D, D, Hkv * D, D) if dense else (0, 0, 0, 0)
    with sm90():
        return tpa._paged_attn_fwd_kernel.warmup(
            q, cache, cache, out, i32, i32, i32, q, q, q, q, group, 1.0, 1.0, out_scale, 0.088, 4, 4096, 1,
            *strides, *dense_strides, grid=(1,),
            G=G, NUM_Q_HEADS=Hq, HEAD_D=D, HEAD_D_PAD=D, KV_BLOCK_SIZE=bs, SLIDING_WINDOW=0,
            KS_PTR=False, VS_PTR=False, OS_PTR=output == "fp8", HAS_KV_SCALE=False,
            OUT_FP8=output != "bf16", Q_BF16=True, OUT_GROUP=output == "group", DOT_F32=False,
            PRE_ROUND=False, BLOCK_M=block_m, BLOCK_Q=block_m // G, BLOCK_N=block_n, SEQ_GRID=False,
            SKIP_DECODE=True, USE_SPLIT=False, DENSE_KV=dense, num_warps=num_warps, num_stages=num_stages)


def kv_copy_vectors(ttgir: str) -> set:
    """sizePerThread of the blocked layouts the K/V tile copies (cp.async) read through."""
    layouts = dict(re.findall(r"^(#blocked\d*) = #(?:triton_gpu|ttg)\.blocked<\{sizePerThread = (\[[^\]]*\])", ttgir, re.M))
    used = set(re.findall(r"async_copy_global_to_local .*?!tt\.ptr<bf16>, (#blocked\d*)>", ttgir))
    return {layouts[u] for u in used}


def resources(kernel) -> dict:
    """Registers and stack bytes from the cubin (cuobjdump -res-usage), shared bytes from the metadata."""
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=kernel.metadata.shared)


def report(configs, out_dir=None):
    rows = []
    for cfg in configs:
        for output in OUTPUTS:
            k = compile_prefill(output, *cfg)
            row = dict(config=cfg, output=output, kv_vec=sorted(kv_copy_vectors(k.asm["ttgir"])), **resources(k))
            rows.append(row)
            if out_dir:
                stem = Path(out_dir) / f"{output}_{'x'.join(map(str, cfg))}"
                stem.parent.mkdir(parents=True, exist_ok=True)
                for ext in ("ttgir", "ptx"):
                    stem.with_suffix(f".{ext}").write_text(k.asm[ext])
                stem.with_suffix(".cubin").write_bytes(k.asm["cubin"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=["128,128,8,2", "128,64,8,3"])
    ap.add_argument("--out", default=None, help="also write TTGIR, PTX and cubin here")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = ap.parse_args()
    rows = report([tuple(int(x) for x in c.split(",")) for c in args.configs], args.out)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}, target sm_90")
    for r in rows:
        print(f"{str(r['config']):18s} {r['output']:5s} regs {r['regs']:3d} stack {r['stack']:4d} "
              f"shared {r['shared']:6d} K/V copy vector per thread {', '.join(r['kv_vec'])}")


if __name__ == "__main__":
    main()
