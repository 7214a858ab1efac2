"""Tests of the request metrics: exact numbers on hand-made records, files, plot."""

import math
import types

import pytest

from dejavu_jax import metrics as mx
from dejavu_jax.studies import reporting


def _records() -> list[mx.RequestRecord]:
  """Three finished requests and one unfinished, with numbers easy to follow by hand.

      id  arrival  first  finish  n  prompt  ttft  tpot          e2e  norm = e2e/n
      0   0        1      4       4  10      1     (4-1)/3 = 1   4    1
      1   1        3      5       2  20      2     (5-3)/1 = 2   4    2
      2   2        5      14      4  30      3     (14-5)/3 = 3  12   3
      3   3        4      -       1  40      (unfinished: left out of every latency)

  Duration: first arrival 0 to last finish 14 = 14 s. Finished: 3 requests, 10 output tokens,
  60 prompt tokens. Request 0 kept token times 1, 2, 3, 4 (ITL 1, 1, 1), request 1 kept 3, 5
  (ITL 2): ITLs 1, 1, 1, 2.
  """
  return [
      mx.RequestRecord(0, 0.0, 10, first_token=1.0, finish=4.0, output_len=4,
                       tokens=[5, 6, 7, 8], token_times=[1.0, 2.0, 3.0, 4.0]),
      mx.RequestRecord(1, 1.0, 20, first_token=3.0, finish=5.0, output_len=2,
                       token_times=[3.0, 5.0]),
      mx.RequestRecord(2, 2.0, 30, first_token=5.0, finish=14.0, output_len=4),
      mx.RequestRecord(3, 3.0, 40, first_token=4.0, output_len=1, recomputed_tokens=5),
  ]


def test_summary_exact_numbers():
  s = mx.summarize(_records())
  assert s["num_requests"] == 4 and s["completed"] == 3 and s["num_unfinished"] == 1
  assert s["duration"] == 14.0
  assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 10)
  assert s["total_recomputed_tokens"] == 5
  assert s["request_throughput"] == pytest.approx(3 / 14)
  assert s["output_throughput"] == pytest.approx(10 / 14)
  assert s["total_token_throughput"] == pytest.approx(70 / 14)
  # norm = [1, 2, 3]; linear percentiles on 3 points: p95 at rank 0.95 * 2 = 1.9 -> 2 + 0.9 * 1.
  assert s["norm_latency_mean_s_per_tok"] == pytest.approx(2.0)
  assert s["norm_latency_p50_s_per_tok"] == pytest.approx(2.0)
  assert s["norm_latency_p95_s_per_tok"] == pytest.approx(2.9)
  assert s["norm_latency_p99_s_per_tok"] == pytest.approx(2.98)
  # TTFT and TPOT are both [1, 2, 3] s (request 3's TTFT of 1 s is left out: it did not finish).
  for name in ("ttft", "tpot"):
    assert s[f"mean_{name}_ms"] == pytest.approx(2000)
    assert s[f"median_{name}_ms"] == pytest.approx(2000)
    assert s[f"std_{name}_ms"] == pytest.approx(1000 * math.sqrt(2 / 3))
    assert s[f"p95_{name}_ms"] == pytest.approx(2900)
    assert s[f"p99_{name}_ms"] == pytest.approx(2980)
  # E2E = [4, 4, 12] s: mean 20/3, median 4, p95 = 4 + 0.9 * 8 = 11.2.
  assert s["mean_e2el_ms"] == pytest.approx(20000 / 3)
  assert s["median_e2el_ms"] == pytest.approx(4000)
  assert s["p95_e2el_ms"] == pytest.approx(11200)
  # ITL = [1, 1, 1, 2] s.
  assert s["mean_itl_ms"] == pytest.approx(1250)
  assert s["median_itl_ms"] == pytest.approx(1000)


def test_explicit_duration_and_single_token_requests():
  s = mx.summarize(_records(), duration=20.0)
  assert s["duration"] == 20.0 and s["request_throughput"] == pytest.approx(0.15)
  # A one-token request has a TTFT but no TPOT.
  one = [mx.RequestRecord(0, 0.0, 4, first_token=0.5, finish=0.5, output_len=1)]
  s = mx.summarize(one)
  assert s["mean_ttft_ms"] == pytest.approx(500) and math.isnan(s["mean_tpot_ms"])
  assert s["norm_latency_p50_s_per_tok"] == pytest.approx(0.5)


def test_nothing_finished():
  for records in ([], [mx.RequestRecord(0, 0.0, 4, first_token=1.0, output_len=1)]):
    s = mx.summarize(records)
    assert s["completed"] == 0 and s["num_unfinished"] == len(records)
    assert math.isnan(s["request_throughput"]) and math.isnan(s["norm_latency_p50_s_per_tok"])
    assert math.isnan(s["p99_ttft_ms"])


def test_duck_typed_records_with_nan_for_missing():
  # The simulator's records say "not yet" with NaN and have no token times.
  recs = [types.SimpleNamespace(arrival=0.0, prompt_len=8, first_token=1.0, finish=3.0,
                                output_len=3),
          types.SimpleNamespace(arrival=1.0, prompt_len=8, first_token=math.nan,
                                finish=math.nan, output_len=5)]
  s = mx.summarize(recs)
  assert s["completed"] == 1 and s["num_unfinished"] == 1 and s["duration"] == 3.0
  assert s["norm_latency_p50_s_per_tok"] == pytest.approx(1.0)
  assert s["mean_tpot_ms"] == pytest.approx(1000) and "mean_itl_ms" not in s  # no NaN ITL


