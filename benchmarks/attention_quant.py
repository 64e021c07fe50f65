"""Benchmark: paged attention with fused static FP8 output vs bf16 out + standalone quant vs SDPA.

Usage: python3 benchmarks/attention_quant.py [OUT_DIR] [--block-sizes 16,32] [--sweep] [--quick]
OUT_DIR defaults to $OUT (else ./out). Writes attention_quant.md (+ .png if matplotlib is there).

Variants per shape (median of triton.testing.do_bench):
  a: paged_attention(out=fp8, output_scale)          (fused)
  b: paged_attention(out=bf16)                       (same kernel, stock output)
  c: b + static_fp8_quant(bf16 -> fp8)               (unfused)
  d: torch SDPA bf16 (dense, cuDNN/flash, causal) + the same quant   (prefill with equal lengths, decode)
"""

import argparse
import datetime
import math
import os
import sys
from pathlib import Path

import torch
import triton

_ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn


sys.path.insert(0, str(_ROOT))  # run as a script on the GPU box
# Imports torch + triton only; with vLLM installed the package also
# installs the overlay, which changes nothing here.
import vllm_overlay.triton_paged_attention as tpa  # noqa: E402

# vLLM 0.8.5 stock V1 Triton path on the same H100 (DESIGN.md section 5), microseconds
VLLM_ANCHORS = {"prefill 1x4096": 849, "prefill 4x2048": 867, "prefill 8x512": 172,
                "decode b64 ctx2048": 310, "decode b256 ctx1024": 597, "mixed 4x512 + 60 dec ctx2048": 395}


def shapes(quick=False):
    s = [
        # name, q_lens, kv_lens, Hq, Hkv, D
        ("prefill 1x4096", [4096], [4096], 32, 8, 128),
        ("prefill 4x2048", [2048] * 4, [2048] * 4, 32, 8, 128),
        ("prefill 8x512", [512] * 8, [512] * 8, 32, 8, 128),
        ("prefill 1x16384", [16384], [16384], 32, 8, 128),
        ("mixed 4x512 + 60 dec ctx2048", [512] * 4 + [1] * 60, [512] * 4 + [2048] * 60, 32, 8, 128),
        ("chunked 2x512 ctx4096 + 30 dec", [512] * 2 + [1] * 30, [4608] * 2 + [2048] * 30, 32, 8, 128),
        ("decode b64 ctx2048", [1] * 64, [2048] * 64, 32, 8, 128),
        ("decode b256 ctx1024", [1] * 256, [1024] * 256, 32, 8, 128),
        ("decode b16 ctx8192", [1] * 16, [8192] * 16, 32, 8, 128),
        ("prefill 8x512 d64", [512] * 8, [512] * 8, 32, 8, 64),
        ("decode b64 ctx2048 d64", [1] * 64, [2048] * 64, 32, 8, 64),
        ("prefill 4x2048 d256", [2048] * 4, [2048] * 4, 16, 8, 256),
        ("decode b64 ctx2048 d256", [1] * 64, [2048] * 64, 16, 8, 256),
    ]
    if quick:
        s = [x for x in s if x[0] in ("prefill 1x4096", "prefill 8x512", "decode b64 ctx2048", "decode b16 ctx8192")]
    return s


