"""experiments/serve.py's comparison and run hygiene: several strategies on one compiled engine,
the same requests and failure for each, tokens identical to the oracle; configs validated before
anything is built; results never mixed with an earlier run's."""

import json
import os
import subprocess
import sys

import pytest

from configs import serve, serve_tiny
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.studies import runconfig
from dejavu_jax.studies import runner
from dejavu_jax.studies import runrecord
from dejavu_jax.metrics import read_jsonl
from dejavu_jax.workload import WorkloadConfig, make_workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("restart", "reprefill", "replica,snapshot,reprefill")


def _fake_config():
  c = serve_tiny.get_config()
  c.program = "fake"
  c.rates = (20.0,)
  c.num_requests = 6
  c.output_len = "fixed:10"
  c.fail_times = (0.05,)
  return c


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_strategies_share_one_engine_requests_and_failure(tmp_path, monkeypatch):
  c = _fake_config()
  c.recovery = "(" + ",".join(f'"{s}"' for s in STRATEGIES) + ")"   # a chain stays one strategy
  c.seeds = (0, 1)
  built = []
  real_engine = runner.make_engine

  def counting_engine(*a, **kw):
    built.append(1)
    return real_engine(*a, **kw)
  monkeypatch.setattr(runner, "make_engine", counting_engine)
  every = runner.run_experiment(c, str(tmp_path), log=None)
  assert len(built) == 1   # one engine (one compile) for every strategy
  base = [s for s in every if s["baseline"]]   # the failure-free baseline, per seed, first
  summaries = [s for s in every if not s["baseline"]]
  assert every[:2] == base and [(s["strategy"], s["seed"], s.get("failures", 0)) for s in base] == [
      ("failure-free", 0, 0), ("failure-free", 1, 0)]
  assert all(isinstance(s["warnings"], list) for s in every)
  assert [(s["strategy"], s["seed"]) for s in summaries] == [
      (st, seed) for st in STRATEGIES for seed in (0, 1)]
  cfg, _ = runner.build_model(c)
  for seed in (0, 1):
    reqs = make_workload(WorkloadConfig(rate=20.0, num_requests=6, prompt_len=c.prompt_len,
                                        output_len=c.output_len, vocab_size=cfg.vocab_size,
                                        seed=seed, max_output=c.max_output))
    oracle = fake_generate(cfg, [r.prompt for r in reqs], 10)
    arrivals = None
    for st in STRATEGIES:
      recs = read_jsonl(tmp_path / f"requests_{st.replace(',', '+')}_seed{seed}_rate20.jsonl")
      assert [r.request_id for r in recs] == [r.request_id for r in reqs]
      assert [r.tokens for r in recs] == oracle, st   # identical to the oracle
      arrivals = arrivals or [r.arrival for r in recs]
      assert [r.arrival for r in recs] == arrivals     # the same requests for every strategy
  for s in summaries:   # every row says what it was
    assert s["injected_failures"] == [[1, 0.05]] and s["failures"] == 1
    assert s["pacing"] == "real" and s["commit"]
    assert s["config"]["program"] == "fake" and s["completed"] == 6
  with open(tmp_path / "recoveries.jsonl") as f:
    events = [json.loads(line) for line in f]
  assert sorted({(e["strategy"], e["seed"]) for e in events}) == sorted(
      (st, seed) for st in STRATEGIES for seed in (0, 1))
  assert all(e["stage"] == 1 for e in events)
  info = json.loads((tmp_path / "run.json").read_text())
  assert info["strategies"] == list(STRATEGIES) and info["config"]["seeds"] == [0, 1]
  table = (tmp_path / "comparison.md").read_text()
  assert all(f"| {st} | 20 | 2 |" in table for st in STRATEGIES + ("failure-free",))
  assert "only 2 seed(s)" in table   # the validity warning is in the file, not only printed
  assert (tmp_path / "failure_timeline.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mechanism", ["disaggregation", "swapping"])
