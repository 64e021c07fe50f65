"""End-to-end benchmark: vllm.LLM with attention + FP8 quant fusion on vs off.

For a GPU box with vLLM 0.8.5.post1 (and this repository's vllm_overlay).
Measures, per model, batch size and prompt length:

  throughput  generated tokens / s of one ``llm.generate`` call on a batch of
              B random-token prompts of length P, ``max_tokens=O``,
              ``ignore_eos`` (median of --iters runs after one warm-up);
  latency     wall time of that call (ms, median) and of a prefill-only call
              (``max_tokens=1``, "TTFT" of the whole batch).

Variants (``--variants``, each engine in its own process):
  off   VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V1, enable_attn_fusion=False
  on    VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V1, enable_attn_fusion=True
  fa    vLLM's default backend (FlashAttention on H100), no fusion: context

Models: the embedded tiny FP8 checkpoint (built locally; it measures
overheads, not kernels) unless --no-embedded, plus every ``--model PATH``
(a local FP8 checkpoint directory; only checkpoints with static activation
scales can fuse: the "fused" column shows what the pass did).

Usage:
  python benchmarks/e2e.py --model /models/Llama-3.1-8B-Instruct-FP8 \
      --batch-sizes 1,16,64 --prompt-lens 128,1024 --output-len 128
Prints a markdown table (also written to --out-dir/e2e.md with the logs).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED_VLLM = "0.8.5.post1"
FUSED_RE = re.compile(r"Fused quant onto (\d+) attention nodes")
WORKER_RE = re.compile(r"\(VllmWorker rank=(\d+)")


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="benchmarks/e2e.py",
        description="vllm.LLM throughput/latency with attention+FP8 quant "
                    "fusion on vs off (needs vLLM 0.8.5.post1 and a CUDA GPU).")
    ap.add_argument("--model", action="append", default=[], metavar="PATH",
                    help="local FP8 checkpoint directory (repeatable)")
    ap.add_argument("--no-embedded", action="store_true",
                    help="skip the embedded tiny FP8 checkpoint")
    ap.add_argument("--embedded-layers", type=int, default=2,
                    help="layers of the embedded checkpoint (default 2)")
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32],
                    metavar="B,B", help="default 1,8,32")
    ap.add_argument("--prompt-lens", type=_ints, default=[128, 384],
                    metavar="P,P", help="default 128,384")
    ap.add_argument("--output-len", type=int, default=64,
                    help="generated tokens per prompt (default 64)")
    ap.add_argument("--points", default=None, metavar="B:P:O,...",
                    help="measure exactly these (batch, prompt len, output len) "
                         "points instead of the cross product, e.g. "
                         "16:2048:1,64:128:256")
    ap.add_argument("--llama3-8b-layers", type=int, default=0, metavar="N",
                    help="also benchmark an N-layer Llama-3-8B-shaped FP8 "
                         "checkpoint with random weights, built locally "
                         "(gpu_harness/big_checkpoint.py)")
    ap.add_argument("--iters", type=int, default=3,
                    help="timed runs per point, median reported (default 3)")
    ap.add_argument("--variants", default="off,on",
                    help="comma list of off,on,fa (default off,on)")
    ap.add_argument("--engine", choices=("v1", "v0"), default="v1",
                    help="vLLM engine (V0 cannot fuse; default v1)")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    ap.add_argument("--gpu-mem", type=float, default=0.85,
                    help="gpu_memory_utilization (default 0.85)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: max prompt len + output len")
    ap.add_argument("--profile", action="store_true",
                    help="per point, also trace one call (same batch, at most "
                         "16 new tokens) with vLLM's torch profiler and report "
                         "the share of its wall time spent in attention kernels")
    ap.add_argument("--out-dir", default=None,
                    help="write e2e.md, results.json and engine logs here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.point_list = None
    if args.points:
        try:
            args.point_list = [tuple(int(v) for v in p.split(":"))
                               for p in args.points.split(",") if p.strip()]
            assert all(len(p) == 3 for p in args.point_list)
        except (ValueError, AssertionError):
            ap.error("--points: B:P:O[,B:P:O...]")
    bad = set(args.variants.split(",")) - {"off", "on", "fa"}
    if bad:
        ap.error(f"unknown variants: {', '.join(sorted(bad))}")
    return args


def refusal():
    """None where the benchmark can run, else a message saying why not."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        found = version("vllm")
    except PackageNotFoundError:
        found = None
    if found != SUPPORTED_VLLM:
        return (f"benchmarks/e2e.py needs vLLM {SUPPORTED_VLLM} "
                f"(found: {found or 'not installed'}). Nothing was run.")
    if os.environ.get("VLLM_OVERLAY_CPU_HARNESS") == "1":
        return ("the CPU harness is active in this environment "
                "(VLLM_OVERLAY_CPU_HARNESS=1): no real GPU. Nothing was run.")
    import torch
    if not torch.cuda.is_available():
        return "benchmarks/e2e.py needs a CUDA GPU (none found). Nothing was run."
    if torch.cuda.device_count() < 1:
        return "benchmarks/e2e.py needs a CUDA GPU (none found). Nothing was run."
    return None


