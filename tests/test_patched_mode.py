"""File mode: the patch series applied to a copy of the installed vLLM
behaves like the overlay.  Runs the fusion and sticky-op tests again in a
fresh process that imports the patched copy (and where ``import
vllm_overlay`` reports "patched" and patches nothing)."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SELECTED = [
    "tests/test_attn_fusion.py::test_fuses_every_layer",
    "tests/test_attn_fusion.py::test_dynamic_per_token_checkpoint_untouched",
    "tests/test_sticky_split.py",
]


@pytest.fixture(scope="session")
def patched_site(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_apply import copy_vllm
    site = tmp_path_factory.mktemp("patched_site")
    vllm_dir = copy_vllm(site)
    proc = subprocess.run([sys.executable, str(ROOT / "apply.py"),
                           "--vllm-path", str(vllm_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


def test_patched_copy_reports_patched_mode(patched_site):
    proc = subprocess.run(
        [sys.executable, "-c", "import cpu_harness; cpu_harness.activate(); "
         "import vllm, vllm_overlay; from vllm.compilation import attn_fusion; "
         "print('RESULT', vllm.__file__, vllm_overlay.mode(), attn_fusion.__file__)"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(patched_site)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line, ) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    _, vllm_file, mode, fusion_file = line.split()
    assert vllm_file.startswith(str(patched_site))
    assert mode == "patched"
    assert fusion_file.startswith(str(patched_site))


def test_fusion_and_sticky_tests_pass_in_patched_mode(patched_site):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-k", "llama or not fuses_every_layer", *SELECTED],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, PYTHONPATH=str(patched_site),
                 VLLM_OVERLAY_EXPECT_MODE="patched"))
    tail = proc.stdout[-3000:]
    assert proc.returncode == 0, tail + proc.stderr[-3000:]
    summary = tail.strip().splitlines()[-1]     # "N passed, M warnings in ..."
    assert " passed" in summary and " failed" not in summary \
        and " error" not in summary, summary
