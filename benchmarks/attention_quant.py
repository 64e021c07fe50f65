"""Benchmark: paged attention with fused static FP8 output vs bf16 out + standalone quant vs cuDNN SDPA,
under triton 3.2 (what vLLM 0.8.5 users run) and the box's own triton in ONE call.

Usage (GPU box, repository root):
    python3 benchmarks/attention_quant.py $OUT [--tritons 3.2,3.6] [--bundle .gpu_bundle/triton-3.2.0.tar.xz]
        [--tests] [--sweep] [--report] [--quick] [--shapes SUBSTR,...] [--variants a,b,g,h] [--warm-procs 6]
        [--phase1-timeout S]
        [--vllm-bundle .gpu_bundle/vllm085] [--baseline FILE]
The parent process unpacks the triton 3.2 bundle (gpu_harness/triton_bundle.py) and vLLM's bundle
(gpu_harness/vllm_bundle.py: its site goes on PYTHONPATH with the repository, as gpu_harness/box_run.sh
does, for every child under each triton where `import vllm` works there; else h is missing), optionally runs
tests/gpu under both tritons while it fills triton's kernel cache from parallel warm-up processes
(every kernel the timing will launch is compiled there, so compile time stays out of the timed
processes), then runs one timing child per triton, one after the other, and merges their JSON into
attention_quant.md. `--child` runs one timing child in this process's own triton.

Variants per shape (all on the same inputs; per-call times in microseconds):
  a:  paged_attention(out=fp8, output_scale, key=, value=)   fused, new tokens' K/V read densely (narrow
      fp8 stores and the bf16 kernel's config on d128 prefills from 2048 tokens: triton_paged_attention.
      _NARROW_FROM; docs/kernel.md item 9)
  aw: a with wide fp8 stores everywhere (the fp8 kernel's own configs; CONFIG_OVERRIDE narrow_fp8_store)
  an: a with narrow fp8 stores everywhere
  a0: a on a baseline copy of the kernel module (--baseline FILE, e.g. `git show REV:vllm_overlay/
      triton_paged_attention.py`): the kernel before a change, timed in the same rounds; asserted byte-equal
  b:  paged_attention(out=bf16, key=, value=)                same kernel, stock output
  c:  b + static_fp8_quant(bf16 -> fp8)                       unfused
  d:  torch SDPA bf16 (cuDNN, dense, K/V pre-expanded) + the same quant (prefills of equal lengths)
  ap: a without key/value (every K/V through the paged cache, what a caller without them gets)
  g:  paged_attention(out=fp8, output_group_scale=column-major [T, Hq], key=, value=)   fused dynamic
      per-token-group FP8 (group = D), as vLLM's per_token_group_quant_fp8 of the bf16 output
  gn: g with narrow fp8 stores everywhere (group output: narrow by default only on triton 3.2's long d128
      prefills)
  h:  b + vLLM's own per_token_group_quant_fp8(column_major_scales=True)   unfused (missing without vLLM)
  x:  the dense-Triton ceiling (benchmarks/dense_ceiling.py: contiguous K/V, one query head per tile, bf16
      out; the fastest of its CONFIGS, picked per shape) on prefills of equal lengths; checked against b
Method: a 2 s GEMM warm-up takes the GPU past its idle clocks; per shape, input sets are rotated
(as many copies as needed to exceed 2x the L2 size, at most 8) so no call hits data the previous
call left in L2; each variant is warmed, then ROUNDS rounds each time every variant once, in an order
that rotates per round (interleaved), as a burst of calls between CUDA events (>= ~4 ms per burst).
Reported: the median of the round times, spread = (max - min) / median over rounds; rows where any
variant's spread exceeds 5% are flagged. Perf: TFLOP/s with causal FLOPs (prefill) or GB/s of
K+V+Q+O moved (decode; the box's device copy reaches ~3.0 TB/s). The fused output is asserted equal,
byte for byte, to the unfused one (and dense == paged-only) before timing; g's bytes and scales to
vLLM's group quant of the same kernel's bf16 output (without vLLM: to its formula with Triton's
division, tests/gpu/test_group_quant_gpu.py's group_quant_triton_div).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # run as a script on the GPU box

# vLLM 0.8.5's stock V1 Triton path (chunked_prefill_paged_decode), same H100, microseconds:
# triton 3.6 from DESIGN.md section 5, triton 3.2 from issue 12 (both measured 2026-11-24).
VLLM_ANCHORS = {
    "3.6": {"prefill 1x4096": 849, "prefill 4x2048": 867, "prefill 8x512": 172, "decode b64 ctx2048": 310,
            "decode b256 ctx1024": 597, "mixed 4x512 + 60 dec ctx2048": 395},
    "3.2": {"prefill 1x4096": 854, "prefill 4x2048": 868, "prefill 8x512": 162, "decode b64 ctx2048": 299,
            "decode b256 ctx1024": 580, "mixed 4x512 + 60 dec ctx2048": 388},
}
# Plain dense causal Triton attention (contiguous K/V, block pointers, small sweep), same H100 (issue 12).
DENSE_CEILING = {"3.2": {"prefill 1x4096": 363, "prefill 4x2048": 386, "prefill 8x512": 90, "prefill 1x16384": 4682},
                 "3.6": {"prefill 1x4096": 330, "prefill 4x2048": 348, "prefill 8x512": 76, "prefill 1x16384": 4694}}
# Upstream vLLM PR's speedups of fused attention + group quant over attention + per_token_group_quant_fp8
# (our h/g), by shape; decode shapes: GROUP_TARGET_DECODE.
GROUP_TARGETS = {"prefill 1x128": "1.73x", "prefill 1x512": "1.35x", "prefill 1x1024": "1.08x"}
GROUP_TARGET_DECODE = "1.02-1.06x"
VARIANTS = ("a", "aw", "an", "a0", "b", "c", "d", "ap", "g", "gn", "h", "x")
ROUNDS = 7
SPREAD_FLAG = 0.05


def shapes(quick=False):
    s = [
        # name, q_lens, kv_lens, Hq, Hkv, D
        ("prefill 1x128", [128], [128], 32, 8, 128),
        ("prefill 1x512", [512], [512], 32, 8, 128),
        ("prefill 1x1024", [1024], [1024], 32, 8, 128),
        ("prefill 1x4096", [4096], [4096], 32, 8, 128),
        ("prefill 4x2048", [2048] * 4, [2048] * 4, 32, 8, 128),
        ("prefill 8x512", [512] * 8, [512] * 8, 32, 8, 128),
        ("prefill 1x8192", [8192], [8192], 32, 8, 128),
        ("prefill 1x16384", [16384], [16384], 32, 8, 128),
        ("mixed 4x512 + 60 dec ctx2048", [512] * 4 + [1] * 60, [512] * 4 + [2048] * 60, 32, 8, 128),
        ("chunked 2x512 ctx4096 + 30 dec", [512] * 2 + [1] * 30, [4608] * 2 + [2048] * 30, 32, 8, 128),
        ("decode b64 ctx2048", [1] * 64, [2048] * 64, 32, 8, 128),
        ("decode b256 ctx1024", [1] * 256, [1024] * 256, 32, 8, 128),
        ("decode b16 ctx8192", [1] * 16, [8192] * 16, 32, 8, 128),
        ("prefill 8x512 d64", [512] * 8, [512] * 8, 32, 8, 64),
        # no GQA (32 KV heads): one query head per tile, the dense ceiling's tiling (what G=4 packing costs)
        ("prefill 4x2048 mha", [2048] * 4, [2048] * 4, 32, 32, 128),
        ("prefill 8x512 mha", [512] * 8, [512] * 8, 32, 32, 128),
        ("decode b64 ctx2048 d64", [1] * 64, [2048] * 64, 32, 8, 64),
        ("prefill 4x2048 d256", [2048] * 4, [2048] * 4, 16, 8, 256),
        ("decode b64 ctx2048 d256", [1] * 64, [2048] * 64, 16, 8, 256),
    ]
    if quick:
        s = [x for x in s if x[0] in ("prefill 1x4096", "prefill 8x512", "decode b64 ctx2048")]
    return s


# Sweep: prefill configs (BLOCK_M, BLOCK_N, num_warps, num_stages) and decode configs (BLOCK_N, warps, stages)
SWEEP_PREFILL = {
    128: [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
          (128, 32, 4, 4), (64, 128, 4, 2), (256, 64, 8, 2), (64, 32, 4, 4)],
    64: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 4),
         (64, 128, 4, 2)],
    256: [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 1)],
}
SWEEP_PREFILL_SHAPES = ("prefill 1x4096", "prefill 4x2048", "prefill 8x512", "prefill 8x512 d64",
                        "prefill 4x2048 d256", "chunked 2x512 ctx4096 + 30 dec")
SWEEP_DECODE = [(64, 2, 4), (32, 2, 4), (64, 4, 3), (128, 4, 2), (32, 4, 3), (16, 2, 4), (64, 2, 3), (128, 8, 3)]
SWEEP_DECODE_SHAPES = ("decode b64 ctx2048", "decode b256 ctx1024", "decode b16 ctx8192", "decode b64 ctx2048 d256",
                       "decode b64 ctx2048 d64")


# ----------------------------------------------------------------------------------------------------
# child side (imports torch / triton / the kernel)
# ----------------------------------------------------------------------------------------------------

def _imports(baseline=None):
    global torch, triton, tpa, tpa0, FP8, vllm_group_quant, VLLM_MISSING
    import torch
    import triton
    import vllm_overlay.triton_paged_attention as tpa
    tpa0 = None
    if baseline:
        import importlib.util
        spec = importlib.util.spec_from_file_location("triton_paged_attention_baseline", baseline)
        tpa0 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tpa0)
    FP8 = torch.float8_e4m3fn
    try:
        from vllm.model_executor.layers.quantization.utils.fp8_utils import \
            per_token_group_quant_fp8 as vllm_group_quant
        VLLM_MISSING = None
    except Exception as e:  # noqa: BLE001
        vllm_group_quant, VLLM_MISSING = None, f"{type(e).__name__}: {str(e)[:150]}"


def group_quant_ref(x, group):
    """Column-major group quant of x [T, K] to compare g with: vLLM's kernel, else its formula with
    Triton's division (the oracle of tests/gpu/test_group_quant_gpu.py)."""
    if vllm_group_quant is not None:
        return vllm_group_quant(x, group, dtype=FP8, column_major_scales=True)
    sys.path.insert(0, str(_ROOT / "tests/gpu"))
    from test_group_quant_gpu import group_quant_triton_div
    return group_quant_triton_div(x, group, column_major=True)


