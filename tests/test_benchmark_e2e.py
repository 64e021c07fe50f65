"""benchmarks/e2e.py (GPU-box benchmark; not run here): --help works without
vLLM, torch or a GPU; it refuses clearly where it cannot run; table layout."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


def _module():
    spec = importlib.util.spec_from_file_location("_bench_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_without_vllm_or_torch():
    # vllm and torch made unimportable: --help must not need them.
    code = ("import sys, runpy; sys.modules['vllm'] = None; "
            "sys.modules['torch'] = None; sys.argv = ['e2e.py', '--help']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model PATH", "--batch-sizes", "--prompt-lens",
                   "--variants", "--tp"):
        assert option in proc.stdout
    assert "--child" not in proc.stdout


def test_help_in_process(capsys):
    mod = _module()
    with pytest.raises(SystemExit) as info:
        mod.parse_args(["--help"])
    assert info.value.code == 0
    assert "fusion on vs off" in capsys.readouterr().out
    args = mod.parse_args(["--model", "/a", "--model", "/b", "--batch-sizes", "1,4"])
    assert args.model == ["/a", "/b"] and args.batch_sizes == [1, 4]
    with pytest.raises(SystemExit):
        mod.parse_args(["--variants", "on,bogus"])


def test_refuses_without_gpu():
    # Here: vLLM installed, no GPU (and the CPU harness flag set by conftest).
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr
    assert "Nothing was run." in proc.stderr
    assert "GPU" in proc.stderr


def test_markdown_table():
    mod = _module()
    row = lambda tps, lat: {"batch": 8, "prompt_len": 128, "output_len": 64,  # noqa: E731
                            "tokens_per_s": tps, "latency_ms": lat, "prefill_ms": 5.0}
    table = mod.markdown({"tiny": {"off": ([row(1000.0, 512.0)], {0: 0}),
                                   "on": ([row(1100.0, 480.0)], {0: 2})}},
                         ["off", "on"])
    lines = table.splitlines()
    assert lines[0].startswith("| model | B | P | O | off tok/s")
    assert lines[2] == ("| tiny | 8 | 128 | 64 | 1000 | 512.0 | 5.0 | 1100 | "
                        "480.0 | 5.0 | 1.100 | 0.938 |")
    assert "fused attention nodes per rank (fusion on): {0: 2}" in table
    assert mod.fused_per_rank(
        "Fused quant onto 1 attention nodes\n"
        "(VllmWorker rank=1 pid=3) INFO Fused quant onto 2 attention nodes\n"
        "Fused quant onto 1 attention nodes") == {0: 2, 1: 2}
