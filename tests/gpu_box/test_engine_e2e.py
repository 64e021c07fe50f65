"""End to end on a GPU box: ``vllm.LLM`` on the embedded FP8 checkpoint,
attention + quant fusion on vs off.

Runs only where vLLM 0.8.5.post1 AND a CUDA GPU exist; skips otherwise
(CI: no GPU; the H100 test machine: no vLLM; the CPU harness: active libcuda
stub).  Uses no harness fixture (tests/conftest.py skips those on GPU boxes)
and never activates the CPU harness: every engine runs in its own
subprocess (this file run as a script) with the harness flag removed.

Each engine: ``VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V1`` (V1),
``enforce_eager=False`` with piecewise CUDA graphs for ``CAPTURE_SIZES`` (up
to 64), ``compilation_config={"pass_config": {"enable_attn_fusion": on}}``,
compile caches off, ``VLLM_LOGGING_LEVEL=DEBUG`` (vLLM then asserts that a
replayed piece finds its inputs at the captured addresses), 8 greedy
prompts of mixed lengths (short, multi-block and one prompt longer than the
largest capture size), 64 new tokens, top-2 logprobs, generated in
``BATCHES`` (decode batches 3, 1 and 4: capture sizes 4, 1 and 4 replayed;
the long prompt's prefill runs uncaptured in between) and then all 8
together (decode batch 8).  The child counts CUDA graph captures and
replays itself (``torch.cuda.CUDAGraph.capture_begin`` / ``replay``
wrapped).

What is asserted:
- V1, one GPU, in-process engine core: fusion on logs ``Fused quant onto N
  attention nodes`` with N summed over the compiled graphs == number of
  layers (one sticky attention piece per layer), ``Sticky ops: N attention
  pieces keep their quant``, CUDA graphs captured (at least one per capture
  size) and replayed (at least one per generated token); fusion off
  registers no pass (no such line) and captures and replays too.
- on vs off (FP8 tolerance, stated): greedy tokens equal; a divergence is
  accepted only at a near tie (the two tokens' logprobs within
  ``TIE_NATS`` in the off run), and the chosen tokens' logprobs agree within
  ``LOGPROB_ATOL`` up to the first divergence.  Both runs must also agree with
  the CPU float reference (``tiny_checkpoint.load_reference_model``, FP8
  emulated) on the first generated token wherever the reference's top-2
  margin exceeds ``REF_MARGIN``.
- V1 with ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (engine core spawned): the
  line "vllm_overlay active in engine-core process" appears and the fusion
  count is the number of layers (the model is compiled only in that process).
- V0 (``VLLM_USE_V1=0``, default CUDA backend, compilation level 3; needs
  vLLM's compiled FlashAttention, skipped without it): no V0
  CUDA backend can fuse: every fusion line says 0 and the output is
  identical (tokens equal, logprobs within 1e-4).
- TP=2 when ``torch.cuda.device_count() >= 2``: each rank fuses all its layers;
  tokens as above.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUM_LAYERS = 2
MAX_TOKENS = 64
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
LOGPROB_ATOL = 0.05   # nats, chosen-token logprob, fusion on vs off
TIE_NATS = 0.05       # a greedy divergence is accepted only at such a tie
REF_MARGIN = 0.5      # nats, top-2 margin of the CPU reference
V0_LOGPROB_ATOL = 1e-4
PROMPTS = [
    "The little model reads a short line and",
    "Once upon a time there was a small town by the sea,",
    "Question: what is two plus two? Answer:",
    "Hello world! How are you",
    "A cat sat on the warm mat near the door. The dog ran to the park and "
    "back. Rain fell on the roof all night; in the morning the sky was",
    "We test attention, quantization and fusion.",
    "1 2 3 4 5 6 7 8",
    ("Tell me a story about a robot who learns to paint. " * 6).strip(),
]
# llm.generate calls, by prompt index: decode batches 3, 1, 4 (the long
# prompt alone, its prefill longer than the largest capture size), then all
# 8 prompts in one call.
BATCHES = [[0, 1, 2], [7], [3, 4, 5, 6]]
GRAPHS_RE = re.compile(r"E2E-GRAPHS captures=(\d+) replays=(\d+)")
FUSED_RE = re.compile(r"Fused quant onto (\d+) attention nodes")
WORKER_RE = re.compile(r"\(VllmWorker rank=(\d+)")
ENGINE_CORE_LINE = "vllm_overlay active in engine-core process"


def skip_reason():
    """None where these tests can run, else why not."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        found = version("vllm")
    except PackageNotFoundError:
        found = None
    if found != "0.8.5.post1":
        return f"needs vLLM 0.8.5.post1 (found: {found or 'not installed'})"
    import cpu_harness
    if cpu_harness._stub is not None or os.environ.get(cpu_harness.ENV_FLAG) == "1":
        return "CPU harness active (libcuda stub, no GPU): needs a CUDA GPU"
    if not cpu_harness.real_driver_present():
        return "needs a CUDA GPU (no NVIDIA driver)"
    if _device_count() < 1:
        return "needs a CUDA GPU (torch sees none)"
    return None