def build(q_lens, kv_lens, Hq, Hkv, D, bs, dtype=None, seed=0):
    """Paged batch + the new tokens' contiguous K/V (key/value [T, Hkv, D] = what the cache holds)."""
    dtype = dtype or torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = len(q_lens)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    sl = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    maxb = max((k + bs - 1) // bs for k in kv_lens)
    nb = B * maxb
    bt = torch.randperm(nb, device="cuda", generator=g).reshape(B, maxb).to(torch.int32)
    T = sum(q_lens)
    q = torch.randn(T, Hq, D, device="cuda", dtype=dtype, generator=g)
    kc = torch.randn(nb, bs, Hkv, D, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn(nb, bs, Hkv, D, device="cuda", dtype=dtype, generator=g)
    pos = torch.cat([torch.arange(kl - ql, kl) for ql, kl in zip(q_lens, kv_lens)]).cuda()
    seq = torch.cat([torch.full((ql,), s) for s, ql in enumerate(q_lens)]).cuda()
    blk = bt.long()[seq, pos // bs]
    key, value = kc[blk, pos % bs].contiguous(), vc[blk, pos % bs].contiguous()
    return dict(q=q, kc=kc, vc=vc, qsl=qsl, sl=sl, bt=bt, key=key, value=value,
                out8=torch.empty(q.shape, device="cuda", dtype=FP8), out_bf=torch.empty_like(q),
                out8_unf=torch.empty(q.shape, device="cuda", dtype=FP8),
                gs=torch.empty(Hq, T, device="cuda", dtype=torch.float32).t())  # column-major [T, Hq]


def set_bytes(s):
    return sum(t.numel() * t.element_size() for t in s.values())


@contextlib.contextmanager
def fp8_stores(narrow_from):
    """CONFIG_OVERRIDE["narrow_fp8_store"]: 0 = narrow fp8 stores everywhere, 1 << 62 = wide everywhere
    (read at launch, so captured graphs keep it)."""
    tpa.CONFIG_OVERRIDE["narrow_fp8_store"] = narrow_from
    try:
        yield
    finally:
        tpa.CONFIG_OVERRIDE.pop("narrow_fp8_store", None)


NARROW, WIDE = 0, 1 << 62


@contextlib.contextmanager
def fp8_tiles(q_lens, kv_lens, G, D, group):
    """bf16-output calls inside run the prefill tiles of the matching FP8-output call (static or group,
    narrow or wide stores as CONFIG_OVERRIDE says), so the two sum in the same order."""
    d_pad, mq = max(16, tpa._next_pow2(D)), max(q_lens)
    wide = not tpa._narrow_fp8_store(d_pad, mq, group)
    tpa.CONFIG_OVERRIDE["prefill"] = tpa._prefill_config(d_pad, G, False, mq, max(kv_lens), wide_fp8_store=wide)
    try:
        yield
    finally:
        tpa.CONFIG_OVERRIDE.pop("prefill", None)


def make_fns(sets, q_lens, kv_lens, D, scale):
    """Variant name -> callable that runs on the next input set (rotation)."""
    meta = (max(q_lens), max(kv_lens), 1.0 / math.sqrt(D))
    state = {k: 0 for k in ("a", "a0", "b", "c", "ap", "bp", "g", "h")}  # aw, an (gn) share a's (g's)

    def nxt(k):
        i = state[k]
        state[k] = (i + 1) % len(sets)
        return sets[i]

    def fa():
        s = nxt("a")
        tpa.paged_attention(s["q"], s["kc"], s["vc"], s["out8"], s["qsl"], s["sl"], s["bt"], *meta,
                            output_scale=scale, key=s["key"], value=s["value"])

    def fb():
        s = nxt("b")
        tpa.paged_attention(s["q"], s["kc"], s["vc"], s["out_bf"], s["qsl"], s["sl"], s["bt"], *meta,
                            key=s["key"], value=s["value"])

    def fc():
        s = nxt("c")
        tpa.paged_attention(s["q"], s["kc"], s["vc"], s["out_bf"], s["qsl"], s["sl"], s["bt"], *meta,
                            key=s["key"], value=s["value"])
        T = s["q"].shape[0]
        tpa.static_fp8_quant(s["out8_unf"].view(T, -1), s["out_bf"].view(T, -1), scale)

    def fap():
        s = nxt("ap")
        tpa.paged_attention(s["q"], s["kc"], s["vc"], s["out8"], s["qsl"], s["sl"], s["bt"], *meta,
                            output_scale=scale)

    def fbp():
        s = nxt("bp")
        tpa.paged_attention(s["q"], s["kc"], s["vc"], s["out_bf"], s["qsl"], s["sl"], s["bt"], *meta)

    def fg():
        s = nxt("g")
        tpa.paged_attention(s["q"], s["kc"], s["vc"], s["out8"], s["qsl"], s["sl"], s["bt"], *meta,
                            key=s["key"], value=s["value"], output_group_scale=s["gs"])

    def fh():
        s = nxt("h")
        tpa.paged_attention(s["q"], s["kc"], s["vc"], s["out_bf"], s["qsl"], s["sl"], s["bt"], *meta,
                            key=s["key"], value=s["value"])
        T = s["q"].shape[0]
        vllm_group_quant(s["out_bf"].view(T, -1), D, dtype=FP8, column_major_scales=True)

    def forced(fn, narrow_from):  # fn with the fp8 store width forced (aw, an, gn)
        def run():
            with fp8_stores(narrow_from):
                fn()
        return run

    def fa0():
        s = nxt("a0")
        tpa0.paged_attention(s["q"], s["kc"], s["vc"], s["out8"], s["qsl"], s["sl"], s["bt"], *meta,
                             output_scale=scale, key=s["key"], value=s["value"])

    fns = {"a": fa, "aw": forced(fa, WIDE), "an": forced(fa, NARROW), "b": fb, "c": fc, "ap": fap, "bp": fbp,
           "g": fg, "gn": forced(fg, NARROW)}
    if tpa0 is not None:
        fns["a0"] = fa0
    if vllm_group_quant is not None:
        fns["h"] = fh
    return fns


def sdpa_fn(q_lens, kv_lens, Hq, D, scale, n_sets):
    """Dense SDPA bf16 (cuDNN; K/V already expanded to Hq heads outside the timing) + static quant."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B = len(q_lens)
    if len(set(q_lens)) != 1 or len(set(kv_lens)) != 1 or q_lens[0] != kv_lens[0] or q_lens[0] == 1:
        return None
    ql = q_lens[0]
    sets = []
    for _ in range(n_sets):
        sets.append([torch.randn(B, Hq, ql, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)])
    out8 = torch.empty(B * Hq * ql * D, device="cuda", dtype=FP8)
    st = [0]
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def run(be=be):
            q, k, v = sets[st[0]]
            st[0] = (st[0] + 1) % len(sets)
            with sdpa_kernel([be]):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            tpa.static_fp8_quant(out8, o.reshape(-1), scale)
        try:
            run()
            torch.cuda.synchronize()
            return run, str(be).split(".")[-1]
        except Exception:  # noqa: BLE001
            continue
    return None


def dense_fn(sets, q_lens, kv_lens, warm_only):
    """Variant x: (callable, config) with the fastest of dense_ceiling.CONFIGS (10 calls each), its bf16
    output checked against b's on the first set; None unless all sequences are prefills of one length, a
    multiple of every config's BLOCK_M."""
    import dense_ceiling
    L, B = q_lens[0], len(q_lens)
    if len(set(q_lens)) != 1 or list(kv_lens) != list(q_lens) or L % max(c[0] for c in dense_ceiling.CONFIGS):
        return None
    s0 = sets[0]
    meta = (s0["qsl"], s0["sl"], s0["bt"], L, L, 1.0 / math.sqrt(s0["q"].shape[-1]))
    ref = torch.empty_like(s0["out_bf"])
    tpa.paged_attention(s0["q"], s0["kc"], s0["vc"], ref, *meta, key=s0["key"], value=s0["value"])
    best = None
    for cfg in dense_ceiling.CONFIGS:
        out = torch.full_like(ref, float("nan"))
        try:
            dense_ceiling.dense_causal_attention(s0["q"], s0["key"], s0["value"], out, B, L, cfg)
        except triton.runtime.errors.OutOfResources:  # e.g. 128x128 tiles at D=256
            continue
        if not torch.allclose(out, ref, atol=1e-2, rtol=2e-2):  # drop this config, keep the row
            print(f"  x {cfg}: max |x - b| = {(out.float() - ref.float()).abs().max().item():.3g}: not timed")
            continue
        if warm_only:
            continue
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(10):
            s = sets[i % len(sets)]
            dense_ceiling.dense_causal_attention(s["q"], s["key"], s["value"], s["out_bf"], B, L, cfg)
        e1.record()
        torch.cuda.synchronize()
        if best is None or e0.elapsed_time(e1) < best[0]:
            best = (e0.elapsed_time(e1), cfg)
    if warm_only or best is None:
        return None
    st = [0]

    def run(cfg=best[1]):
        s = sets[st[0]]
        st[0] = (st[0] + 1) % len(sets)
        dense_ceiling.dense_causal_attention(s["q"], s["key"], s["value"], s["out_bf"], B, L, cfg)
    return run, best[1]


def gpu_warmup(seconds=2.0):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def time_interleaved(fns, rounds=ROUNDS, min_burst_ms=4.0, graphs=True):
    """fns: name -> callable. Returns name -> (median us, spread, sorted round times, mode).

    Each variant's burst of calls is captured once in a CUDA graph (graphs=True) and replayed, so the
    times are GPU times without the Python launch overhead (~50-100 us per paged_attention call on
    this box's CPU, which made short shapes look bimodal); a variant that cannot be captured is
    timed as an eager burst (mode "eager"). Names ending in "_eager" are always timed eagerly.
    """
    names = list(fns)
    est = {}
    for n in names:  # warm + estimate
        for _ in range(3):
            fns[n]()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(3):
            fns[n]()
        e1.record()
        torch.cuda.synchronize()
        est[n] = e0.elapsed_time(e1) / 3
    burst = {n: max(3, math.ceil(min_burst_ms / max(est[n], 1e-3))) for n in names}
    runners, mode = {}, {}
    for n in names:
        fn, b = fns[n], burst[n]
        runners[n] = (lambda fn=fn, b=b: [fn() for _ in range(b)])
        mode[n] = "eager"
        if graphs and not n.endswith("_eager"):
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(b):
                        fn()
                g.replay()
                torch.cuda.synchronize()
                runners[n] = g.replay
                mode[n] = "graph"
            except Exception as e:  # noqa: BLE001
                print(f"  graph capture failed for {n}: {repr(e)[:120]}; timing eagerly", flush=True)
                torch.cuda.synchronize()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            runners[n]()  # untimed: every burst starts from the same state
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            runners[n]()
            e1.record()
            torch.cuda.synchronize()
            times[n].append(e0.elapsed_time(e1) / burst[n] * 1e3)
    res = {}
    for n in names:
        ts = sorted(times[n])
        med = ts[len(ts) // 2]
        res[n] = (med, (ts[-1] - ts[0]) / med, ts, mode[n])
    return res


def flops_and_bytes(q_lens, kv_lens, Hq, Hkv, D, elt=2):
    fl = 0
    for ql, kl in zip(q_lens, kv_lens):
        ctx = kl - ql
        fl += 4 * (ql * ctx + ql * (ql + 1) // 2) * Hq * D
    return fl, sum(kv_lens) * Hkv * D * 2 * elt + sum(q_lens) * Hq * D * 2 * elt


def n_sets_for(one_set_bytes):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return int(min(8, max(2, math.ceil(2 * l2 / max(one_set_bytes, 1)))))


def run_shape(name, q_lens, kv_lens, Hq, Hkv, D, bs=16, warm_only=False, variants=VARIANTS):
    s0 = build(q_lens, kv_lens, Hq, Hkv, D, bs)
    n_sets = 1 if warm_only else n_sets_for(set_bytes(s0))
    sets = [s0] + [build(q_lens, kv_lens, Hq, Hkv, D, bs, seed=i + 1) for i in range(n_sets - 1)]
    scale = torch.tensor([0.02], device="cuda")
    fns = make_fns(sets, q_lens, kv_lens, D, scale)
    fns = {k: v for k, v in fns.items() if k in variants}
    if "a" in fns and not warm_only:
        fns["a_eager"] = fns["a"]
    # correctness: fused == quant(own bf16), dense == paged-only, before any timing
    for f in fns.values():
        for _ in range(n_sets):
            f()
    torch.cuda.synchronize()
    s = sets[0]
    T = s["q"].shape[0]
    meta = (s["qsl"], s["sl"], s["bt"], max(q_lens), max(kv_lens), 1.0 / math.sqrt(D))
    if not warm_only and {"a", "c", "ap"} & set(fns):
        o8, obf, o8u, o8p = (torch.empty_like(s["out8"]), torch.empty_like(s["out_bf"]),
                             torch.empty_like(s["out8"]), torch.empty_like(s["out8"]))
        tpa.paged_attention(s["q"], s["kc"], s["vc"], o8, *meta, output_scale=scale, key=s["key"], value=s["value"])
        tpa.paged_attention(s["q"], s["kc"], s["vc"], obf, *meta, key=s["key"], value=s["value"])
        tpa.static_fp8_quant(o8u, obf, scale)
        tpa.paged_attention(s["q"], s["kc"], s["vc"], o8p, *meta, output_scale=scale)
        torch.cuda.synchronize()
        assert torch.equal(o8.view(torch.uint8), o8u.view(torch.uint8)), f"{name}: fused != unfused"
        assert torch.equal(o8.view(torch.uint8), o8p.view(torch.uint8)), f"{name}: dense != paged-only"
        if "an" in fns:  # narrow: the bf16 kernel's config, so the bytes of quant(own bf16 out)
            with fp8_stores(NARROW):
                tpa.paged_attention(s["q"], s["kc"], s["vc"], o8p, *meta, output_scale=scale, key=s["key"],
                                    value=s["value"])
            torch.cuda.synchronize()
            if not torch.equal(o8p.view(torch.uint8), o8u.view(torch.uint8)):  # drop an, keep the row
                n_diff = int((o8p.view(torch.uint8) != o8u.view(torch.uint8)).sum())
                print(f"  {name}: an != quant(b) in {n_diff} bytes: an not timed", flush=True)
                del fns["an"]
        if "a0" in fns:
            tpa0.paged_attention(s["q"], s["kc"], s["vc"], o8p, *meta, output_scale=scale, key=s["key"],
                                 value=s["value"])
            torch.cuda.synchronize()
            assert torch.equal(o8.view(torch.uint8), o8p.view(torch.uint8)), f"{name}: a != baseline a0"
    for v, stores in (("g", None), ("gn", NARROW)):  # g (and gn) == group quant of own bf16 out, same tiles
        if warm_only or v not in fns:
            continue
        o8, obf = torch.empty_like(s["out8"]), torch.empty_like(s["out_bf"])
        gs = torch.empty(Hq, T, device="cuda", dtype=torch.float32).t()
        with fp8_stores(stores) if stores is not None else contextlib.nullcontext():
            tpa.paged_attention(s["q"], s["kc"], s["vc"], o8, *meta, key=s["key"], value=s["value"],
                                output_group_scale=gs)
            with fp8_tiles(q_lens, kv_lens, Hq // Hkv, D, group=True):
                tpa.paged_attention(s["q"], s["kc"], s["vc"], obf, *meta, key=s["key"], value=s["value"])
        rq, rs = group_quant_ref(obf.view(T, -1), D)
        torch.cuda.synchronize()
        n_s, n_q = int((gs != rs).sum()), int((o8.view(T, -1).view(torch.uint8) != rq.view(torch.uint8)).sum())
        if v == "gn" and n_s + n_q:  # drop gn, keep the row
            print(f"  {name}: gn != group quant of own bf16 in {n_s} scales, {n_q} bytes: gn not timed", flush=True)
            del fns["gn"]
            continue
        assert n_s == 0, f"{name}: g scales != group quant of own bf16 ({n_s} differ)"
        assert n_q == 0, f"{name}: g bytes != group quant of own bf16 ({n_q} differ)"
    x_cfg = None
    if "x" in variants and bs == 16:
        x = dense_fn(sets, q_lens, kv_lens, warm_only)
        if x:
            fns["x"], x_cfg = x
    sd = None
    if "d" in variants and bs == 16:
        sd = sdpa_fn(q_lens, kv_lens, Hq, D, scale, n_sets)
        if sd:
            fns["d"] = sd[0]
    if warm_only:
        return None
    res = time_interleaved(fns)
    fl, by = flops_and_bytes(q_lens, kv_lens, Hq, Hkv, D)
    del sets, fns
    torch.cuda.empty_cache()
    return dict(name=name, bs=bs, D=D, decode=max(q_lens) == 1, flops=fl, bytes=by, n_sets=n_sets,
                group_ref="Triton-division oracle" if vllm_group_quant is None else "vLLM per_token_group_quant_fp8",
                sdpa=sd[1] if sd else "-", x_cfg=x_cfg, t={k: v[0] for k, v in res.items()},
                mode={k: v[3] for k, v in res.items()},
                spread={k: v[1] for k, v in res.items()}, rounds={k: v[2] for k, v in res.items()})


def compile_report(kern):
    """n_regs, n_spills, shared bytes and a few instruction counts of a CompiledKernel."""
    if kern is None:
        return {}
    md = kern.metadata
    shared = md.shared if hasattr(md, "shared") else md.get("shared")
    out = dict(n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None), shared=shared)
    ttgir = kern.asm.get("ttgir", "")
    ptx = kern.asm.get("ptx", "")
    out.update(async_copy=ttgir.count("async_copy_global_to_local"), wgmma_ttgir=ttgir.count("warp_group_dot"),
               ptx_wgmma=ptx.count("wgmma.mma_async"), ptx_cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
               ptx_ld_global=ptx.count("ld.global"), ptx_local=ptx.count("ld.local") + ptx.count("st.local"),
               ptx_cvt_e4m3=ptx.count("e4m3"))
    return out


def sweep_jobs(quick=False):
    jobs = []
    by_name = {s[0]: s for s in shapes()}
    for nm in SWEEP_PREFILL_SHAPES:
        sh = by_name[nm]
        for cfg in SWEEP_PREFILL[sh[5]]:
            jobs.append(("prefill", sh, cfg))
    for nm in SWEEP_DECODE_SHAPES:
        for cfg in SWEEP_DECODE:
            jobs.append(("decode", by_name[nm], cfg))
    return jobs


def _set_override(kind, cfg):
    tpa.CONFIG_OVERRIDE.clear()
    if kind == "prefill":
        bm, bn, w, st = cfg
        tpa.CONFIG_OVERRIDE["prefill"] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    else:
        bn, w, st = cfg
        tpa.CONFIG_OVERRIDE["decode"] = dict(BLOCK_N=bn, num_warps=w, num_stages=st)


def run_sweep(warm_only=False, shard=(0, 1)):
    res = []
    jobs = sweep_jobs()
    cache = {}
    for i, (kind, sh, cfg) in enumerate(jobs):
        if warm_only and i % shard[1] != shard[0]:
            continue
        name, ql, kl, Hq, Hkv, D = sh
        if name not in cache:
            cache.clear()
            s0 = build(ql, kl, Hq, Hkv, D, 16)
            n = 1 if warm_only else n_sets_for(set_bytes(s0))
            cache[name] = [s0] + [build(ql, kl, Hq, Hkv, D, 16, seed=j + 1) for j in range(n - 1)]
        sets = cache[name]
        _set_override(kind, cfg)
        scale = torch.tensor([0.02], device="cuda")
        fns = make_fns(sets, ql, kl, D, scale)
        fns = {"a": fns["a"], "b": fns["b"]} if kind == "prefill" else {"a": fns["ap"], "b": fns["bp"]}
        try:
            for f in fns.values():
                f()
            torch.cuda.synchronize()
            if warm_only:
                continue
            fns["a"](); torch.cuda.synchronize(); rep_a = compile_report(tpa.LAST_LAUNCH.get(kind))
            fns["b"](); torch.cuda.synchronize(); rep_b = compile_report(tpa.LAST_LAUNCH.get(kind))
            t = time_interleaved(fns, rounds=5, min_burst_ms=3.0)
            r = dict(kind=kind, shape=name, cfg=cfg, a=t["a"][0], b=t["b"][0], sa=t["a"][1], sb=t["b"][1],
                     regs_a=rep_a.get("n_regs"), regs_b=rep_b.get("n_regs"), spills_a=rep_a.get("n_spills"),
                     spills_b=rep_b.get("n_spills"))
        except Exception as e:  # noqa: BLE001  (out of resources etc.)
            r = dict(kind=kind, shape=name, cfg=cfg, error=repr(e)[:160])
        tpa.CONFIG_OVERRIDE.clear()
        if not warm_only:
            res.append(r)
            print("sweep", json.dumps(r), flush=True)
    tpa.CONFIG_OVERRIDE.clear()
    return res


def report_variants():
    """Compile reports of the default configs: fused vs bf16, dense vs paged, prefill and decode."""
    rep = {}
    for nm, ql, kl, Hq, Hkv, D in shapes():
        if nm not in ("prefill 1x4096", "prefill 8x512", "decode b64 ctx2048", "prefill 4x2048 d256"):
            continue
        s = build(ql, kl, Hq, Hkv, D, 16)
        scale = torch.tensor([0.02], device="cuda")
        fns = make_fns([s], ql, kl, D, scale)
        kind = "decode" if max(ql) == 1 else "prefill"
        for v in ("a", "b", "ap", "bp"):
            fns[v]()
            torch.cuda.synchronize()
            rep[f"{nm} {v}"] = compile_report(tpa.LAST_LAUNCH.get(kind))
    return rep


NCU_METRICS = ("gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,"
               "smsp__inst_executed.sum,smsp__sass_inst_executed_op_global_st.sum,"
               "lts__t_sectors_srcunit_tex_op_write.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,"
               "smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__warp_issue_stalled_barrier_per_warp_active.pct,"
               "smsp__warp_issue_stalled_wait_per_warp_active.pct,launch__shared_mem_per_block_dynamic,"
               "sm__cycles_active.avg,sm__cycles_active.max,gpc__cycles_elapsed.max,launch__grid_size,"
               "sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct,"
               "smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct,"
               "smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct")
NCU_SHAPES = ("prefill 1x4096", "prefill 4x2048")


def ncu_probe():
    """Under ncu, per NCU_SHAPES (dense new-token K/V): fused (a), bf16 (b), then the dense-Triton
    ceiling (x, 128x128/8/2), one launch each after a compile call."""
    import dense_ceiling
    for nm, ql, kl, Hq, Hkv, D in (sh for sh in shapes() if sh[0] in NCU_SHAPES):
        s = build(ql, kl, Hq, Hkv, D, 16)
        fns = make_fns([s], ql, kl, D, torch.tensor([0.02], device="cuda"))
        fns["x"] = lambda: dense_ceiling.dense_causal_attention(s["q"], s["key"], s["value"], s["out_bf"], len(ql),
                                                                ql[0], dense_ceiling.CONFIGS[0])
        for profiled in (False, True):  # compile, then the profiled launches
            if profiled:
                torch.cuda.cudart().cudaProfilerStart()
            for v in ("a", "b", "x"):
                fns[v]()
            torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def child(args):
    _imports(args.baseline)
    torch.manual_seed(0)
    if args.ncu_probe:
        ncu_probe()
        return
    fam = "3.2" if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3) else "3.6"
    variants = args.variants.split(",")
    if "h" in variants and vllm_group_quant is None:
        print(f"[{triton.__version__}] h missing: vLLM's per_token_group_quant_fp8 not importable ({VLLM_MISSING})",
              flush=True)
    if args.warm_only:
        i, n = (int(x) for x in args.shard.split("/"))
        jobs = [s for s in shapes(args.quick) if _want(s[0], args.shapes)]
        for j, sh in enumerate(jobs):
            if j % n == i:
                run_shape(*sh, warm_only=True, variants=variants)
        if args.sweep:
            run_sweep(warm_only=True, shard=(i, n))
        return
    out = dict(triton=triton.__version__, torch=torch.__version__, family=fam, device=torch.cuda.get_device_name(),
               date=str(datetime.date.today()), rows=[], sweep=[], report={}, variants=variants,
               vllm_missing=VLLM_MISSING)
    gpu_warmup(2.0)
    # standalone quant, 4096x4096 bf16
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    o = torch.empty(x.shape, device="cuda", dtype=FP8)
    sc = torch.tensor([0.02], device="cuda")
    out["quant_us"] = time_interleaved({"q": lambda: tpa.static_fp8_quant(o, x, sc)})["q"][0]
    del x, o
    if args.report:
        out["report"] = report_variants()
        for k, v in out["report"].items():
            print("report", k, json.dumps(v), flush=True)
    if args.sweep:
        out["sweep"] = run_sweep()
        Path(args.json).write_text(json.dumps(out, indent=1))
    for sh in shapes(args.quick):
        if not _want(sh[0], args.shapes):
            continue
        gpu_warmup(0.2)
        try:
            r = run_shape(*sh, variants=variants)
        except (AssertionError, RuntimeError) as e:  # a failed check loses its row, not the rest
            out.setdefault("errors", []).append(f"{sh[0]}: {type(e).__name__}: {str(e)[:300]}")
            print(f"[{triton.__version__}] {sh[0]}: FAILED {out['errors'][-1]}", flush=True)
            torch.cuda.empty_cache()
            continue
        out["rows"].append(r)
        t, sp = r["t"], r["spread"]
        print(f"[{triton.__version__}] {r['name']:34s} " + " ".join(f"{k}={t[k]:.1f}({sp[k]*100:.1f}%)" for k in t)
              + " " + " ".join(f"{x}/{y}={t[x] / t[y]:.3f}" for x, y in (("c", "a"), ("c", "aw"), ("c", "an"), ("a", "b"), ("a0", "a"), ("h", "g"), ("g", "b"), ("gn", "g"), ("a", "x"), ("b", "x"))
                               if x in t and y in t), flush=True)
        Path(args.json).write_text(json.dumps(out, indent=1))  # after every row: a cut-off run keeps its rows
    Path(args.json).write_text(json.dumps(out, indent=1))


def _want(name, filt):
    return not filt or any(f in name for f in filt.split(","))


# ----------------------------------------------------------------------------------------------------
# parent side: bundle, tests, warm-up processes, timing children, merged table
# ----------------------------------------------------------------------------------------------------

def _env_for(fam, tdir, vllm_site=None):
    """Child environment: triton 3.2's bundle first for "3.2"; vLLM's bundle site and the repository
    (its vllm/_C.py stand-in imports gpu_harness) next when given, as gpu_harness/box_run.sh sets them."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    front = ([str(tdir)] if fam == "3.2" else []) + ([str(vllm_site), str(_ROOT)] if vllm_site else [])
    if front:
        env["PYTHONPATH"] = os.pathsep.join(front + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _us(t, k, suffix=""):
    return f"{t[k]:.1f}{suffix}" if k in t else "-"


def _ratio(t, x, y):
    return f"{t[x] / t[y]:.3f}" if x in t and y in t else "-"


def _spreads(sp, keys):
    have = [k for k in keys if k in sp]
    return ("/".join(f"{sp[k] * 100:.1f}" for k in have) + "%") if have else "-", max([sp[k] for k in have] or [0])


def fmt_tables(results):
    md = []
    for res in results:
        fam = res["family"]
        anchors, ceil = VLLM_ANCHORS[fam], DENSE_CEILING[fam]
        md.append(f"### triton {res['triton']} ({res['device']}, torch {res['torch']}, {res['date']})\n")
        md.append(f"Standalone static quant 4096x4096 bf16: {res['quant_us']:.1f} us.\n")
        md += [f"**Row failed its check (not timed):** {e}\n" for e in res.get("errors", [])]
        rows = [r for r in res["rows"] if {"a", "c", "d", "ap"} & set(r["t"])]  # static-scale variants timed
        md.append("| shape | D | a fused | aw wide stores | an narrow stores | a0 baseline | b bf16 | c b+quant "
                  "| d cuDNN+quant | x dense Triton (config) | ap fused paged-only | a eager | perf a | c/a | c/aw | c/an "
                  "| a0/a | a/b | d/a | a/x | a / H100 dense ceiling | vLLM 0.8.5 (vs b) | spread a/b/c/x | flag |")
        md.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        if not rows:
            md[-2:] = []
        for r in rows:
            t, sp = r["t"], r["spread"]
            perf = "-"
            if "a" in t:
                perf = (f"{r['bytes'] / t['a'] * 1e-3:.0f} GB/s" if r["decode"]
                        else f"{r['flops'] / t['a'] * 1e-6:.0f} TF/s")
            v = anchors.get(r["name"])
            c = ceil.get(r["name"])
            dmode = "" if r.get("mode", {}).get("d", "graph") == "graph" else " (eager)"
            spr, _ = _spreads(sp, ("a", "b", "c", "x"))
            xcfg = f" ({'x'.join(map(str, r['x_cfg'][:2]))}/{r['x_cfg'][2]}/{r['x_cfg'][3]})" if r.get("x_cfg") else ""
            _, msp = _spreads(sp, ("a", "aw", "an", "a0", "b", "c", "d", "ap", "x"))
            md.append(
                f"| {r['name']} | {r['D']} | {_us(t, 'a')} | {_us(t, 'aw')} | {_us(t, 'an')} | {_us(t, 'a0')} | "
                f"{_us(t, 'b')} | {_us(t, 'c')} | {_us(t, 'd', dmode)} | {_us(t, 'x', xcfg)} | {_us(t, 'ap')} | "
                f"{_us(t, 'a_eager')} | "
                f"{perf} | {_ratio(t, 'c', 'a')} | {_ratio(t, 'c', 'aw')} | {_ratio(t, 'c', 'an')} | "
                f"{_ratio(t, 'a0', 'a')} | {_ratio(t, 'a', 'b')} | "
                f"{_ratio(t, 'd', 'a')} | {_ratio(t, 'a', 'x')} | "
                f"{f'{t[chr(97)] / c:.2f} ({c})' if c and 'a' in t else '-'} | "
                f"{f'{v} ({v / t[chr(98)]:.2f}x)' if v and 'b' in t else '-'} | {spr} | "
                f"{'SPREAD>5%' if msp > SPREAD_FLAG else ''} |")
        md.append("")
        md.append(fmt_group_table(res))
    return "\n".join(md)


def fmt_group_table(res):
    """g (fused group FP8) vs b (bf16 out) vs h (b + vLLM's per_token_group_quant_fp8), with the
    upstream vLLM PR's h/g where it gives one."""
    rows = [r for r in res["rows"] if {"g", "h"} & set(r["t"])]
    if not rows:
        return ""
    md = [f"### group FP8 (per token, group = D, column-major scales), triton {res['triton']}\n"]
    if res.get("vllm_missing") and "h" in res.get("variants", ()):
        md.append(f"h missing: vLLM's per_token_group_quant_fp8 did not import in this child "
                  f"({res['vllm_missing']}); only g and b are timed.\n")
    md.append(f"g and gn checked byte-equal to {rows[0].get('group_ref', '?')} of the kernel's own bf16 output "
              "at the same tiles.\n")
    md.append("| shape | D | g fused | gn narrow stores | b bf16 | h b+vLLM group quant | h/g | g/b | gn/g "
              "| upstream PR target h/g | spread g/gn/b/h | flag |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, sp = r["t"], r["spread"]
        target = GROUP_TARGETS.get(r["name"], GROUP_TARGET_DECODE if r["decode"] else "-")
        spr, msp = _spreads(sp, ("g", "gn", "b", "h"))
        md.append(f"| {r['name']} | {r['D']} | {_us(t, 'g')} | {_us(t, 'gn')} | {_us(t, 'b')} | "
                  f"{_us(t, 'h') if 'h' in t else 'missing'} | {_ratio(t, 'h', 'g')} | {_ratio(t, 'g', 'b')} | "
                  f"{_ratio(t, 'gn', 'g')} | "
                  f"{target} | {spr} | {'SPREAD>5%' if msp > SPREAD_FLAG else ''} |")
    md.append("")
    return "\n".join(md)


def fmt_sweep(results):
    md = []
    for res in results:
        if not res["sweep"]:
            continue
        md.append(f"### sweep, triton {res['triton']} (a fused / b bf16, us; regs a/b; spills a/b)\n")
        md.append("| shape | config | a | b | a/b | regs | spills |\n|---|---|---|---|---|---|---|")
        for r in res["sweep"]:
            if "error" in r:
                md.append(f"| {r['shape']} | {r['cfg']} | error {r['error'][:60]} | | | | |")
            else:
                md.append(f"| {r['shape']} | {r['cfg']} | {r['a']:.1f} | {r['b']:.1f} | {r['a'] / r['b']:.3f} | "
                          f"{r['regs_a']}/{r['regs_b']} | {r['spills_a']}/{r['spills_b']} |")
        md.append("")
    return "\n".join(md)


def vllm_sites(bundle, fams, tdir):
    """fam -> vLLM bundle site for the children, or None: unpacked once (gpu_harness/vllm_bundle.py, as
    box_run.sh does), then kept only for the tritons under which the kernel module and vLLM's group
    quant import with it (importing the kernel package installs the overlay into an importable vLLM)."""
    sites = dict.fromkeys(fams)
    tar = Path(bundle or "") / "vllm-0.8.5.post1.tar.xz"
    if not bundle or not tar.exists():
        print(f"note: no vLLM bundle ({tar}): h (b + vLLM's group quant) and the vLLM test are skipped", flush=True)
        return sites
    r = subprocess.run([sys.executable, str(_ROOT / "gpu_harness/vllm_bundle.py"), "unpack", "--bundle", bundle],
                       cwd=_ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"note: vLLM bundle unpack failed (rc {r.returncode}): {r.stderr.strip()[-300:]}", flush=True)
        return sites
    site = r.stdout.strip().splitlines()[-1]
    probe = ("import vllm_overlay.triton_paged_attention; "
             "from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8")
    procs = {fam: subprocess.Popen([sys.executable, "-c", probe], cwd=_ROOT, env=_env_for(fam, tdir, site),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for fam in fams}
    for fam, p in procs.items():
        log = p.communicate()[0]
        if p.returncode == 0:
            sites[fam] = site
            print(f"vLLM bundle site {site} on PYTHONPATH for triton {fam}", flush=True)
        else:
            print(f"note: with the vLLM site, triton {fam} fails to import vLLM / the kernel (rc {p.returncode}); "
                  f"left off there:\n{log.strip()[-600:]}", flush=True)
    return sites


def parent(args):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fams = args.tritons.split(",")
    tdir = Path("/tmp/triton32")
    if "3.2" in fams:
        subprocess.run([sys.executable, str(_ROOT / "gpu_harness/triton_bundle.py"), "unpack", args.bundle,
                        "--dest", str(tdir)], check=True)
    sites = vllm_sites(args.vllm_bundle, fams, tdir)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = (["--quick"] if args.quick else []) + (["--sweep"] if args.sweep else []) + \
        (["--baseline", str(Path(args.baseline).resolve())] if args.baseline else []) + \
        (["--shapes", args.shapes] if args.shapes else []) + ["--variants", args.variants]
    t0 = time.time()
    procs = []
    if args.tests:
        for fam in fams:
            for i in range(args.test_shards):
                log = open(out_dir / f"tests_{fam}_{i}.log", "w")
                env = dict(_env_for(fam, tdir, sites[fam]), GPU_TEST_SHARD=f"{i}/{args.test_shards}")
                procs.append((f"tests {fam} shard {i}", subprocess.Popen(
                    [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"], cwd=_ROOT,
                    env=env, stdout=log, stderr=subprocess.STDOUT), log))
    n = args.warm_procs
    for fam in fams:
        for i in range(n):
            log = open(out_dir / f"warm_{fam}_{i}.log", "w")
            procs.append((f"warm {fam} {i}", subprocess.Popen(
                me + ["--child", "--warm-only", "--shard", f"{i}/{n}"] + common, cwd=_ROOT,
                env=_env_for(fam, tdir, sites[fam]),
                stdout=log, stderr=subprocess.STDOUT), log))
    for nm, p, log in procs:
        try:
            rc = p.wait(timeout=max(1.0, t0 + args.phase1_timeout - time.time()) if args.phase1_timeout else None)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = f"killed at the {args.phase1_timeout:.0f} s phase-1 limit"
            p.wait()
        log.close()
        print(f"{nm}: rc={rc} ({time.time() - t0:.0f} s)", flush=True)
    for fam in fams if args.tests else ():
        for i in range(args.test_shards):
            tail = (out_dir / f"tests_{fam}_{i}.log").read_text().strip().splitlines()[-2:]
            print(f"tests/gpu triton {fam} shard {i}/{args.test_shards}:", " | ".join(tail), flush=True)
    with open(out_dir / "tests.log", "w") as w:  # few files come back: fold the test logs into one
        for f in sorted(out_dir.glob("tests_*.log")):
            w.write(f"== {f.name}\n" + f.read_text()[-20000:])
            f.unlink()
    for f in out_dir.glob("warm_*.log"):  # keep the files that come back few: fold warm logs into one
        with open(out_dir / "warm.log", "a") as w:
            w.write(f"== {f.name}\n" + f.read_text()[-3000:])
        f.unlink()
    results = []
    for fam in fams:
        js = out_dir / f"result_{fam}.json"
        rc = subprocess.run(me + ["--child", "--json", str(js)] + common + (["--report"] if args.report else []),
                            cwd=_ROOT, env=_env_for(fam, tdir, sites[fam])).returncode
        print(f"timing {fam}: rc={rc} ({time.time() - t0:.0f} s)", flush=True)
        if js.exists():
            results.append(json.loads(js.read_text()))
    if args.ncu:
        with open(out_dir / "ncu.txt", "w") as f:
            for fam in fams:
                f.write(f"== triton {fam}: per shape of {NCU_SHAPES}: fused fp8 (a), bf16 (b), dense ceiling (x)\n")
                f.flush()
                subprocess.run(["ncu", "--clock-control", "none", "--profile-from-start", "off",
                                "-k", "regex:_paged_attn_fwd|_dense_causal_fwd", "--metrics", NCU_METRICS, "--csv"]
                               + me + ["--child", "--ncu-probe"], cwd=_ROOT, env=_env_for(fam, tdir, sites[fam]),
                               stdout=f, stderr=subprocess.STDOUT, timeout=240)
        print((out_dir / "ncu.txt").read_text()[-6000:], flush=True)
    md = (f"# attention + static FP8 quant: {', '.join(r['triton'] for r in results)}\n\n"
          f"command: `python3 benchmarks/attention_quant.py $OUT {' '.join(sys.argv[2:])}`\n\n"
          + fmt_tables(results) + "\n" + fmt_sweep(results))
    (out_dir / "attention_quant.md").write_text(md)
    print(md)
    try:
        _plot(results, out_dir)
    except Exception as e:  # noqa: BLE001
        print("no plot:", repr(e)[:200])


def _plot(results, out_dir):
    """Per triton: each variant's time over the fused kernel's (a) (x: the dense-Triton ceiling timed in
    this run), with vLLM 0.8.5's stock Triton path and the dense-Triton ceiling of the same triton
    (VLLM_ANCHORS / DENSE_CEILING, H100) on H100 runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = (("a", "fused fp8 (a)"), ("aw", "fused fp8, wide stores everywhere"),
            ("an", "fused fp8, narrow stores everywhere"), ("b", "bf16 out"), ("c", "bf16 + quant"),
            ("d", "cuDNN + quant"), ("x", "dense Triton ceiling, this run (x)"), ("vllm", "vLLM 0.8.5 stock (bf16)"),
            ("ceil", "dense Triton ceiling (H100 anchor)"))
    fig, axes = plt.subplots(len(results), 1, figsize=(13, 4.5 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows = [r for r in res["rows"] if "a" in r["t"]]
        h100 = "H100" in res["device"]  # the anchors were measured on the H100: shown on H100 runs only
        extra = {"vllm": VLLM_ANCHORS.get(res["family"], {}) if h100 else {},
                 "ceil": DENSE_CEILING.get(res["family"], {}) if h100 else {}}
        shown = [(k, lab) for k, lab in bars if any(k in r["t"] or r["name"] in extra.get(k, {}) for r in rows)]
        w = 0.8 / max(len(shown), 1)
        top = 1.0
        for i, (k, lab) in enumerate(shown):
            ys = [(r["t"].get(k) or extra.get(k, {}).get(r["name"], float("nan"))) / r["t"]["a"] for r in rows]
            ax.bar([x + (i - (len(shown) - 1) / 2) * w for x in range(len(rows))], ys, w, label=lab,
                   color=f"C{[b[0] for b in bars].index(k)}")  # one colour per variant in every panel
            top = max([top] + [y for y in ys if y == y])
        ax.set_xticks(list(range(len(rows))))
        ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("time / fused time (a)")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(f"triton {res['triton']}, {res['device']}" + (" (vLLM stock and dense ceiling: H100 anchors)"
                     if h100 else " (H100 anchors not shown: another card)"))
        ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "attention_quant.png", dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", nargs="?", default=os.environ.get("OUT", "out"))
    ap.add_argument("--tritons", default="3.2,3.6", help="3.2 = the bundle, 3.6 = the box's own triton")
    ap.add_argument("--bundle", default=str(_ROOT / ".gpu_bundle/triton-3.2.0.tar.xz"))
    ap.add_argument("--tests", action="store_true", help="run tests/gpu under each triton during the warm-up")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--baseline", default="", help="a copy of triton_paged_attention.py to time as variant a0")
    ap.add_argument("--report", action="store_true", help="compile reports (registers, spills, asm counts)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape names")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of " + ",".join(VARIANTS) + " to time (default all)")
    ap.add_argument("--vllm-bundle", default=str(_ROOT / ".gpu_bundle/vllm085"),
                    help="vLLM bundle dir (gpu_harness/vllm_bundle.py) for h and the vLLM test; '' = none")
    ap.add_argument("--warm-procs", type=int, default=6)
    ap.add_argument("--phase1-timeout", type=float, default=0,
                    help="seconds for tests + warm-up; processes still running then are killed (0: no limit)")
    ap.add_argument("--test-shards", type=int, default=4)
    ap.add_argument("--ncu", action="store_true",
                    help="ncu metrics of fused, bf16 and dense-ceiling prefills (NCU_SHAPES) under each triton")
    ap.add_argument("--ncu-probe", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--warm-only", action="store_true")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--json", default="result.json")
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
