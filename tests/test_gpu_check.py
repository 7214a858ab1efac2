"""benchmarks/gpu_check.py on the CPU: the same code as on a GPU, on tiny sizes, with the
GPU-only figures null and every other field present and sane."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
  spec = importlib.util.spec_from_file_location(
      "gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow   # ~75 s at load 5-6 on 2 cores: four sections, each compiling its programs
def test_gpu_check_runs_on_cpu_with_gpu_figures_null():
  out = _load().run()   # auto: tiny sizes on the CPU backend
  json.dumps(out)       # one JSON line
  assert out["small"] is True and out["backend"] == "cpu"
  assert out["host_memory_kind"] == "pageable"
  assert out["hbm_GBps"] is None
  assert set(out["kind"]) <= set(out) and set(out["kind"].values()) == {"measured"}

  rows = out["decode"]
  assert {(r["model"], r["batch"]) for r in rows} == {
      (m, b) for m in ("tiny_opt", "tiny_llama") for b in (1, 8)}
  for r in rows:
    assert r["hbm_fraction"] is None
    assert r["step_ms"] > 0 and r["weight_bytes"] > 0 and r["kv_bytes"] > 0
    assert r["read_GBps"] > 0

  assert sorted(out["ablation"]) == ["10", "14"]
  for ab in out["ablation"].values():
    assert set(ab["prompt_stream_s"]) == {"naive", "buffered", "layerwise", "background"}
    assert set(ab["token_step_stream_s"]) == {"naive", "buffered", "layerwise"}
    assert all(v >= 0 for v in ab["prompt_stream_s"].values())
    assert ab["flush_GBps"] > 0

  link = out["link"]
  for k in ("h2d_pinned_GBps", "h2d_pageable_GBps", "d2h_numpy_GBps", "host_memcpy_GBps",
            "host_copy_parallel_GBps"):
    assert link[k] > 0, k
  assert link["host_memory_kind"] == "pageable" and link["host_copy_threads"] >= 1

  (sw,) = out["swap"]
  assert 0.0 <= sw["hidden_fraction"] <= sw["overlap_of_possible"] <= 1.0
  assert sw["swap_in_bytes"] > 0 and sw["step_ms"] > 0 and sw["both_ms"] > 0

  pipe = out["pipeline"]
  assert pipe["tokens_identical"] is True   # replication must not change a token
  assert pipe["tok_s_on"] > 0 and pipe["tok_s_off"] > 0
  assert pipe["host_memory_kind"] == "pageable"


def test_sections_subset_and_keep_going_report_a_broken_section(tmp_path, monkeypatch):
  mod = _load()
  def broken(sz):
    raise RuntimeError("planted failure")
  monkeypatch.setattr(mod, "swap_overlap", broken)
  progress = tmp_path / "progress.jsonl"
  out = mod.run(small=True, sections={"link", "swap"}, keep_going=True, progress=str(progress))
  assert "decode" not in out and "pipeline" not in out   # only the sections asked for
  assert out["link"]["h2d_pageable_GBps"] > 0
  assert out["swap"] is None and "planted failure" in out["errors"]["swap"]
  lines = [json.loads(x) for x in progress.read_text().splitlines()]
  assert [x["section"] for x in lines] == ["link", "swap"]
  assert lines[0]["error"] is None and "planted failure" in lines[1]["error"]
  with pytest.raises(RuntimeError, match="planted failure"):   # without keep_going it raises
    mod.run(small=True, sections={"swap"})
