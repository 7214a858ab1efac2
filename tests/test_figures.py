"""experiments/figures.py end to end on every figure's tiny config: each figure's files exist,
every system a plot compares is in its data, and the index shows every plot, table and config."""

import importlib.util
import json

import pytest

from configs import figures_tiny
from dejavu_jax.stream.ablation import MODES
from experiments import figures

STRATEGIES = ("restart", "replica", "snapshot", "reprefill")


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.timeout(900)   # a hang guard: 268 s at load 18-28 (790 s at ~25 before)
def test_every_figure_on_its_tiny_config(tmp_path):
  c = figures_tiny.get_config()
  entries = {e["name"]: e for e in figures.run(c, str(tmp_path), log=lambda *a: None)}
  assert set(entries) == {f.name for f in figures.FIGURES}
  for f in figures.FIGURES:   # every figure's module exists: a skipped figure is a failure
    assert importlib.util.find_spec(f.module) is not None, f.module
    assert entries[f.name]["status"] == "ok", entries[f.name]
  for e in entries.values():
    for name in e["files"]:
      assert (tmp_path / name).stat().st_size > 0

  rows = _rows(tmp_path / "streaming" / "streaming.jsonl")
  for n in c.figures.streaming.prompt_lens:
    assert {r["system"] for r in rows if r["prompt_len"] == n} == set(MODES)
  assert (tmp_path / "streaming" / "streaming.png").exists()

  rows = _rows(tmp_path / "failures" / "failures.jsonl")
  for scenario in ("one", "series", "single"):
    assert {r["system"] for r in rows if r["scenario"] == scenario} == {"failure-free",
                                                                        *STRATEGIES}
  series = [r for r in rows if r["scenario"] == "series" and r["system"] != "failure-free"]
  assert all(r["failures"] == len(c.figures.failures.series_times) for r in series)
  for png in ("timeline_one.png", "timeline_series.png", "single_request.png"):
    assert (tmp_path / "failures" / png).exists()

  # Streaming overhead (measured): every sink verified against what was sent.
  rows = _rows(tmp_path / "stream_overhead" / "stream_overhead.jsonl")
  assert {r["system"] for r in rows} == {"none", *c.figures.stream_overhead.sinks}
  assert all(r["verified"] for r in rows)
  assert all(r["streamed_mb"] > 0 for r in rows if r["system"] != "none")

  # Prompt/token ratio: the modelled grid in full, and the measured one.
  rows = _rows(tmp_path / "ratio" / "ratio.jsonl")
  rc = c.figures.ratio
  assert len([r for r in rows if r["kind"] == "modelled"]) == (
      len(rc.models) * len(rc.batch_sizes) * len(rc.prompt_lens))
  assert len([r for r in rows if r["kind"] == "measured"]) == (
      len(rc.measured_batches) * len(rc.measured_prompts))
  assert all(r["ratio"] > 0 for r in rows)

  rows = _rows(tmp_path / "planner" / "planner.jsonl")
  assert {r["system"] for r in rows} == {"Baseline", "Baseline-DP", "DéjàVu",
                                         "planner (DP allowed)", "planner (no DP)"}
  assert all(r["machines_used"] <= r["machines"] for r in rows)
  assert (tmp_path / "planner" / "makespan.png").exists()

  rows = _rows(tmp_path / "disagg_sim" / "disagg_sim.jsonl")
  plotted = {r["system"] for r in rows if "rate" in r}
  assert {s.split()[0] for s in plotted} == {"Baseline-4", "DéjàVu"} and len(plotted) == 2
  assert any(r["chosen"] for r in rows if "rate" in r)   # the planner's split is marked
  assert len({r["rate"] for r in rows if "rate" in r}) == len(c.figures.disagg_sim.loads)
  sens = [r for r in rows if r.get("kind") == "link_sensitivity"]
  assert {r["link_gbps"] for r in sens} == set(c.figures.disagg_sim.sensitivity_gbps)
  assert (tmp_path / "disagg_sim" / "link_sensitivity.png").exists()

  # Swapping (engine, paced): no swapping at B vs
  # swapping at 2B under one budget, tokens equal to the oracle, the budget never exceeded.
  rows = entries["swapping"]["rows"]
  assert _rows(tmp_path / "swapping" / "rows.jsonl") == rows
  rate = [r for r in rows if r["kind"] == "rate"]
  by = {r["swapping"]: r for r in rate}
  assert set(by) == {False, True} and by[True]["batch"] == 2 * by[False]["batch"]
  assert all(r["tokens_identical"] and r["within_budget"] for r in rate)
  # A short prompt: the swap-in hides and swapping pays; a long one: it does not.
  short, long = sorted((r for r in rows if r["kind"] == "context_sweep" and "auto_choice" in r),
                       key=lambda r: r["prompt_len"])
  assert short["swap_hides"] and short["gain"] > 1 and short["auto_choice"]
  assert not long["swap_hides"] and long["gain"] < 1 and not long["auto_choice"]
  # The paper's sweep: B vs 2B per prompt; the swap-in past the break-even does not hide.
  paper = [r for r in rows if r["kind"] == "context_sweep" and "hidden_fraction" in r]
  assert {r["prompt_len"] for r in paper} == set(c.figures.swapping.paper_prompts)
  assert all(r["batch_with"] == 2 * r["batch_without"] for r in paper)
  for r in paper:
    be, mid = r["break_even_context"], int(r["prompt_len"] + r["output_mean"] / 2)
    assert r["swap_hides"] == (be is not None and mid <= be)
  for png in ("rate_opt66b_a100.png", "context_sweep.png", "batch_B_vs_2B.png",
              "swap_overlap.png"):
    assert (tmp_path / "swapping" / png).stat().st_size > 0

  # Disaggregation (engine, paced, and the simulator beside it):
  # every system at every rate, tokens identical.
  dc, rows = c.figures.disaggregation, entries["disaggregation"]["rows"]
  assert _rows(tmp_path / "disaggregation" / "results.jsonl") == json.loads(json.dumps(rows))
  systems = {r["system"] for r in rows}
  assert systems == {"Baseline-2", "DéjàVu 1-1"}
  for system in systems:
    for source in ("paced", "sim"):
      pts = [r for r in rows if r["system"] == system and r["source"] == source]
      assert sorted(r["rate"] for r in pts) == sorted(dc.rates)
      assert all(r["completed"] == dc.num_microbatches * dc.batch_size for r in pts)
  assert all(r["tokens_identical"] for r in rows if r["source"] == "paced")
  assert (tmp_path / "disaggregation" / "latency_vs_rate.png").stat().st_size > 0

  index = (tmp_path / "index.md").read_text()
  for e in entries.values():
    if e["status"] == "ok":
      assert e["headline"] and e["headline"] in index
      assert e["kind"] in ("measured", "modelled") and e["setting"] in index
      for name in e["files"]:
        if name.endswith(".png"):
          assert f"]({name})" in index
  assert index.count("```json") == sum(e["status"] == "ok" for e in entries.values())
  assert (tmp_path / "index.html").exists() and (tmp_path / "figures.jsonl").exists()


def test_unknown_figure_name_is_an_error(tmp_path):
  c = figures_tiny.get_config()
  c.only = ("failurs",)
  with pytest.raises(ValueError, match="failurs"):
    figures.run(c, str(tmp_path), log=lambda *a: None)
