"""Compile the overlay's attention kernel for sm_90 (H100) without a GPU and report its code.

    .venv/bin/python tools/sm90_codegen.py [--configs 128,128,8,2 128,64,8,3 64,64,4,3,64] [--out DIR]

Triton lowers to TTGIR, PTX and a cubin without a device. Here `paged_attention` itself runs on CPU
tensors (its host code only validates and picks configs), and its kernel launches become
`JITFunction.warmup` (compile, no launch) under a stand-in driver that answers triton's "current
device / target" questions with sm_90; the wheel's own `cuobjdump` reads registers and stack (spills)
from the cubin, its `nvdisasm` the SASS. Per prefill config (BLOCK_M, BLOCK_N, warps, stages[, head size, default 128]) and
output (bf16, static fp8, group fp8; the fp8 ones with wide and narrow stores) it prints
registers, stack, shared memory, the per-thread vector of the K/V tile copies (`sizePerThread` of
their blocked layout) and the instructions per iteration of each main loop (the loops holding wgmma) under the installed triton (3.2 in .venv: what vLLM 0.8.5 users run). Costs no
device time: the H100 measures speed (benchmarks/attention_quant.py), this shows the code it comes from.
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

OUTPUTS = ("bf16", "fp8", "fp8 narrow", "group", "group narrow")


class _Sm90Driver:
    """What JITFunction.warmup asks the active driver, answered for an H100."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _CompileOnly:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` compiles for sm_90 and returns it."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn.warmup(*args, grid=grid, **kwargs)


@contextlib.contextmanager
def sm90():
    saved = dict(vars(driver))  # reset_active() would create the real (here: absent) CUDA driver
    driver.set_active(_Sm90Driver())
    kernel = tpa._paged_attn_fwd_kernel
    tpa._paged_attn_fwd_kernel = _CompileOnly(kernel)
    try:
        yield
    finally:
        tpa._paged_attn_fwd_kernel = kernel
        vars(driver).clear()
        vars(driver).update(saved)


def compile_prefill(output, block_m, block_n, num_warps, num_stages, D=128, Hq=32, Hkv=8, bs=16, q_len=4096):
    """The prefill kernel `paged_attention` launches for one sequence of q_len new tokens (bf16 query,
    dense new-token K/V) at the given config, compiled for sm_90."""
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    T, n_blocks = 64, q_len // bs  # CPU tensors: only dtypes, strides and 16-byte alignment reach the compile
    q = torch.empty(T, Hq, D, dtype=bf16)
    kv = torch.empty(T, Hkv, D, dtype=bf16)
    cache = torch.empty(n_blocks, bs, Hkv, D, dtype=bf16)
    out = torch.empty(T, Hq, D, dtype=bf16 if output == "bf16" else fp8)
    kw = dict(key=kv, value=kv)
    if output.startswith("fp8"):
        kw["output_scale"] = torch.ones(1)
    if output.startswith("group"):
        kw["output_group_scale"] = torch.empty(T, Hq)
    qsl = torch.tensor([0, T], dtype=torch.int32)
    seq_lens = torch.tensor([q_len], dtype=torch.int32)
    block_table = torch.zeros(1, n_blocks, dtype=torch.int32)
    # this tool's own copy of the module: its overrides are set per compile, nothing to restore
    tpa.CONFIG_OVERRIDE.clear()
    tpa.CONFIG_OVERRIDE.update(prefill=dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                                            num_stages=num_stages),
                            narrow_fp8_store=0 if output.endswith("narrow") else 1 << 62)
    with sm90():
        tpa.paged_attention(q, cache, cache, out, qsl, seq_lens, block_table, q_len, q_len, D ** -0.5, **kw)
        return tpa.LAST_LAUNCH["prefill"]


def kv_copy_vectors(ttgir: str) -> set:
    """sizePerThread of the blocked layouts the K/V tile copies (cp.async) read through."""
    layouts = dict(re.findall(r"^(#blocked\d*) = #(?:triton_gpu|ttg)\.blocked<\{sizePerThread = (\[[^\]]*\])",
                              ttgir, re.M))
    used = set(re.findall(r"async_copy_global_to_local .*?!tt\.ptr<bf16>, (#blocked\d*)>", ttgir))
    return {layouts[u] for u in used}


def _cubin_tool(kernel, tool: str, *flags) -> str:
    """stdout of one of the triton wheel's CUDA binary tools (cuobjdump, nvdisasm) on the kernel's cubin."""
    exe = Path(triton.__file__).parent / "backends/nvidia/bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(exe), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resources(kernel) -> dict:
    """Registers and stack bytes from the cubin (cuobjdump -res-usage), shared bytes from the metadata."""
    usage = _cubin_tool(kernel, "cuobjdump", "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=kernel.metadata.shared)


def main_loops(kernel) -> list:
    """Instruction count of each SASS loop (a backward branch) that holds an HGMMA, in code order."""
    sass = _cubin_tool(kernel, "nvdisasm", "-c")
    label_at, ins, label = {}, [], None
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            if label:
                label_at[label], label = addr, None
            ins.append((addr, m.group(2)))
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", text)
        if m and label_at.get(m.group(1), addr) < addr:
            body = [t for a, t in ins if label_at[m.group(1)] <= a <= addr]
            if any("HGMMA" in t for t in body):
                loops.append(len(body))
    return loops


def report(configs, out_dir=None):
    rows = []
    for cfg in configs:
        for output in OUTPUTS:
            k = compile_prefill(output, *cfg)
            rows.append(dict(config=cfg, output=output, kv_vec=sorted(kv_copy_vectors(k.asm["ttgir"])),
                             loops=main_loops(k), **resources(k)))
            if out_dir:
                stem = Path(out_dir) / f"{output.replace(' ', '_')}_{'x'.join(map(str, cfg))}"
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
        print(f"{str(r['config']):18s} {r['output']:12s} regs {r['regs']:3d} stack {r['stack']:4d} "
              f"shared {r['shared']:6d} K/V copy vector {', '.join(r['kv_vec'])} "
              f"loop instructions {' / '.join(map(str, r['loops']))}")


if __name__ == "__main__":
    main()