# ----------------------------------------------------------------- child

def _child(cfg, out_path):
    import random

    import vllm_overlay
    from vllm import LLM, SamplingParams
    vllm_overlay.install()
    compilation = {"pass_config": {"enable_attn_fusion": cfg["fusion"]}}
    if cfg["engine"] == "v0":
        compilation["level"] = 3
    llm = LLM(model=cfg["model"], tokenizer=cfg["model"], dtype="auto",
              enforce_eager=False, seed=0, tensor_parallel_size=cfg["tp"],
              gpu_memory_utilization=cfg["gpu_mem"],
              max_model_len=cfg["max_model_len"],
              # repeated identical prompts would otherwise hit V1's prefix
              # cache: the timed prefills would recompute one block each
              enable_prefix_caching=False,
              compilation_config=compilation)
    rng = random.Random(0)
    # prompt ids the tokenizer knows (a checkpoint may have a larger LM head)
    vocab = min(cfg["vocab_size"], len(llm.get_tokenizer()))
    rows = []
    points = cfg.get("points") or [(b, p, cfg["output_len"])
                                   for p in cfg["prompt_lens"]
                                   for b in cfg["batch_sizes"]]
    for batch, prompt_len, output_len in points:
        if True:
            if prompt_len + output_len > cfg["max_model_len"]:
                continue
            prompts = [{"prompt_token_ids": [rng.randrange(10, vocab)
                                             for _ in range(prompt_len)]}
                       for _ in range(batch)]
            gen = SamplingParams(temperature=0.0, max_tokens=output_len,
                                 ignore_eos=True, detokenize=False)
            pre = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                 detokenize=False)

            def timed(params):
                times = []
                for i in range(cfg["iters"] + 1):      # first run: warm-up
                    t0 = time.perf_counter()
                    outs = llm.generate(prompts, params, use_tqdm=False)
                    dt = time.perf_counter() - t0
                    if i:
                        times.append(dt)
                return statistics.median(times), outs, times

            t_gen, outs, gen_times = timed(gen)
            t_pre, _, pre_times = (t_gen, None, gen_times) if output_len == 1 \
                else timed(pre)
            n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"batch": batch, "prompt_len": prompt_len,
                         "output_len": output_len,
                         "tokens_per_s": n_tokens / t_gen,
                         "prompt_tokens_per_s": batch * prompt_len / t_pre,
                         "latency_ms": t_gen * 1e3, "prefill_ms": t_pre * 1e3,
                         "latency_ms_all": [round(t * 1e3, 2) for t in gen_times],
                         "prefill_ms_all": [round(t * 1e3, 2) for t in pre_times]})
            if cfg.get("profile"):
                rows[-1]["profile"] = _profile_point(
                    llm, prompts, min(output_len, PROFILE_TOKENS), timed)
            print(f"E2E-POINT {json.dumps(rows[-1])}", flush=True)
    Path(out_path).write_text(json.dumps(rows))


PROFILE_TOKENS = 16
ATTENTION_KERNELS = ("_paged_attn_fwd_kernel", "_split_reduce_kernel")
QUANT_KERNELS = ("_static_fp8_quant_kernel", "scaled_fp8_quant")


def kernel_shares(trace):
    """GPU kernel time (ms) of a torch profiler trace (chrome JSON): total,
    the overlay's attention kernels, FP8 quant kernels, and the top 5."""
    per_name = {}
    for ev in trace.get("traceEvents", ()):
        if ev.get("cat") == "kernel" and "dur" in ev:
            per_name[ev["name"]] = per_name.get(ev["name"], 0.0) + ev["dur"] / 1e3
    def total(keys):
        return sum(t for n, t in per_name.items() if any(k in n for k in keys))
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:5]
    return {"kernel_ms": sum(per_name.values()), "attention_ms": total(ATTENTION_KERNELS),
            "quant_ms": total(QUANT_KERNELS),
            "top": [(n[:80], round(t, 3)) for n, t in top]}


