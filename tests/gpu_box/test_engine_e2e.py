"""End to end on a GPU box: ``vllm.LLM`` on the embedded FP8 checkpoint,
attention + quant fusion on vs off.

Runs only where vLLM 0.8.5.post1 AND a CUDA GPU exist; skips otherwise
(CI: no GPU; the H100 test machine: no vLLM; the CPU harness: active libcuda
stub).  Uses no harness fixture (tests/conftest.py skips those on GPU boxes)
and never activates the CPU harness: every engine runs in its own
subprocess (this file run as a script) with the harness flag removed.

Each engine: ``VLLM_ATTENTION_BACKEND`` = the overlay's Triton backend of
its engine (``TRITON_ATTN_VLLM_V1`` / ``TRITON_ATTN_VLLM_V0``),
``enforce_eager=False`` with CUDA graphs for ``CAPTURE_SIZES`` (up to 64),
``compilation_config={"pass_config": {"enable_attn_fusion": on}}``, vLLM's
compile cache and Inductor's FX graph cache off (the engines of one session
share the compiled kernels), ``VLLM_LOGGING_LEVEL=DEBUG`` (vLLM then asserts that a
replayed piece finds its inputs at the captured addresses), 8 greedy
prompts of mixed lengths (short, multi-block and one prompt longer than the
largest capture size), 64 new tokens, top-2 logprobs, generated in
``BATCHES`` (decode batches 3, 1 and 4: capture sizes 4, 1 and 4 replayed;
the long prompt's prefill runs uncaptured in between) and then all 8
together (decode batch 8).  The child counts CUDA graph captures and
replays itself (``torch.cuda.CUDAGraph.capture_begin`` / ``replay``
wrapped).

What is asserted:
- V1, one GPU, in-process engine core, Llama and Qwen2: fusion on logs ``Fused quant onto N
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
- V0 (``VLLM_USE_V1=0``, ``VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V0``,
  compilation level 3: one full graph, V0's own decode CUDA graphs around
  the whole model): fusion on logs ``Fused quant onto N`` summed to the
  number of layers (no sticky ops: nothing is split), graphs captured and
  replayed; tokens as above.
- V1 with ``kv_cache_dtype="fp8"`` and ``VLLM_USE_V1`` unset (the oracle
  decides, as for a user): the log says V1 was kept for this backend and a
  V1 engine starts; fusion and graphs as in the V1 test; tokens on vs off as
  above (both read the same FP8 cache; no float reference: the cache
  quantizes K/V).
- TP=2 when ``torch.cuda.device_count() >= 2``: each rank fuses all its layers;
  tokens as above.
"""
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
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
V1_KEPT_LINE = "V1 kept with --kv-cache-dtype fp8"
BACKENDS = {"v1": "TRITON_ATTN_VLLM_V1", "v0": "TRITON_ATTN_VLLM_V0"}
ENGINE_TIMEOUT = int(os.environ.get("E2E_ENGINE_TIMEOUT", "600"))
MULTIPROC_TIMEOUT = int(os.environ.get("E2E_MULTIPROC_TIMEOUT", "300"))


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
              tensor_parallel_size=cfg["tp"], compilation_config=compilation,
              kv_cache_dtype=cfg.get("kv_cache_dtype", "auto"))
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


def _engine_env(engine, multiproc, oracle=False):
    """The child's environment: V1 or V0 as asked (``oracle``: VLLM_USE_V1
    unset, vLLM's oracle decides, as for a user who sets nothing), the
    overlay's Triton backend of that engine, debug logging, no compile
    cache of vLLM's own."""
    import cpu_harness
    env = dict(os.environ)
    for key in (cpu_harness.ENV_FLAG, "TRITON_INTERPRET", "VLLM_ATTENTION_BACKEND",
                "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "VLLM_USE_V1"):
        env.pop(key, None)
    env.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiproc else "0",
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "VLLM_DISABLE_COMPILE_CACHE": "1",
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ATTENTION_BACKEND": BACKENDS[engine],
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
    })
    if not oracle:
        env["VLLM_USE_V1"] = "1" if engine == "v1" else "0"
    return env