def _device_count():
    """GPU count from a child process (the test process never touches CUDA)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True, text=True, timeout=300)
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


# --------------------------------------------------------------- log parsing

def fused_counts(log):
    """{rank: [N, ...]} from 'Fused quant onto N attention nodes' lines;
    rank 0 for lines without a '(VllmWorker rank=R ...)' prefix."""
    counts = {}
    for line in log.splitlines():
        m = FUSED_RE.search(line)
        if m:
            w = WORKER_RE.search(line)
            counts.setdefault(int(w.group(1)) if w else 0, []).append(int(m.group(1)))
    return counts


def graph_counts(log):
    """(captures, replays) the child counted, or None."""
    m = GRAPHS_RE.search(log)
    return (int(m.group(1)), int(m.group(2))) if m else None


def compare_greedy(on, off):
    """Raise AssertionError unless ``on`` matches ``off`` within the stated
    FP8 tolerance (module docstring), both the batched and the all-together
    outputs.  Returns #outputs bit-equal in tokens."""
    if isinstance(on, dict):
        return sum(compare_greedy(on[k], off[k]) for k in ("batched", "together"))
    equal = 0
    for i, (a, b) in enumerate(zip(on, off)):
        assert a["prompt_ids"] == b["prompt_ids"]
        for pos, (ta, tb) in enumerate(zip(a["tokens"], b["tokens"])):
            la, lb = a["logprobs"][pos], b["logprobs"][pos]
            if ta != tb:
                gap = abs(lb[str(tb)] - lb.get(str(ta), -1e9))
                assert gap <= TIE_NATS, (
                    f"prompt {i} pos {pos}: on={ta} off={tb}, off-run gap "
                    f"{gap:.4f} nats is not a near tie")
                break
            assert abs(la[str(ta)] - lb[str(tb)]) <= LOGPROB_ATOL, (i, pos)
        else:
            assert len(a["tokens"]) == len(b["tokens"])
            equal += 1
    assert len(on) == len(off) == len(PROMPTS)
    return equal


# -------------------------------------------------------------- engine child

def _count_graphs():
    """Wrap torch.cuda.CUDAGraph's capture and replay; returns the counter."""
    import torch
    counts = {"captures": 0, "replays": 0}
    graph_cls = torch.cuda.CUDAGraph
    capture_begin, replay = graph_cls.capture_begin, graph_cls.replay

    def counted_capture_begin(self, *args, **kwargs):
        counts["captures"] += 1
        return capture_begin(self, *args, **kwargs)

    def counted_replay(self, *args, **kwargs):
        counts["replays"] += 1
        return replay(self, *args, **kwargs)
    graph_cls.capture_begin = counted_capture_begin
    graph_cls.replay = counted_replay
    return counts


