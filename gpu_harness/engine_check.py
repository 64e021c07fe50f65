"""On the GPU box: vLLM's engine (V1, in-process engine core) on the
embedded tiny FP8 checkpoint, fusion off then on, through the engine test's
own ``run_engine`` (tests/gpu_box/test_engine_e2e.py); full logs and a JSON
summary go to OUT_DIR.  Exits 1 unless tokens are equal (within the test's
stated tolerance), N fused = layers, sticky line present, graphs captured
and replayed in both runs.

    python3 gpu_harness/engine_check.py OUT_DIR [--tag NAME] [--arch llama]
"""
import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--tag", default="v1")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--only", choices=("on", "off"), default=None,
                    help="run one engine only (no comparison)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from tests.gpu_box import test_engine_e2e as t
    from cpu_harness.tiny_checkpoint import build_checkpoint
    summary = {"tag": args.tag, "arch": args.arch}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(Path(tmp) / f"tiny-{args.arch}-fp8", arch=args.arch,
                                 fmt="fp8", num_layers=t.NUM_LAYERS)
        runs = {}
        runs = {"on": None, "off": None}
        for fusion in (False, True):
            name = "on" if fusion else "off"
            if args.only and args.only != name:
                continue
            t0 = time.time()
            try:
                out, log = t.run_engine(model, fusion)
            except AssertionError as exc:
                log, out = str(exc), None
            (args.out_dir / f"{args.tag}-{args.arch}-{name}.log").write_text(log)
            runs[name] = out
            summary[name] = {
                "ok": out is not None, "seconds": round(time.time() - t0, 1),
                "fused": t.fused_counts(log), "graphs": t.graph_counts(log),
                "sticky": [l.split("] ", 1)[-1] for l in log.splitlines()
                           if "Sticky ops:" in l][:4],
                "capturing_finished": "Graph capturing finished" in log,
            }
            print(f"[{args.tag} {args.arch} {name}]", json.dumps(summary[name]),
                  flush=True)
            if out is None:
                print(log[-5000:], flush=True)
        if runs["on"] is not None and runs["off"] is not None:
            tok = {k: [r["tokens"] for r in runs[n][k]] for n in ("on", "off")
                   for k in ("batched", "together")}
            summary["tokens_equal"] = {
                k: [a["tokens"] == b["tokens"] for a, b in
                    zip(runs["on"][k], runs["off"][k])] for k in ("batched", "together")}
            summary["tokens_generated"] = [len(r["tokens"]) for r in runs["on"]["batched"]]
            summary["prompt_lens"] = [len(r["prompt_ids"]) for r in runs["on"]["batched"]]
            summary["batched_equals_together_off"] = [
                a["tokens"] == b["tokens"] for a, b in
                zip(runs["off"]["batched"], runs["off"]["together"])]
            try:
                summary["compare_greedy_equal"] = t.compare_greedy(runs["on"], runs["off"])
            except AssertionError as exc:
                summary["compare_greedy_error"] = str(exc)
                ok = False
            del tok
        else:
            ok = bool(args.only) and runs[args.only] is not None
    (args.out_dir / f"{args.tag}-{args.arch}-summary.json").write_text(
        json.dumps(summary, indent=1))
    print("SUMMARY", json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