def build(q_lens, kv_lens, Hq, Hkv, D, bs, dtype=torch.bfloat16):
    B = len(q_lens)
    T = sum(q_lens)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    sl = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    maxb = max((k + bs - 1) // bs for k in kv_lens)
    nb = B * maxb
    bt = torch.randperm(nb, device="cuda").reshape(B, maxb).to(torch.int32)
    q = torch.randn(T, Hq, D, device="cuda", dtype=dtype)
    kv = torch.randn(2, nb, bs, Hkv, D, device="cuda", dtype=dtype)
    return q, kv[0], kv[1], qsl, sl, bt


def flops_and_bytes(q_lens, kv_lens, Hq, Hkv, D, elt=2):
    fl = 0
    for ql, kl in zip(q_lens, kv_lens):
        ctx = kl - ql
        # sum over query tokens of visible keys
        vis = ql * ctx + ql * (ql + 1) // 2
        fl += 4 * vis * Hq * D
    kv_bytes = sum(kv_lens) * Hkv * D * 2 * elt
    qo_bytes = sum(q_lens) * Hq * D * (elt + elt)
    return fl, kv_bytes + qo_bytes


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def sdpa_fn(q_lens, kv_lens, Hq, D, quant_out, scale):
    """Dense SDPA bf16 (K/V already expanded to Hq heads outside the timing) + static quant."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B = len(q_lens)
    if len(set(q_lens)) != 1 or len(set(kv_lens)) != 1:
        return None
    ql, kl = q_lens[0], kv_lens[0]
    if ql not in (1, kl):
        return None
    q = torch.randn(B, Hq, ql, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hq, kl, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hq, kl, D, device="cuda", dtype=torch.bfloat16)
    causal = ql > 1
    out8 = torch.empty(B * Hq * ql * D, device="cuda", dtype=FP8)
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    for be in backends:
        try:
            with sdpa_kernel([be]):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def run(be=be):
                with sdpa_kernel([be]):
                    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                tpa.static_fp8_quant(out8, o.reshape(-1), scale)
            run()
            return run, str(be).split(".")[-1]
        except Exception:  # noqa: BLE001
            continue
    return None


def run_shape(name, q_lens, kv_lens, Hq, Hkv, D, bs):
    q, kc, vc, qsl, sl, bt = build(q_lens, kv_lens, Hq, Hkv, D, bs)
    T = q.shape[0]
    scale = torch.tensor([0.02], device="cuda")
    out_bf = torch.empty_like(q)
    out8 = torch.empty(q.shape, device="cuda", dtype=FP8)
    out8_unf = torch.empty(q.shape, device="cuda", dtype=FP8)
    meta = (qsl, sl, bt, max(q_lens), max(kv_lens), 1.0 / math.sqrt(D))
    fa = lambda: tpa.paged_attention(q, kc, vc, out8, *meta, output_scale=scale)  # noqa: E731
    fb = lambda: tpa.paged_attention(q, kc, vc, out_bf, *meta)  # noqa: E731

    def fc():
        tpa.paged_attention(q, kc, vc, out_bf, *meta)
        tpa.static_fp8_quant(out8_unf.view(T, -1), out_bf.view(T, -1), scale)
    fa(); fb(); fc()
    torch.cuda.synchronize()
    assert torch.equal(out8.view(torch.uint8), out8_unf.view(torch.uint8)), f"{name}: fused != unfused"
    ta, tb, tc = bench(fa), bench(fb), bench(fc)
    # repeat a to estimate noise
    ta2 = bench(fa)
    sd = sdpa_fn(q_lens, kv_lens, Hq, D, None, scale) if bs == 16 else None
    td, be = (bench(sd[0]), sd[1]) if sd else (float("nan"), "-")
    fl, by = flops_and_bytes(q_lens, kv_lens, Hq, Hkv, D)
    decode = max(q_lens) == 1
    del q, kc, vc, out_bf, out8, out8_unf
    torch.cuda.empty_cache()
    return dict(name=name, bs=bs, D=D, a=ta, a2=ta2, b=tb, c=tc, d=td, sdpa=be, decode=decode,
                tflops=fl / ta * 1e-6, gbs=by / ta * 1e-3, tflops_b=fl / tb * 1e-6, gbs_b=by / tb * 1e-3,
                vllm=VLLM_ANCHORS.get(name) if bs == 16 else None)


def quant_bench():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    o = torch.empty(x.shape, device="cuda", dtype=FP8)
    s = torch.tensor([0.02], device="cuda")
    res = {}
    for blk, nw in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)):
        tpa._QUANT_CFG.update(BLOCK=blk, num_warps=nw)
        res[(blk, nw)] = bench(lambda: tpa.static_fp8_quant(o, x, s))
    best = min(res, key=res.get)
    tpa._QUANT_CFG.update(BLOCK=best[0], num_warps=best[1])
    return res, best


def sweep(lines):
    """Try a few kernel configs on representative shapes; prints times (us), keeps nothing."""
    pre = [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
           dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
           dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)]
    dec = [dict(BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_N=128, num_warps=4, num_stages=2),
           dict(BLOCK_N=32, num_warps=2, num_stages=4), dict(BLOCK_N=64, num_warps=2, num_stages=4),
           dict(BLOCK_N=128, num_warps=8, num_stages=3)]
    pre_shapes = [("prefill 4x2048", [2048] * 4, [2048] * 4, 32, 8, 128, pre),
                  ("prefill 8x512 d64", [512] * 8, [512] * 8, 32, 8, 64, pre + [
                      dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)]),
                  ("prefill 4x2048 d256", [2048] * 4, [2048] * 4, 16, 8, 256, [
                      dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                      dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                      dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
                      dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                      dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)])]
    for name, ql, kl, Hq, Hkv, D, cfgs in pre_shapes:
        q, kc, vc, qsl, sl, bt = build(ql, kl, Hq, Hkv, D, 16)
        out8 = torch.empty(q.shape, device="cuda", dtype=FP8)
        s = torch.tensor([0.02], device="cuda")
        for cfg in cfgs:
            tpa.CONFIG_OVERRIDE.clear(); tpa.CONFIG_OVERRIDE["prefill"] = cfg
            try:
                t = bench(lambda: tpa.paged_attention(q, kc, vc, out8, qsl, sl, bt, max(ql), max(kl), 0.088,
                                                      output_scale=s))
            except Exception as e:  # noqa: BLE001
                t = float("nan"); print("config failed", cfg, repr(e)[:200])
            lines.append(f"sweep {name} {cfg}: {t:.1f} us")
            print(lines[-1], flush=True)
    dec = [dict(BLOCK_N=64, num_warps=2, num_stages=4), dict(BLOCK_N=32, num_warps=4, num_stages=2),
           dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=32, num_warps=2, num_stages=3)]
    for name, ql, kl, Hq, Hkv, D in [("decode b64 ctx2048 d256", [1] * 64, [2048] * 64, 16, 8, 256)]:
        q, kc, vc, qsl, sl, bt = build(ql, kl, Hq, Hkv, D, 16)
        out8 = torch.empty(q.shape, device="cuda", dtype=FP8)
        s = torch.tensor([0.02], device="cuda")
        for cfg in dec:
            for ns in (None,):
                tpa.CONFIG_OVERRIDE.clear(); tpa.CONFIG_OVERRIDE["decode"] = cfg
                if ns is not None:
                    tpa.CONFIG_OVERRIDE["num_splits"] = ns
                try:
                    t = bench(lambda: tpa.paged_attention(q, kc, vc, out8, qsl, sl, bt, 1, max(kl), 0.088,
                                                          output_scale=s))
                except Exception as e:  # noqa: BLE001
                    t = float("nan"); print("config failed", cfg, repr(e)[:200])
                lines.append(f"sweep {name} {cfg} splits={ns}: {t:.1f} us")
                print(lines[-1], flush=True)
    tpa.CONFIG_OVERRIDE.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", nargs="?", default=os.environ.get("OUT", "out"))
    ap.add_argument("--block-sizes", default="16,32")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-preround", action="store_true", help="skip the fp32 e4m3 pre-round (GPU cast rounds)")
    args = ap.parse_args()
    if args.no_preround:
        tpa.PRE_ROUND_FP8 = False
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    lines = []
    qres, qbest = quant_bench()
    for k, v in qres.items():
        lines.append(f"standalone quant 4096x4096 bf16 BLOCK={k[0]} warps={k[1]}: {v:.1f} us")
        print(lines[-1], flush=True)
    if args.sweep:
        sweep(lines)
    rows = []
    bss = [int(x) for x in args.block_sizes.split(",")]
    for bs in bss:
        for sh in shapes(args.quick):
            if bs != 16 and not (sh[0].startswith("prefill 1x4096") or sh[0].startswith("decode b64 ctx2048")
                                 or sh[0].startswith("mixed")):
                continue
            r = run_shape(*sh, bs)
            rows.append(r)
            print(f"{r['name']:34s} bs{bs} a={r['a']:.1f} (again {r['a2']:.1f}) b={r['b']:.1f} c={r['c']:.1f} "
                  f"d={r['d']:.1f} c/a={r['c']/r['a']:.3f} a/b={r['a']/r['b']:.3f} d/a={r['d']/r['a']:.3f}",
                  flush=True)
    hdr = (f"# attention + static FP8 quant, {dev}\n\n"
           f"date {datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}, "
           f"command: `python3 benchmarks/attention_quant.py $OUT`\n\n"
           "a = fused FP8 out, b = same kernel bf16 out, c = b + standalone static quant, "
           "d = torch SDPA bf16 dense (+ quant); times are medians in us; perf = TFLOP/s (prefill, causal "
           "FLOPs) or GB/s of K+V+Q+O (decode) for a (b in parentheses).\n\n"
           "| shape | D | blk | a fused | a again | b bf16 | c b+quant | d SDPA+quant | perf a (b) | c/a | a/b | d/a | "
           "vLLM 0.8.5 | b vs vLLM |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        perf = (f"{r['gbs']:.0f} ({r['gbs_b']:.0f}) GB/s" if r["decode"]
                else f"{r['tflops']:.0f} ({r['tflops_b']:.0f}) TF/s")
        v = r["vllm"]
        body += (f"| {r['name']} | {r['D']} | {r['bs']} | {r['a']:.1f} | {r['a2']:.1f} | {r['b']:.1f} | "
                 f"{r['c']:.1f} | {r['d']:.1f} {r['sdpa']} | {perf} | {r['c']/r['a']:.3f} | {r['a']/r['b']:.3f} | "
                 f"{r['d']/r['a']:.3f} | {v if v else '-'} | {(v / r['b']) if v else float('nan'):.2f}x |\n")
    md = hdr + body + "\n" + "\n".join(f"- {x}" for x in lines) + "\n"
    tag = "_nopre" if args.no_preround else ""
    (out_dir / f"attention_quant{tag}.md").write_text(md)
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        sel = [r for r in rows if r["bs"] == 16]
        fig, ax = plt.subplots(figsize=(12, 5))
        xs = range(len(sel))
        w = 0.2
        for i, (k, lab) in enumerate((("a", "fused fp8"), ("b", "bf16 out"), ("c", "bf16 + quant"),
                                      ("d", "SDPA + quant"))):
            ax.bar([x + (i - 1.5) * w for x in xs], [r[k] / r["a"] for r in sel], w, label=lab)
        ax.set_xticks(list(xs)); ax.set_xticklabels([r["name"] + f" d{r['D']}" for r in sel], rotation=35,
                                                     ha="right", fontsize=7)
        ax.set_ylabel("time / fused time"); ax.axhline(1.0, color="k", lw=0.5); ax.legend()
        ax.set_title(f"attention + FP8 quant, {dev}, torch {torch.__version__}, triton {triton.__version__}")
        fig.tight_layout(); fig.savefig(out_dir / f"attention_quant{tag}.png", dpi=110)
        print("plot written")
    except ImportError:
        print("matplotlib not available: no plot")


if __name__ == "__main__":
    main()