def _child(cfg, out_path):
    """Run one engine (this process) and write its outputs as JSON."""
    import vllm_overlay
    from vllm import LLM, SamplingParams
    mode = vllm_overlay.install()
    print(f"E2E-CHILD overlay mode={mode} pid={os.getpid()}", flush=True)
    graphs = _count_graphs()
    compilation = {"pass_config": {"enable_attn_fusion": cfg["fusion"]},
                   "cudagraph_capture_sizes": CAPTURE_SIZES}
    if cfg["engine"] == "v0":
        compilation["level"] = 3   # V0 compiles only when asked (full graph)
    llm = LLM(model=cfg["model"], tokenizer=cfg["model"], dtype="bfloat16",
              enforce_eager=False, max_model_len=512, seed=0,
              gpu_memory_utilization=cfg.get("gpu_mem", 0.3),
              tensor_parallel_size=cfg["tp"], compilation_config=compilation)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2,
                            ignore_eos=True)
    def run(indices):
        outs = llm.generate([PROMPTS[i] for i in indices], params)
        result = []
        for o in outs:
            c = o.outputs[0]
            result.append({
                "prompt_ids": list(o.prompt_token_ids),
                "tokens": list(c.token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in d.items()}
                             for d in c.logprobs],
            })
        return result

    batched = [None] * len(PROMPTS)
    for indices in BATCHES:
        for i, r in zip(indices, run(indices)):
            batched[i] = r
    together = run(range(len(PROMPTS)))
    print(f"E2E-GRAPHS captures={graphs['captures']} replays={graphs['replays']}",
          flush=True)
    Path(out_path).write_text(json.dumps({"batched": batched,
                                          "together": together}))


def _engine_env(engine, multiproc):
    import cpu_harness
    env = dict(os.environ)
    for key in (cpu_harness.ENV_FLAG, "TRITON_INTERPRET", "VLLM_ATTENTION_BACKEND",
                "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT"):
        env.pop(key, None)
    env.update({
        "VLLM_USE_V1": "1" if engine == "v1" else "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiproc else "0",
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "VLLM_DISABLE_COMPILE_CACHE": "1",
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
    })
    if engine == "v1":
        # V0 rejects this backend name; it keeps its default (FlashAttention).
        env["VLLM_ATTENTION_BACKEND"] = "TRITON_ATTN_VLLM_V1"
    return env


def run_engine(model_dir, fusion, engine="v1", multiproc=False, tp=1,
               timeout=900):
    """One engine in a fresh process: (outputs, combined log); outputs
    {"batched": per prompt from BATCHES, "together": one call}."""
    cfg = {"model": str(model_dir), "fusion": fusion, "engine": engine,
           "tp": tp}
    with tempfile.TemporaryDirectory(prefix="vllm_e2e_") as tmp:
        out = Path(tmp) / "out.json"
        env = _engine_env(engine, multiproc)
        env["VLLM_CACHE_ROOT"] = str(Path(tmp) / "vllm_cache")
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child",
             json.dumps(cfg), str(out)],
            env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=timeout)
        log = proc.stdout
        if proc.returncode != 0 or not out.exists():
            raise AssertionError(f"engine {cfg} failed (rc {proc.returncode}):\n"
                                 f"{log[-6000:]}")
        return json.loads(out.read_text()), log


# ------------------------------------------------------------------- tests

