"""``python -m vllm_overlay report``: versions, mode, and what the fusion
does to the embedded tiny FP8 Llama, compiled on this machine.

On a machine without a GPU the model is compiled through vLLM's own
``VllmBackend`` with the CPU harness (``cpu_harness``) and then run on the
CPU (``_C`` stand-ins, the Triton kernel in its interpreter): fused and
unfused outputs are compared.
"""
import argparse
import importlib.metadata
import json
import pathlib
import time

import vllm_overlay

ATTENTION = ("vllm.unified_attention", "vllm.unified_attention_with_output")
FUSED = tuple(f"{op}.output_scale" for op in ATTENTION) + (
    "vllm.unified_attention_with_output.output_group_scale", )
QUANTS = ("_C.static_scaled_fp8_quant", "_C.dynamic_scaled_fp8_quant",
          "_C.dynamic_per_token_scaled_fp8_quant", "vllm.block_fp8_group_quant")
# checkpoint formats the demo compiles and runs
FORMATS = {"fp8": "FP8 with static activation scales",
           "fp8-block": "block FP8 [128, 128] (dynamic per-token-group quant, "
                        "group = head size 128)"}


def versions():
    out = {}
    for dist in ("vllm", "torch", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["vllm_overlay"] = vllm_overlay.__version__
    return out


def _fusion_passes(backend):
    return [p for p in backend.post_grad_pass_manager.passes
            if type(p).__name__ == "AttnFusionPass"]


def fusion_report(compiled):
    """Summary of one compiled model (a cpu_harness CompiledModel)."""
    passes = _fusion_passes(compiled.backend)
    fused = set().union(*(p.fused for p in passes)) if passes else set()
    skipped = {}
    for p in passes:
        skipped.update(p.skipped)
    count = lambda names, targets: sum(targets.count(n) for n in names)  # noqa
    before = [count(QUANTS, pg.targets_before) for pg in compiled.post_grad]
    after = [count(QUANTS, pg.targets_after) for pg in compiled.post_grad]
    pieces = compiled.pieces
    sticky = getattr(compiled.backend.split_gm, "_vllm_overlay_sticky", set())
    return {
        "mode": compiled.spec.mode,
        "attention_layers": compiled.dynamo_ops().get(
            "vllm.unified_attention_with_output", 0) + compiled.dynamo_ops().get(
            "vllm.unified_attention", 0),
        "fused": len(fused),
        "skipped": skipped,
        "quant_ops_before": sum(before),
        "quant_ops_after": sum(after),
        "pieces": len(pieces),
        "attention_pieces": sum(p.is_splitting_graph for p in pieces),
        "sticky_pieces": len(sticky),
        "fused_ops_in_graphs": sum(count(FUSED, pg.targets_after)
                                   for pg in compiled.post_grad),
    }


def _piece_line(compiled):
    """Pieces in order: graph(qN) = CUDA-graphed piece with N quant kernels,
    attn = eager attention piece, attn+q->fp8 = sticky piece after fusion."""
    sticky = getattr(compiled.backend.split_gm, "_vllm_overlay_sticky", set())
    post_grad = iter(compiled.post_grad)   # one per compiled piece, in order
    parts = []
    for p in compiled.pieces:
        if p.name in sticky:
            after = next(post_grad).targets_after
            parts.append("attn+q->fp8" if any(f in after for f in FUSED)
                         else "attn+q")
        elif p.is_splitting_graph:
            parts.append("attn")
        else:
            after = next(post_grad).targets_after
            parts.append(f"graph(q{sum(after.count(q) for q in QUANTS)})")
    return " ".join(parts)


def run(args):
    import cpu_harness
    from cpu_harness.compile import ModelSpec, compile_model, setup_process
    print("vllm_overlay report")
    for name, version in versions().items():
        print(f"  {name:13s} {version}")
    if cpu_harness.real_driver_present():
        # A GPU box: the engine itself, fusion off vs on (not run in CI).
        import subprocess
        import sys
        bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"
        print("  GPU box: vllm.LLM on the embedded model, fusion off vs on "
              f"({bench.name}); the CPU compile report needs a GPU-less machine")
        return subprocess.call([sys.executable, str(bench), "--batch-sizes",
                                "1,8", "--prompt-lens", "128", "--iters", "1",
                                "--out-dir", str(pathlib.Path(args.out) / "e2e")])
    work_dir = setup_process(args.out)
    mode = vllm_overlay.install()
    print(f"  mode          {mode} (patched = vLLM files carry the series; "
          "overlay = runtime patches)")
    from cpu_harness.load import load_embedded_model
    from cpu_harness.tiny_checkpoint import build_checkpoint
    ckpt = build_checkpoint(work_dir / "model", arch=args.arch,
                            num_layers=args.layers)
    loaded = load_embedded_model(ckpt, ModelSpec(arch=args.arch,
                                                 num_layers=args.layers),
                                 work_dir=work_dir)
    print(f"  checkpoint    {ckpt}: vLLM's loader filled "
          f"{len(loaded.loaded)} parameters of {type(loaded.model).__name__} "
          f"({len(loaded.standin.calls)} FP8 requantizations by the CPU "
          "stand-in for vLLM's CUDA quant kernel)")
    rows = []
    on = (("enable_attn_fusion", True), )
    for fmt in FORMATS:
        for spec_mode in ("piecewise", "full"):
            results = {}
            for label, pass_config in (("off", ()), ("on", on)):
                spec = ModelSpec(arch=args.arch, num_layers=args.layers, fmt=fmt,
                                 mode=spec_mode, pass_config=pass_config)
                start = time.perf_counter()
                compiled = compile_model(spec, work_dir=work_dir)
                seconds = time.perf_counter() - start
                results[label] = (compiled, seconds)
                _dump_graphs(compiled, pathlib.Path(args.out) / "graphs" /
                             f"{fmt}-{spec_mode}-fusion-{label}")
            (off, t_off), (on_c, t_on) = results["off"], results["on"]
            rep = fusion_report(on_c)
            rep["executed"] = execution_report(off, on_c)
            rows.append((fmt, spec_mode, rep, off, on_c, t_off, t_on))
    print("\n  pieces: graph(qN) = compiled + CUDA-graphed piece with N FP8 quant "
          "ops after the passes; attn = eager attention piece; attn+q->fp8 = "
          "sticky attention piece, fused")
    for fmt, spec_mode, rep, off, on_c, t_off, t_on in rows:
        if spec_mode == "piecewise":
            print(f"\nEmbedded tiny {args.arch} ({args.layers} layers), "
                  f"{FORMATS[fmt]}, Triton attention backend:")
        print(f"\n  [{spec_mode}]")
        print(f"    attention layers fused  {rep['fused']}/{rep['attention_layers']}")
        opaque = " (o_proj's group quants; the other block-FP8 linears quantize " \
            "inside vLLM's opaque op)" if fmt == "fp8-block" else ""
        print(f"    quant kernels           {rep['quant_ops_before']} -> "
              f"{rep['quant_ops_after']} "
              f"({rep['quant_ops_before'] - rep['quant_ops_after']} removed){opaque}")
        print(f"    pieces (fusion off)     {_piece_line(off)}")
        print(f"    pieces (fusion on)      {_piece_line(on_c)}  "
              f"sticky attention pieces: {rep['sticky_pieces']}")
        print(f"    compile + run time      off {t_off:.1f} s, on {t_on:.1f} s "
              "(wall; the second compile reuses Inductor's C++ build cache)")
        for layer, reason in sorted(rep["skipped"].items()):
            print(f"    not fused: {layer}: {reason}")
        ex = rep["executed"]
        print(f"    executed                {ex['steps']} steps ({ex['tokens']} "
              f"tokens: prefills, chunked prefill, decodes): fused vs unfused "
              f"max |logit diff| {ex['max_logit_diff']:.3g}, hidden states "
              f"{'bit-identical' if ex['identical'] else 'DIFFERENT'}")
        print(f"    greedy, 4 tokens x 3    unfused {ex['greedy_off']}")
        print(f"                            fused   {ex['greedy_on']} "
              f"({'same' if ex['greedy_off'] == ex['greedy_on'] else 'DIFFERENT'})")
    print(f"\n  graphs written to {pathlib.Path(args.out) / 'graphs'}")
    summary = [{"format": f, "mode": m, **r} for f, m, r, *_ in rows]
    (pathlib.Path(args.out) / "report.json").write_text(json.dumps(summary, indent=2))
    return 0


def execution_report(off, on):
    """Fused vs unfused compiled models, both run (cpu_harness CompiledModel
    with outputs): logits of the harness steps, and greedy tokens."""
    from cpu_harness.execute import Runner
    diff = max(float((a.logits - b.logits).abs().max())
               for a, b in zip(off.outputs, on.outputs))
    same = all(a.hidden.equal(b.hidden) for a, b in zip(off.outputs, on.outputs))
    greedy = [Runner(c.model, c.vllm_config).greedy() for c in (off, on)]
    return {"steps": len(on.outputs),
            "tokens": sum(len(o.hidden) for o in on.outputs),
            "max_logit_diff": diff, "identical": same,
            "greedy_off": greedy[0], "greedy_on": greedy[1]}


def _dump_graphs(compiled, folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dynamo.py").write_text(compiled.dynamo_graph.code)
    for p in compiled.pieces:
        (folder / f"{p.name}.py").write_text(p.graph.code)
    for i, pg in enumerate(compiled.post_grad):
        (folder / f"post_grad_{i}_before.txt").write_text(pg.before)
        (folder / f"post_grad_{i}_after.txt").write_text(str(pg.after))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vllm_overlay")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="versions, mode, fusion report")
    rep.add_argument("--arch", default="llama")
    rep.add_argument("--layers", type=int, default=2)
    rep.add_argument("--out", default="out/report")
    args = parser.parse_args(argv)
    return run(args)