def run_engine(model_dir, fusion, engine="v1", multiproc=False, tp=1,
               kv_cache_dtype="auto", timeout=None, kernel_cache=None,
               log_path=None):
    """One engine in a fresh process: (outputs, combined log); outputs
    {"batched": per prompt from BATCHES, "together": one call}.  An FP8 KV
    cache leaves VLLM_USE_V1 unset (the oracle decides).  ``kernel_cache``:
    a directory for Inductor's and Triton's compiled kernels shared by the
    engines of one session (Inductor's FX graph cache and vLLM's compile
    cache stay off: every engine compiles its graphs).  ``log_path``: the
    log is written there too (also after a failure or a timeout)."""
    cfg = {"model": str(model_dir), "fusion": fusion, "engine": engine,
           "tp": tp, "kv_cache_dtype": kv_cache_dtype}
    timeout = timeout or ENGINE_TIMEOUT
    with tempfile.TemporaryDirectory(prefix="vllm_e2e_") as tmp:
        out = Path(tmp) / "out.json"
        env = _engine_env(engine, multiproc, oracle=kv_cache_dtype != "auto")
        env["VLLM_CACHE_ROOT"] = str(Path(tmp) / "vllm_cache")
        cache = Path(kernel_cache) if kernel_cache else Path(tmp)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        env["TRITON_CACHE_DIR"] = str(cache / "triton")
        t0 = time.time()
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child",
                 json.dumps(cfg), str(out)],
                env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, timeout=timeout)
            log, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            part = exc.stdout or ""
            log = part.decode(errors="replace") if isinstance(part, bytes) else part
            rc = f"timeout after {timeout} s"
        log += f"\nE2E-WALL {time.time() - t0:.1f} s rc={rc}\n"
        if log_path:
            Path(log_path).write_text(log)
        if rc != 0 or not out.exists():
            raise AssertionError(f"engine {cfg} failed (rc {rc}):\n"
                                 f"{log[-6000:]}")
        return json.loads(out.read_text()), log


def check_fused_engine(log, num_layers, sticky=True):
    """The fused engine's log: N fused == layers, sticky ops (piecewise),
    CUDA graphs captured and replayed (counted)."""
    counts = fused_counts(log)
    assert list(counts) == [0], counts
    assert sum(counts[0]) == num_layers, counts
    sticky_line = f"Sticky ops: {num_layers} attention pieces keep their quant"
    assert (sticky_line in log) == sticky, sticky_line
    check_graphs(log)


def check_graphs(log):
    captures, replays = graph_counts(log)
    assert captures >= len(CAPTURE_SIZES), (captures, replays)
    assert replays >= MAX_TOKENS, (captures, replays)


# ------------------------------------------------------------------- tests

