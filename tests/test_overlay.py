"""Overlay skeleton: install once, version guard, plugin, engine-core
process, compile-cache key."""
import os
import subprocess
import sys
import textwrap

import pytest

import vllm_overlay


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env))


def test_install_is_idempotent():
    from vllm.attention.layer import Attention
    from vllm.compilation.pass_manager import PostGradPassManager
    from vllm.config import CompilationConfig
    from vllm.v1.engine.core import EngineCoreProc
    assert vllm_overlay.install() == "overlay"
    patched = (Attention.__init__, PostGradPassManager.configure,
               CompilationConfig.compute_hash, CompilationConfig.PassConfig,
               EngineCoreProc.run_engine_core)
    hash_before = CompilationConfig().compute_hash()
    for name in vllm_overlay.MODULES:  # every module's install, again
        module = __import__(name, fromlist=["_"])
        if hasattr(module, "install"):
            module.install()
    assert vllm_overlay.install() == "overlay"
    assert (Attention.__init__, PostGradPassManager.configure,
            CompilationConfig.compute_hash, CompilationConfig.PassConfig,
            EngineCoreProc.run_engine_core) == patched
    assert CompilationConfig().compute_hash() == hash_before
    import torch
    assert sorted(torch.ops.vllm.unified_attention_with_output.overloads()) == [
        "default", "output_group_scale", "output_scale"]


def test_wrong_vllm_version_is_refused_and_nothing_patched():
    proc = _run("""
        import importlib.metadata as md
        real = md.version
        md.version = lambda name: "0.9.2" if name == "vllm" else real(name)
        import cpu_harness; cpu_harness.activate()
        try:
            import vllm_overlay
        except Exception as exc:
            print("REFUSED:", type(exc).__name__, exc)
        from vllm.config import CompilationConfig
        print("PATCHED:", hasattr(CompilationConfig.compute_hash, "_vllm_overlay"),
              "enable_attn_fusion" in CompilationConfig.PassConfig.model_fields)
    """)
    assert "REFUSED: UnsupportedVllmVersion" in proc.stdout, proc.stderr[-3000:]
    assert "supports vLLM 0.8.5.post1 only; found vLLM 0.9.2" in proc.stdout
    assert "PATCHED: False False" in proc.stdout


def test_check_vllm_version_message():
    with pytest.raises(vllm_overlay.UnsupportedVllmVersion, match="found vLLM 0.8.4"):
        vllm_overlay.check_vllm_version("0.8.4")
    vllm_overlay.check_vllm_version("0.8.5.post1")


def test_general_plugin_entry_point_installs_overlay():
    """vLLM's own plugin loader (as in workers and the front end)."""
    proc = _run("""
        import cpu_harness; cpu_harness.activate()
        import sys
        from vllm.plugins import load_general_plugins
        assert "vllm_overlay" not in sys.modules
        load_general_plugins()
        import vllm_overlay
        from vllm.config import CompilationConfig
        print("MODE", vllm_overlay.mode(),
              "enable_attn_fusion" in CompilationConfig.PassConfig.model_fields)
    """, VLLM_PLUGINS="cpu_harness,vllm_overlay")
    assert "MODE overlay True" in proc.stdout, proc.stderr[-3000:]


def test_overlay_active_in_spawned_engine_core_process():
    """A real spawn-started process with the target vLLM's core client hands
    to BackgroundProcHandle (EngineCoreProc.run_engine_core).  vLLM loads no
    plugins there; the overlay is active before vLLM's loop starts, which
    then fails on purpose (no engine config given)."""
    proc = _run("""
        import cpu_harness; cpu_harness.activate()
        import multiprocessing
        import vllm_overlay
        from vllm.v1.engine.core import EngineCoreProc
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            p = ctx.Process(target=EngineCoreProc.run_engine_core, kwargs={})
            p.start(); p.join(300)
            print("CHILD_EXIT", p.exitcode)
    """, VLLM_PLUGINS="cpu_harness")
    out = proc.stdout + proc.stderr
    assert "vllm_overlay active in engine-core process (overlay mode)" in out, out[-3000:]
    assert "EngineCore hit an exception" in out or "KeyError" in out
    assert "CHILD_EXIT 0" not in out


def test_cache_key_covers_overlay_sources(monkeypatch, tmp_path):
    from vllm.config import CompilationConfig
    from vllm_overlay import compile_cache
    before_identity = compile_cache.identity()
    before = CompilationConfig().compute_hash()
    copies = []
    for path in compile_cache.source_files():
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(compile_cache, "source_files", lambda: copies)
    assert compile_cache.identity() == before_identity
    assert CompilationConfig().compute_hash() == before
    copies[2].write_text(copies[2].read_text() + "\n# a changed pass\n")
    assert compile_cache.identity() != before_identity
    assert CompilationConfig().compute_hash() != before


def test_enabling_the_pass_changes_the_compile_cache_key():
    """vLLM's compile cache dir is keyed on VllmConfig.compute_hash(): a
    compile without the pass can never be reused with it (stale cache)."""
    from vllm.config import CompilationConfig, VllmConfig
    off = VllmConfig(compilation_config=CompilationConfig())
    on = VllmConfig(compilation_config=CompilationConfig.from_cli(
        '{"pass_config": {"enable_attn_fusion": true}}'))
    assert on.compilation_config.pass_config.enable_attn_fusion
    assert off.compute_hash() != on.compute_hash()
    assert off.compilation_config.pass_config.uuid() != \
        on.compilation_config.pass_config.uuid()
