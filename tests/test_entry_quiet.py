"""Issue 21: an entry point's stderr is readable (third-party INFO logging off unless
--verbosity asks for it) and its compiled programs land in the persistent compilation cache."""

import os
import subprocess
import sys

import pytest

from dejavu_jax.studies import jaxcache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STDERR_LINES = 40


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_with_failure_and_snapshot_recovery_keeps_stderr_short(tmp_path):
  cache = tmp_path / "jax_cache"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.serve", "--config=configs/serve_tiny.py",
       "--config.recovery=snapshot", "--config.snapshot_every=2", "--config.rates=(5.0,)",
       "--config.output_len=fixed:12", f"--output_dir={tmp_path / 'out'}",
       f"--compile_cache={cache}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={k: v for k, v in os.environ.items() if k != jaxcache.ENV_VAR})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "snapshot" in (tmp_path / "out" / "recoveries.jsonl").read_text()   # orbax did run
  lines = [l for l in proc.stderr.split("\n") if l.strip()]
  assert len(lines) <= MAX_STDERR_LINES, "\n".join(lines[:60])
  assert not any("orbax" in l.lower() and " I" in l[:3] for l in lines)
  assert any(cache.iterdir())   # the compiled stage programs were cached


def test_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(jaxcache.ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert jaxcache.resolve_cache_dir() == str(tmp_path / "dejavu_jax" / "jax_cache")
  monkeypatch.setenv(jaxcache.ENV_VAR, str(tmp_path / "elsewhere"))
  assert jaxcache.resolve_cache_dir() == str(tmp_path / "elsewhere")
  assert jaxcache.resolve_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
  assert jaxcache.resolve_cache_dir("off") is None
  monkeypatch.setenv(jaxcache.ENV_VAR, "off")
  assert jaxcache.resolve_cache_dir() is None