if __name__ != "__main__":
    import pytest

    _REASON = skip_reason()
    pytestmark = pytest.mark.skipif(_REASON is not None,
                                    reason=_REASON or "")
    _runs = {}

    @pytest.fixture(scope="module")
    def model_dirs(tmp_path_factory):
        """arch -> the embedded tiny FP8 checkpoint (built on first use)."""
        from cpu_harness.tiny_checkpoint import build_checkpoint
        built = {}

        def get(arch):
            if arch not in built:
                built[arch] = build_checkpoint(
                    tmp_path_factory.mktemp("ckpt") / f"tiny-{arch}-fp8",
                    arch=arch, fmt="fp8", num_layers=NUM_LAYERS)
            return built[arch]
        return get

    @pytest.fixture(scope="module")
    def engine(model_dirs, tmp_path_factory):
        """(fusion, engine, multiproc, tp, arch, kv_cache_dtype) ->
        (outputs, log), each configuration run once per session; logs also
        under $E2E_LOG_DIR when set."""
        kernels = tmp_path_factory.mktemp("kernels")
        log_dir = os.environ.get("E2E_LOG_DIR")

        def get(fusion, engine="v1", multiproc=False, tp=1, arch="llama",
                kv_cache_dtype="auto"):
            key = (fusion, engine, multiproc, tp, arch, kv_cache_dtype)
            if key not in _runs:
                name = "-".join([engine, arch, kv_cache_dtype, f"tp{tp}",
                                 "mp" if multiproc else "inproc",
                                 "on" if fusion else "off"])
                log_path = None
                if log_dir:
                    Path(log_dir).mkdir(parents=True, exist_ok=True)
                    log_path = Path(log_dir) / f"{name}.log"
                _runs[key] = run_engine(
                    model_dirs(arch), fusion, engine, multiproc, tp,
                    kv_cache_dtype, kernel_cache=kernels, log_path=log_path,
                    timeout=MULTIPROC_TIMEOUT if multiproc else None)
            return _runs[key]
        return get

    @functools.lru_cache(maxsize=None)
    def _reference_first_tokens(model_dir):
        """CPU float32 reference (FP8 emulated): (prompt ids, argmax, top-2
        margin) of the first generated token per prompt."""
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

    def check_reference(runs, reference):
        checked = 0
        for run in runs:
            for out, (ids, argmax, margin) in zip(run, reference):
                assert out["prompt_ids"] == ids
                if margin > REF_MARGIN:
                    assert out["tokens"][0] == argmax
                    checked += 1
        assert checked > 0, "reference margins all below REF_MARGIN"

    @pytest.mark.parametrize("arch", ["llama", "qwen2"])
    def test_v1_fusion_on_vs_off(engine, model_dirs, arch):
        on, log_on = engine(True, arch=arch)
        off, log_off = engine(False, arch=arch)
        assert "overlay mode=overlay" in log_on
        check_fused_engine(log_on, NUM_LAYERS)
        assert "Graph capturing finished" in log_on      # piecewise CUDA graphs
        assert "Graph capturing finished" in log_off
        check_graphs(log_off)                            # counted, not logged
        assert fused_counts(log_off) == {}               # pass not registered
        compare_greedy(on, off)
        check_reference([on["batched"], off["batched"], on["together"],
                         off["together"]],
                        _reference_first_tokens(model_dirs(arch)))

    def test_v0_full_graph_fuses(engine, model_dirs):
        on, log_on = engine(True, "v0")
        off, log_off = engine(False, "v0")
        for log in (log_on, log_off):
            assert "Initializing a V0 LLM engine" in log
            assert "TRITON_ATTN_VLLM_V0" in log
        check_fused_engine(log_on, NUM_LAYERS, sticky=False)
        check_graphs(log_off)
        assert fused_counts(log_off) == {}
        compare_greedy(on, off)
        check_reference([on["batched"], off["batched"], on["together"],
                         off["together"]],
                        _reference_first_tokens(model_dirs("llama")))

    def test_v1_fp8_kv_cache_stays_v1_and_fuses(engine):
        on, log_on = engine(True, kv_cache_dtype="fp8")
        off, log_off = engine(False, kv_cache_dtype="fp8")
        for log in (log_on, log_off):
            assert V1_KEPT_LINE in log
            assert "Initializing a V1 LLM engine" in log
            assert "Initializing a V0 LLM engine" not in log
        check_fused_engine(log_on, NUM_LAYERS)
        check_graphs(log_off)
        compare_greedy(on, off)

    def test_v1_engine_core_process_has_overlay(engine):
        on, log = engine(True, multiproc=True)
        assert ENGINE_CORE_LINE in log, log[-4000:]
        counts = fused_counts(log)
        assert sum(n for ns in counts.values() for n in ns) == NUM_LAYERS, counts
        compare_greedy(on, engine(False)[0])

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