def test_mechanisms_from_the_serve_config(tmp_path, mechanism):
  """experiments/serve.py's config selects disaggregation (prompt + token stages; failures
  number the prompt stages first) or swapping under a device KV budget; two strategies are
  compared on one engine, tokens identical to the oracle."""
  c = _fake_config()
  c.recovery = "(restart,replica)"
  if mechanism == "disaggregation":
    c.prompt_stages, c.token_stages = 1, 2
    c.fail_stages = (2,)   # the last token stage
  else:
    c.swapping = "on"
    c.microbatch_size = 2
  summaries = runner.run_experiment(c, str(tmp_path), log=None)
  summaries = [s for s in summaries if not s["baseline"]]
  assert [s["strategy"] for s in summaries] == ["restart", "replica"]
  cfg, _ = runner.build_model(c)
  reqs = make_workload(WorkloadConfig(rate=20.0, num_requests=6, prompt_len=c.prompt_len,
                                      output_len=c.output_len, vocab_size=cfg.vocab_size,
                                      seed=c.seed, max_output=c.max_output))
  oracle = fake_generate(cfg, [r.prompt for r in reqs], 10)
  for st in ("restart", "replica"):
    recs = read_jsonl(tmp_path / f"requests_{st}_rate20.jsonl")
    assert [r.tokens for r in recs] == oracle, st
  assert all(s["failures"] == 1 and s["completed"] == 6 for s in summaries)


def test_strategies_of_keeps_a_chain_one_strategy():
  assert runconfig.strategies_of("replica,snapshot,reprefill") == ("replica,snapshot,reprefill",)
  assert runconfig.strategies_of("(restart,replica)") == ("restart", "replica")
  assert runconfig.strategies_of('("replica,reprefill", restart)') == ("replica,reprefill",
                                                                       "restart")
  assert runconfig.strategies_of(("restart", "snapshot")) == ("restart", "snapshot")
  assert runconfig.strategies_of("['replica,snapshot', reprefill]") == ("replica,snapshot",
                                                                        "reprefill")


@pytest.mark.parametrize("field,value", [
    ("fail_stages", (5,)), ("recovery", "(restart,pray)"), ("rates", ()),
    ("heartbeat_timeout_s", 0.01), ("mode", "batch"), ("num_stages", 9), ("max_len", 4096),
    ("output_len", "zipf:3"), ("slo_ttft_ms", -1.0), ("model", "opt_7t")])
def test_bad_config_fails_before_anything_is_built(tmp_path, monkeypatch, field, value):
  def no_build(c):
    raise AssertionError("the model was built before the config was validated")
  monkeypatch.setattr(runner, "build_model", no_build)
  c = _fake_config()
  c[field] = value
  out = tmp_path / "out"
  with pytest.raises(runconfig.ConfigError) as e:
    runner.run_experiment(c, str(out), log=None)
  assert e.value.field == field and f"config.{field}" in str(e.value)
  assert not out.exists()   # no empty output directory left behind


def test_nonempty_output_dir_is_refused_unless_overwrite(tmp_path, monkeypatch):
  class Built(Exception):
    pass

  def build(c):
    raise Built
  monkeypatch.setattr(runner, "build_model", build)
  (tmp_path / "summary.jsonl").write_text("{}\n")
  (tmp_path / "keep").mkdir()
  with pytest.raises(runrecord.OutputDirError, match="--overwrite"):
    runner.run_experiment(_fake_config(), str(tmp_path), log=None)
  with pytest.raises(Built):   # with overwrite it gets past the check, old results deleted
    runner.run_experiment(_fake_config(), str(tmp_path), log=None, overwrite=True)
  assert not (tmp_path / "summary.jsonl").exists() and (tmp_path / "keep").is_dir()
  assert json.loads((tmp_path / "run.json").read_text())["config"]["program"] == "fake"


def test_every_field_is_described():
  for c in (serve.get_config(), serve_tiny.get_config()):
    text = runconfig.describe(c)
    assert "(undocumented)" not in text
    for key in c.keys():
      assert f"\n{key} " in text


def test_cli_usage_error_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.serve", "--config=configs/serve_tiny.py",
       "--config.fail_stages=(5,)", f"--output_dir={tmp_path / 'x'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.fail_stages" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "x").exists()


def test_share_devices_lays_every_stage_on_the_same_devices():
  c = _fake_config()
  with pytest.raises(runconfig.ConfigError, match="share_devices"):
    runconfig.validate(c, num_devices=1)       # 2 stages, 1 device (e.g. one GPU)
  c.share_devices = True
  runconfig.validate(c, num_devices=1)