if __name__ != "__main__":
    import pytest

    _REASON = skip_reason()
    pytestmark = pytest.mark.skipif(_REASON is not None,
                                    reason=_REASON or "")
    _runs = {}

    @pytest.fixture(scope="module")
    def model_dir(tmp_path_factory):
        from cpu_harness.tiny_checkpoint import build_checkpoint
        return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama-fp8",
                                arch="llama", fmt="fp8", num_layers=NUM_LAYERS)

    @pytest.fixture(scope="module")
    def engine(model_dir):
        """(fusion, engine, multiproc, tp) -> (outputs, log), cached."""
        def get(fusion, engine="v1", multiproc=False, tp=1):
            key = (fusion, engine, multiproc, tp)
            if key not in _runs:
                _runs[key] = run_engine(model_dir, fusion, engine, multiproc, tp)
            return _runs[key]
        return get

    @pytest.fixture(scope="module")
    def reference_first_tokens(model_dir):
        """CPU float32 reference (FP8 emulated): (argmax, top-2 margin) of
        the first generated token per prompt."""
        import torch
        from transformers import AutoTokenizer

        from cpu_harness.tiny_checkpoint import load_reference_model
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = load_reference_model(model_dir, emulate_fp8=True)
        result = []
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = tok(prompt, return_tensors="pt").input_ids
                logits = model(input_ids=ids).logits[0, -1].float()
                lp = torch.log_softmax(logits, -1)
                top = lp.topk(2)
                result.append((ids[0].tolist(), int(top.indices[0]),
                               float(top.values[0] - top.values[1])))
        return result

    def test_v1_fusion_on_vs_off(engine, reference_first_tokens):
        on, log_on = engine(True)
        off, log_off = engine(False)
        assert "overlay mode=overlay" in log_on
        counts = fused_counts(log_on)
        assert list(counts) == [0], counts
        assert sum(counts[0]) == NUM_LAYERS, counts
        assert f"Sticky ops: {NUM_LAYERS} attention pieces keep their quant" in log_on
        assert "Graph capturing finished" in log_on      # piecewise CUDA graphs
        assert "Graph capturing finished" in log_off
        for log in (log_on, log_off):                    # counted, not logged
            captures, replays = graph_counts(log)
            assert captures >= len(CAPTURE_SIZES), (captures, replays)
            assert replays >= MAX_TOKENS, (captures, replays)
        assert fused_counts(log_off) == {}               # pass not registered
        compare_greedy(on, off)
        checked = 0
        for run in (on["batched"], off["batched"], on["together"], off["together"]):
            for out, (ids, argmax, margin) in zip(run, reference_first_tokens):
                assert out["prompt_ids"] == ids
                if margin > REF_MARGIN:
                    assert out["tokens"][0] == argmax
                    checked += 1
        assert checked > 0, "reference margins all below REF_MARGIN"

    def test_v1_engine_core_process_has_overlay(engine):
        on, log = engine(True, multiproc=True)
        assert ENGINE_CORE_LINE in log, log[-4000:]
        counts = fused_counts(log)
        assert sum(n for ns in counts.values() for n in ns) == NUM_LAYERS, counts
        compare_greedy(on, engine(False)[0])

    def test_v0_cannot_fuse_and_output_is_identical(engine):
        import importlib.util
        try:
            fa = importlib.util.find_spec("vllm.vllm_flash_attn._vllm_fa2_C")
        except ImportError:
            fa = None
        if fa is None:
            pytest.skip("V0's default CUDA backend needs vLLM's compiled "
                        "FlashAttention (absent)")
        on, log_on = engine(True, "v0")
        off, log_off = engine(False, "v0")
        counts = fused_counts(log_on)
        assert counts and all(n == 0 for ns in counts.values() for n in ns), counts
        assert fused_counts(log_off) == {}
        for a, b in zip(on["batched"] + on["together"],
                        off["batched"] + off["together"]):
            assert a["tokens"] == b["tokens"]
            for la, lb in zip(a["logprobs"], b["logprobs"]):
                for t, v in lb.items():
                    assert abs(la[t] - v) <= V0_LOGPROB_ATOL

    def test_v1_tp2(engine):
        if _device_count() < 2:
            pytest.skip("TP=2 needs torch.cuda.device_count() >= 2")
        on, log_on = engine(True, tp=2)
        off, _ = engine(False, tp=2)
        counts = fused_counts(log_on)
        assert sorted(counts) == [0, 1], counts
        for rank, ns in counts.items():
            assert sum(ns) == NUM_LAYERS, (rank, counts)
        assert ENGINE_CORE_LINE in log_on
        compare_greedy(on, off)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        _child(json.loads(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: run with pytest (this file's --child mode is internal)")
