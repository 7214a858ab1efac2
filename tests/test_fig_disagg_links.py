"""Fig 8's link-sensitivity panel on a measured link table (experiments/fig_disagg_sim.py): the
table is found where benchmarks/transport.py writes it, its prompt_kv link is simulated as one
more point, and the rows and the headline name the table (or say the links were constants)."""

import json
import os

import pytest

from configs import fig_disagg_sim as config
from dejavu_jax import costmodel as cm
from experiments import fig_disagg_sim as fig

MB = 2**20


def _table(path, gbps, latency_s):
  """A table whose prompt_kv rows are latency + size / bandwidth exactly (calibrate_links fits
  them back), beside a faster in-process reference that must not be chosen."""
  rows = [{"path": "prompt_kv", "transport": t, "bytes": b,
           "seconds": lat + b / (g * 1e9 / 8)}
          for t, g, lat in (("shm", gbps, latency_s), ("memcpy", 100 * gbps, 0.0))
          for b in (MB, 100 * MB)]
  path.write_text(json.dumps({"kind": "measured", "rows": rows}))
  return path


def _config(links_table):
  c = config.get_config("tiny")
  c.loads = (0.5,)
  c.num_requests = 16
  c.sensitivity_gbps = (1.0, 40.0)
  c.links_table = links_table
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The tiny figure with a measured table whose prompt_kv link is the 1 Gbps constant's
  (paper.link_gbps: + 50 us)."""
  d = tmp_path_factory.mktemp("links")
  path = _table(d / "links.json", 1.0, 50e-6)
  return path, fig.run(_config(str(path)), str(d / "out"), log=lambda *a: None)


def _sens(rows, source, gbps=None):
  return {r["system"]: r for r in rows
          if r.get("kind") == "link_sensitivity" and r["link_source"] == source
          and (gbps is None or r["link_gbps"] == gbps)}


def test_the_measured_link_is_what_the_simulator_ran(run):
  path, rows = run
  slow, fast, meas = _sens(rows, "constant", 1.0), _sens(rows, "constant", 40.0), _sens(
      rows, "measured")
  assert meas and set(meas) == set(slow) == set(fast)   # every feasible split at each link
  # The link matters in this scenario: 1 Gbps costs some split capacity against 40 Gbps...
  assert any(slow[s]["capacity_rps"] < 0.99 * fast[s]["capacity_rps"] for s in slow)
  for system, r in meas.items():
    assert r["link"] == "prompt_kv:shm"   # the fastest real transport, not the reference
    assert r["link_gbps"] == pytest.approx(1.0)
    assert r["link_latency_s"] == pytest.approx(50e-6, abs=1e-9)
    # ... and the measured link, fitted to the same parameters, gives the 1 Gbps capacities.
    assert r["capacity_rps"] == pytest.approx(slow[system]["capacity_rps"], rel=1e-9)
    assert r["planner_pick"] == slow[system]["planner_pick"]
    assert r["links_table"] == cm.link_table_record(str(path))
  assert all(r["links_table"] is None for r in _sens(rows, "constant").values())
  head = fig.headline(rows)
  assert f"links: measured table {os.path.abspath(str(path))}" in head
  assert "at the measured link (prompt_kv:shm 1.0 Gbps + 0.05 ms)" in head


def test_which_table_is_used(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = _config("auto")
  assert fig.links_table_path(c) is None           # no table written yet: constants only
  assert "constant links only (no measured table" in fig.setting(c)
  _table(tmp_path / "x.json", 20.0, 1e-3)
  os.makedirs(os.path.dirname(cm.DEFAULT_LINK_TABLE))
  os.replace(tmp_path / "x.json", cm.DEFAULT_LINK_TABLE)
  assert fig.links_table_path(c) == cm.DEFAULT_LINK_TABLE   # where transport.py writes it
  assert cm.DEFAULT_LINK_TABLE in fig.setting(c)
  assert fig.links_table_path(_config("none")) is None
  with pytest.raises(cm.LinkTableError, match="nowhere.json"):
    fig.links_table_path(_config("nowhere.json"))
  no_kv = tmp_path / "no_kv.json"
  no_kv.write_text(json.dumps({"rows": [{"path": "weights", "transport": "file", "bytes": b,
                                         "seconds": b / 1e9} for b in (MB, 100 * MB)]}))
  with pytest.raises(cm.LinkTableError, match="no prompt_kv rows"):
    fig.measured_link(_config(str(no_kv)))


def test_the_default_uses_the_table_when_it_exists():
  assert config.get_config().links_table == "auto"
  assert config.get_config("tiny").links_table == "none"   # tests do not read results/