def _profile_point(llm, prompts, max_tokens, timed):
    """Share of the step time spent in attention: one call of the same
    batch with ``max_tokens`` new tokens under vLLM's profiler
    (VLLM_TORCH_PROFILER_DIR, traced in the engine-core process), its
    kernels summed from the trace, against the unprofiled wall time of the
    same call (median of --iters)."""
    import gzip

    from vllm import SamplingParams
    trace_dir = Path(os.environ["VLLM_TORCH_PROFILER_DIR"])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                            ignore_eos=True, detokenize=False)
    wall, _, walls = timed(params)
    before = set(trace_dir.glob("*.json*"))
    llm.start_profile()
    llm.generate(prompts, params, use_tqdm=False)
    llm.stop_profile()
    new = None
    for _ in range(600):                     # the trace is written on stop
        found = sorted(set(trace_dir.glob("*.json*")) - before)
        if found:
            new = found[-1]
            break
        time.sleep(0.1)
    if new is None:
        return {"error": "no trace written"}
    time.sleep(1.0)
    opener = gzip.open if new.suffix == ".gz" else open
    with opener(new, "rt") as f:
        shares = kernel_shares(json.load(f))
    new.unlink()
    shares.update(max_tokens=max_tokens, wall_ms=wall * 1e3,
                  wall_ms_all=[round(t * 1e3, 2) for t in walls],
                  attention_share_of_wall=shares["attention_ms"] / (wall * 1e3),
                  attention_share_of_kernels=shares["attention_ms"] / max(shares["kernel_ms"], 1e-9))
    return shares


# ---------------------------------------------------------------- parent

def _env(variant, engine, tmp, profile=False):
    env = dict(os.environ)
    for key in ("VLLM_ATTENTION_BACKEND", "TRITON_INTERPRET",
                "VLLM_OVERLAY_CPU_HARNESS"):
        env.pop(key, None)
    env.update({"VLLM_USE_V1": "1" if engine == "v1" else "0",
                "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                "VLLM_DISABLE_COMPILE_CACHE": "1",
                "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                "VLLM_CACHE_ROOT": str(Path(tmp) / "vllm_cache"),
                "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
                "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(
                    [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))})
    if profile:
        env["VLLM_TORCH_PROFILER_DIR"] = str(Path(tmp) / "traces")
    if variant in ("on", "off") and engine == "v1":
        env["VLLM_ATTENTION_BACKEND"] = "TRITON_ATTN_VLLM_V1"
    return env


def fused_per_rank(log):
    counts = {}
    for line in log.splitlines():
        m = FUSED_RE.search(line)
        if m:
            w = WORKER_RE.search(line)
            rank = int(w.group(1)) if w else 0
            counts[rank] = counts.get(rank, 0) + int(m.group(1))
    return counts


def run_variant(model, variant, args, max_model_len, vocab_size, log_dir):
    cfg = {"model": str(model), "fusion": variant == "on", "engine": args.engine,
           "tp": args.tp, "gpu_mem": args.gpu_mem, "max_model_len": max_model_len,
           "vocab_size": vocab_size, "batch_sizes": args.batch_sizes,
           "points": args.point_list,
           "prompt_lens": args.prompt_lens, "output_len": args.output_len,
           "iters": args.iters, "profile": args.profile}
    with tempfile.TemporaryDirectory(prefix="vllm_e2e_bench_") as tmp:
        out = Path(tmp) / "rows.json"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child",
             json.dumps(cfg), str(out)], env=_env(variant, args.engine, tmp, args.profile),
            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        if log_dir is not None:
            name = f"{Path(model).name}-{variant}.log"
            (log_dir / name).write_text(proc.stdout)
        if proc.returncode != 0 or not out.exists():
            print(f"[{Path(model).name} {variant}] engine failed "
                  f"(rc {proc.returncode}):\n{proc.stdout[-3000:]}", file=sys.stderr)
            return None, {}
        return json.loads(out.read_text()), fused_per_rank(proc.stdout)


def _spread(row, key):
    """median (min-max of the timed runs)"""
    runs = row.get(key + "_all")
    if not runs:
        return f"{row[key]:.1f}"
    return f"{row[key]:.1f} ({min(runs):.1f}-{max(runs):.1f})"


