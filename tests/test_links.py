"""costmodel.calibrate_links on synthetic tables (exact arithmetic: latency + size / bandwidth
through the measured points), and a paced run that models its links from a table and records
which table it used. Oracle of the run: tokens equal `fake_generate`."""

import hashlib
import json

import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request

MB = 2**20


def _rows(path, transport, latency, bandwidth, sizes=(MB, 100 * MB)):
  return [{"path": path, "transport": transport, "bytes": n, "seconds": latency + n / bandwidth}
          for n in sizes]


def test_calibrate_links_recovers_latency_and_bandwidth_exactly():
  rows = (_rows("prompt_kv", "object_store", 3e-3, 1e9) + _rows("prompt_kv", "shm", 1e-3, 4e9)
          + _rows("prompt_kv", "memcpy", 1e-6, 9e9)
          + _rows("replica_delta", "shm", 2e-3, 3e9, sizes=(MB, 10 * MB, 100 * MB))
          + _rows("swap_in", "device_put", 5e-5, 7e9) + _rows("weights", "file", 1e-4, 2e9))
  links = cm.calibrate_links({"rows": rows})
  assert set(links) == set(cm.LINK_PATHS)
  # The fastest at the largest size, never the in-process reference.
  assert links["prompt_kv"].name == "prompt_kv:shm"
  for path, (lat, bw) in {"prompt_kv": (1e-3, 4e9), "replica_delta": (2e-3, 3e9),
                          "swap_in": (5e-5, 7e9), "weights": (1e-4, 2e9)}.items():
    assert links[path].latency == pytest.approx(lat, rel=1e-9, abs=1e-12)
    assert links[path].bandwidth == pytest.approx(bw, rel=1e-9)
  assert links["prompt_kv"].transfer_time(50 * MB) == pytest.approx(1e-3 + 50 * MB / 4e9)
  chosen = cm.calibrate_links({"rows": rows}, transports={"prompt_kv": "object_store"})
  assert chosen["prompt_kv"].bandwidth == pytest.approx(1e9)
  assert chosen["prompt_kv"].latency == pytest.approx(3e-3)
  # A GPU's table replaces the paths it has, and only those.
  gpu = cm.calibrate_links({"rows": rows},
                           gpu_table={"rows": _rows("swap_in", "device_put", 1e-5, 50e9)})
  assert gpu["swap_in"].bandwidth == pytest.approx(50e9)
  assert gpu["prompt_kv"].bandwidth == pytest.approx(4e9)


@pytest.mark.parametrize("table,kw,match", [
    ({"rows": _rows("prompt_kv", "shm", 1e-3, 1e9, sizes=(MB,))}, {}, "two sizes"),
    ({"rows": _rows("disk", "shm", 1e-3, 1e9)}, {}, "unknown link path"),
    ({"rows": [{"path": "prompt_kv", "bytes": MB, "seconds": 1.0}]}, {}, "transport"),
    ({"rows": _rows("prompt_kv", "shm", 1e-3, 1e9)}, {"transports": {"prompt_kv": "rdma"}},
     "no measurements over transport 'rdma'"),
    ({"rows": _rows("prompt_kv", "shm", 1e-3, 1e9)}, {"transports": {"swap_in": "device_put"}},
     "no rows for path"),
    ({"rows": [{"path": "prompt_kv", "transport": "shm", "bytes": MB, "seconds": 2.0},
               {"path": "prompt_kv", "transport": "shm", "bytes": 2 * MB, "seconds": 1.0}]},
     {}, "does not grow with size"),
    ({"rows": []}, {}, "no rows"),
])
def test_calibrate_links_names_what_is_wrong(table, kw, match):
  with pytest.raises(cm.LinkTableError, match=match):
    cm.calibrate_links(table, **kw)


def test_load_link_table_names_a_bad_file(tmp_path):
  bad = tmp_path / "links.json"
  bad.write_text("{not json")
  with pytest.raises(cm.LinkTableError, match="not JSON"):
    cm.load_link_table(str(bad))
  with pytest.raises(cm.LinkTableError, match="cannot read"):
    cm.load_link_table(str(tmp_path / "missing.json"))


@pytest.mark.timeout(120)
def test_paced_run_models_the_tables_stream_and_records_it(tmp_path):
  """Every prompt layer's KV crosses a measured 50 ms link: the first token cannot come before
  the layers' transfers (streamed_prompt_time), and the summary names the table by hash."""
  cfg = tiny_config("opt", num_layers=6, max_positions=128)
  rows = (_rows("prompt_kv", "shm", 0.05, 1e12) + _rows("swap_in", "device_put", 1e-6, 1e12))
  path = tmp_path / "links.json"
  path.write_text(json.dumps({"kind": "measured", "rows": rows}))
  reqs = [Request(i, 0.0, (3 + i, 9, 4), 4) for i in range(3)]
  cost = cm.TableCostModel(cfg, prompt=1e-4, token=1e-4)
  sc = ServeConfig(prompt_stages=1, token_stages=1, microbatch_size=3, max_len=32,
                   program="fake", pacing="paced", links_table=str(path), heartbeat_s=0.05,
                   heartbeat_timeout_s=5.0)
  with PipelineEngine(cfg, None, sc, cost_model=cost) as eng:
    res = eng.serve(reqs)
  assert res.tokens() == {r.request_id: fake_generate(cfg, [r.prompt], 4)[0] for r in reqs}
  first = min(r.first_token for r in res.records)
  assert first >= 6 * 0.05 * 0.95, first
  assert res.summary["links_table"] == {
      "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_a_bad_links_table_is_refused_before_serving(tmp_path):
  cfg = tiny_config("opt", num_layers=2, max_positions=64)
  path = tmp_path / "links.json"
  path.write_text(json.dumps({"rows": _rows("prompt_kv", "shm", 1e-3, 1e9, sizes=(MB,))}))
  with pytest.raises(cm.LinkTableError, match="two sizes"):
    PipelineEngine(cfg, None, ServeConfig(num_stages=1, program="fake", max_len=32,
                                          links_table=str(path)))