def test_goodput_counts_requests_within_both_slos():
  # ttft 1 s / tpot 1 s; ttft 0.5 s / tpot 2 s; ttft 0.2 s, single token (no tpot); unfinished.
  recs = [types.SimpleNamespace(arrival=0.0, prompt_len=8, first_token=1.0, finish=3.0,
                                output_len=3),
          types.SimpleNamespace(arrival=0.0, prompt_len=8, first_token=0.5, finish=4.5,
                                output_len=3),
          types.SimpleNamespace(arrival=0.0, prompt_len=8, first_token=0.2, finish=0.2,
                                output_len=1),
          types.SimpleNamespace(arrival=0.0, prompt_len=8, first_token=math.nan,
                                finish=math.nan, output_len=5)]
  s = mx.summarize(recs, duration=10.0, slo_ttft_ms=800, slo_tpot_ms=1500)
  assert s["request_goodput"] == pytest.approx(0.1) and s["slo_attainment"] == 0.25
  s = mx.summarize(recs, duration=10.0, slo_tpot_ms=1500)
  assert s["request_goodput"] == pytest.approx(0.2)
  assert "request_goodput" not in mx.summarize(recs)


def test_jsonl_round_trip(tmp_path):
  path = tmp_path / "run" / "requests.jsonl"
  mx.write_jsonl(path, _records())
  lines = path.read_text().splitlines()
  assert len(lines) == 4 and '"finish": null' in lines[3]
  assert mx.read_jsonl(path) == _records()


def test_read_jsonl_rejects_other_objects(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"request_id": 0, "arrival": 0.0, "prompt_len": 3, "note": "ok"}\n'
                  '{"arrival": 1.0}\n')
  with pytest.raises(ValueError, match=":2:"):
    mx.read_jsonl(path)


def test_format_summary():
  text = mx.format_summary(mx.summarize(_records()), title="run")
  assert text.startswith("run\n")
  line = next(x for x in text.splitlines() if x.startswith("request_throughput"))
  assert "0.214286" in line and line.endswith("req/s")
  assert "norm_latency_p99_s_per_tok" in text and "s/token" in text


def test_plot_latency_vs_rate(tmp_path):
  rows = []
  for system, scale in (("baseline", 2.0), ("dejavu", 1.0)):
    for rate in (0.5, 1.0, 2.0):
      rows.append({"system": system, "rate": rate, "norm_latency_p50_s_per_tok": scale * rate,
                   "norm_latency_p99_s_per_tok": 2 * scale * rate})
  path = reporting.plot_latency_vs_rate(rows, tmp_path / "fig" / "latency.png", title="t", log_y=True)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="rate"):
    reporting.plot_latency_vs_rate([{"norm_latency_p50_s_per_tok": 1.0}], tmp_path / "x.png")



def _capture_figures(monkeypatch) -> list:
  """The (figure, axes) of every chart reporting draws, taken just before it is saved."""
  seen = []
  finish = reporting._finish_figure

  def capture(fig, ax, *a, **kw):
    out = finish(fig, ax, *a, **kw)
    seen.append((fig, ax))
    return out
  monkeypatch.setattr(reporting, "_finish_figure", capture)
  return seen


def test_failure_timeline_keeps_coinciding_curves_and_labels_failures(tmp_path, monkeypatch):
  """Issue 21: two strategies with the same timeline hid one line under the other, and the
  failure marks had no label. Every run keeps its own visible line, the failure-free baseline is
  drawn, the failures are named in the legend, warnings are printed on the figure."""
  seen = _capture_figures(monkeypatch)
  same = _records()
  runs = {"failure-free (seed 0)": same, "reprefill (seed 0)": same, "replica (seed 0)": same}
  reporting.plot_failure_timeline(runs, tmp_path / "t.png", failure_times=[2.0],
                                  failure_labels=["stage 1 fails at 2 s"],
                                  notes=["the failure hit no work"])
  fig, ax = seen[-1]
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels[:3] == list(runs) and "failure injected" in labels
  lines = {l.get_label(): l for l in ax.get_lines()}
  rep, rpl = lines["reprefill (seed 0)"], lines["replica (seed 0)"]
  # The same data, drawn apart on screen (offset) and with different markers and dashes.
  assert rep.get_marker() != rpl.get_marker() and rep.get_linestyle() != rpl.get_linestyle()
  fig.canvas.draw()
  assert (rep.get_transform().transform((1.0, 1.0)) !=
          rpl.get_transform().transform((1.0, 1.0))).all()
  assert any("stage 1 fails at 2 s" in t.get_text() for t in ax.texts)
  assert any("the failure hit no work" in t.get_text() for t in fig.texts)
  # Per-run failure times (failures placed by step fire at different times in each run).
  reporting.plot_failure_timeline(runs, tmp_path / "u.png",
                                  failure_times={"replica (seed 0)": [1.5]})
  labels = [t.get_text() for t in seen[-1][1].get_legend().get_texts()]
  assert "replica (seed 0): failure at 1.50 s" in labels


def test_bars_are_linear_labelled_and_clear_of_the_legend(tmp_path, monkeypatch):
  seen = _capture_figures(monkeypatch)
  reporting.plot_bars(["a", "b"], {"failure-free": [1.0, 2.0], "replica": [3.0, 400.0]},
                      str(tmp_path / "b.png"), ylabel="s", baseline="failure-free", title="t")
  fig, ax = seen[-1]
  assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  legend = ax.get_legend().get_window_extent(renderer)
  for patch in ax.patches:
    assert not legend.overlaps(patch.get_window_extent(renderer))
  values = [t.get_text() for t in ax.texts]
  assert {"1", "2", "3", "400"} <= set(values)