def markdown(results, variants):
    head = ["model", "B", "P", "O"]
    for v in variants:
        head += [f"{v} tok/s", f"{v} latency ms", f"{v} prefill ms"]
    if "on" in variants and "off" in variants:
        head += ["on/off tok/s", "on/off latency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, per_variant in results.items():
        keys = sorted({(r["batch"], r["prompt_len"], r["output_len"])
                       for rows in per_variant.values() if rows
                       for r in rows[0]}, key=lambda k: (k[1], k[0]))
        for key in keys:
            cells = [model, *map(str, key)]
            found = {}
            for v in variants:
                rows, _ = per_variant.get(v, (None, {}))
                row = next((r for r in rows or () if
                            (r["batch"], r["prompt_len"], r["output_len"]) == key), None)
                found[v] = row
                cells += ["-"] * 3 if row is None else [
                    f"{row['tokens_per_s']:.0f}", _spread(row, "latency_ms"),
                    _spread(row, "prefill_ms")]
            if "on" in variants and "off" in variants:
                on, off = found["on"], found["off"]
                cells += ["-"] * 2 if not (on and off) else [
                    f"{on['tokens_per_s'] / off['tokens_per_s']:.3f}",
                    f"{on['latency_ms'] / off['latency_ms']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for model, per_variant in results.items():
        if "on" in per_variant:
            notes.append(f"- {model}: fused attention nodes per rank (fusion on): "
                         f"{per_variant['on'][1] or 'none logged'}")
    for model, per_variant in results.items():
        for v in variants:
            for r in (per_variant.get(v) or (None,))[0] or ():
                pr = r.get("profile")
                if not pr or "error" in pr:
                    continue
                notes.append(
                    f"- {model} {v} {r['batch']}x{r['prompt_len']} (profiled call: "
                    f"{pr['max_tokens']} new tokens, wall {pr['wall_ms']:.1f} ms): attention "
                    f"kernels {pr['attention_ms']:.1f} ms = {pr['attention_share_of_wall']:.1%} "
                    f"of wall, {pr['attention_share_of_kernels']:.1%} of GPU kernel time "
                    f"({pr['kernel_ms']:.1f} ms); quant {pr['quant_ms']:.2f} ms; top: {pr['top'][:3]}")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, str(ROOT))
        _child(json.loads(args.child[0]), args.child[1])
        return 0
    why = refusal()
    if why:
        print(why, file=sys.stderr)
        return 2
    variants = args.variants.split(",")
    log_dir = Path(args.out_dir) if args.out_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    models = []
    with tempfile.TemporaryDirectory(prefix="vllm_e2e_ckpt_") as ckpt_tmp:
        if not args.no_embedded:
            sys.path.insert(0, str(ROOT))
            from cpu_harness.tiny_checkpoint import MAX_POSITIONS, build_checkpoint
            path = build_checkpoint(Path(ckpt_tmp) / "embedded-tiny-llama-fp8",
                                    num_layers=args.embedded_layers)
            models.append((path, MAX_POSITIONS))
        if args.llama3_8b_layers:
            sys.path.insert(0, str(ROOT))
            from gpu_harness.big_checkpoint import MAX_POSITIONS as big_max, build
            path = build(Path(ckpt_tmp) / f"llama3-8b-shapes-{args.llama3_8b_layers}l-fp8",
                         args.llama3_8b_layers)
            models.append((path, big_max))
        for m in args.model:
            path = Path(m)
            if not (path / "config.json").exists():
                print(f"--model {m}: no config.json (a local checkpoint "
                      "directory is needed)", file=sys.stderr)
                return 2
            models.append((path, None))
        if not models:
            print("nothing to benchmark (--no-embedded and no --model)",
                  file=sys.stderr)
            return 2
        results = {}
        for path, max_pos in models:
            cfg = json.loads((path / "config.json").read_text())
            cfg = cfg.get("text_config", cfg)
            need = args.max_model_len or (
                max(p + o for _, p, o in args.point_list) if args.point_list
                else max(args.prompt_lens) + args.output_len)
            max_len = min(need, max_pos) if max_pos else need
            per_variant = {}
            for v in variants:
                per_variant[v] = run_variant(path, v, args, max_len,
                                             cfg["vocab_size"], log_dir)
            results[path.name] = per_variant
    table = markdown(results, variants)
    print(table)
    if log_dir:
        (log_dir / "e2e.md").write_text(table)
        (log_dir / "results.json").write_text(json.dumps(
            {m: {v: {"rows": r[0], "fused_per_rank": r[1]} for v, r in pv.items()}
             for m, pv in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
