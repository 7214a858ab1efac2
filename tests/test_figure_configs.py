"""Every non-failure figure's default config is the paper's setting (dejavu_jax/studies/paper.py:
prompt 1000, microbatch 8, LMSys lengths clamped to [2, 950], one per microbatch, machines of
2 x A100-80GB, rates past every system's saturation), the earlier settings stay available as
named variants, and `configs/figures.py` runs every figure at its default. Reads configs only."""

import importlib

import pytest

from configs import figures as figures_config
from dejavu_jax.studies.paper import PAPER

WORKLOAD = ("prompt_len", "batch_size", "output_mean", "output_max", "lengths",
            "gpus_per_machine", "hardware")
# figure -> (config module, the PAPER fields it carries, its legacy variant or None)
FIGURES = {
    "disagg_sim": ("configs.fig_disagg_sim", WORKLOAD, "legacy"),
    "disaggregation": ("configs.disaggregation", WORKLOAD, "legacy"),
    "swapping": ("configs.swapping", WORKLOAD, "legacy"),
    "planner": ("configs.fig_planner", WORKLOAD, "legacy"),
    "ratio": ("configs.fig_ratio", ("gpus_per_machine", "hardware"), None),
}


def _config(module, *args):
  return importlib.import_module(module).get_config(*args)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_default_is_the_papers_setting(name):
  module, fields, legacy = FIGURES[name]
  c = _config(module)
  assert c.variant == "paper", name
  for f in fields:
    assert c[f] == PAPER[f], (name, f, c[f], PAPER[f])
  if legacy:
    old = _config(module, legacy)
    assert old.variant == legacy
    assert any(old[k] != c[k] for k in old if k in c and k != "variant"), name


def test_the_papers_models_and_machines():
  ds = _config("configs.fig_disagg_sim")
  dx = _config("configs.disaggregation")
  for c in (ds, dx):   # Fig 8: OPT-66B on 4 and BLOOM-176B on 8 machines of 2 x A100-80GB
    assert set(c.scenarios) == {"opt_66b:a100_80gb:4", "bloom_176b:a100_80gb:8"}
    assert c.systems == "planner"       # "DéjàVu Dp-Dt vs Baseline-D", not every split
    assert min(c.loads) < 1 < max(c.loads)   # below the lower capacity, past the higher
  assert ds.capacity == "same_workload" and ds.sensitivity_gbps
  assert not dx.rates                   # rates come from capacities on the same workload
  # The paced figure fills the deepest pipeline (BLOOM-176B on 8) several times per rate (4
  # microbatches never let the baseline queue), and measured links are used when they exist.
  assert dx.num_microbatches >= 4 * 8 and dx.chunk > 1 and len(dx.loads) >= 3
  assert ds.links_table == "auto"
  sw = _config("configs.swapping")       # Fig 9: B vs 2B per model, over the context
  assert set(sw.paper_systems) == {"opt30b_v100x2", "opt66b_a100x2", "bloom176b_a100x2"}
  assert "paper" in sw.context_sweeps and not sw.rate_sweep
  assert min(sw.paper_prompts) < 100 and max(sw.paper_prompts) >= 2000
  pl = _config("configs.fig_planner")    # the appendix: a trace that overloads the Baseline
  assert pl.trace == "poisson" and pl.trace_load > 1
  ra = _config("configs.fig_ratio")
  assert tuple(ra.batch_sizes) == tuple(range(1, 9))
  assert min(ra.prompt_lens) == 250 and max(ra.prompt_lens) == 2000
  so = _config("configs.fig_stream_overhead")
  assert (so.prompt_len, so.new_tokens) == (500, 500) and set(so.sinks) == {
      "host", "disk", "process"}


def test_the_figure_run_takes_every_default():
  c = figures_config.get_config()
  for name, (module, _, _) in FIGURES.items():
    assert c.figures[name].to_dict() == _config(module).to_dict(), name
  assert "stream_overhead" in c.figures and "ratio" in c.figures


def test_throughput_at_equal_latency():
  """The paper's metric on hand-made curves: interpolated at the crossing, every crossing of a
  non-monotone curve counted, the bound from the highest light-load median."""
  from dejavu_jax.studies import paper
  base = [{"system": "B", "rate": r, "norm_latency_p50_s_per_tok": l, "request_throughput": t}
          for r, l, t in ((1, 0.1, 1.0), (2, 0.15, 1.9), (3, 0.5, 2.0))]
  split = [{"system": "S", "rate": r, "norm_latency_p50_s_per_tok": l, "request_throughput": t}
           for r, l, t in ((1, 0.2, 1.0), (2, 0.45, 2.0), (3, 0.3, 2.9), (4, 0.6, 3.0))]
  g = paper.gain_at_equal_latency(base + split, "B", slo_factor=2.0)
  assert g["bound"] == pytest.approx(0.4)
  assert g["throughput"]["B"] == pytest.approx(1.9 + (0.4 - 0.15) / 0.35 * 0.1)
  assert g["throughput"]["S"] == pytest.approx(2.9 + (0.4 - 0.3) / 0.3 * 0.1)
  assert g["gain"]["S"] == pytest.approx(g["throughput"]["S"] / g["throughput"]["B"])
  assert paper.throughput_at_latency(split, 0.1) == 0.0
