"""A randomized failure campaign against the public serving API, with an oracle per run.

Each scenario draws a pipeline depth, a microbatch size, a recovery strategy (or chain), a failure
kind (crash or stall), a pattern (one stage; two adjacent stages at once or a few steps apart; a
first failure and a second one during its recovery, which may be the holder of the replica being
read) and the stages (stage 0 and the last stage included), injects it through the runtime at a
random step of the worker, and serves a small open-loop workload on the fake stage program
(`pipeline/fake.py`, paced so the pipeline behaves as a slow one). Oracle: every request
completes, and its tokens equal `fake_generate` (exact for every strategy: the fake model has no
near-ties, so `reprefill` is exact too). A scenario that raises or does not finish within its
deadline is a hang.

Engines are built once per (depth, microbatch, strategy) and reused across that group's
scenarios (replaced workers and all), which is also what a long-running server sees.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request

PATTERNS = ("single", "adjacent", "close", "during_recovery")


@dataclasses.dataclass
class Scenario:
  depth: int
  microbatch: int
  strategy: str
  kind: str
  pattern: str
  failures: tuple


def draw_scenarios(c, rng: np.random.Generator) -> list[Scenario]:
  out = []
  for _ in range(c.injections):
    d = int(rng.choice(c.depths))
    b = int(rng.choice(c.microbatch_sizes))
    strategy = str(rng.choice(c.strategies))
    kind = str(rng.choice(c.kinds))
    pattern = str(rng.choice(PATTERNS))
    s = int(rng.integers(0, d))
    at = int(rng.integers(c.min_step, c.max_step + 1))
    first = FailureSpec(stage=s, after_steps=at, kind=kind, stall_s=c.stall_s if kind == "stall"
                        else 0.0)
    nxt = (s + 1) % d
    if pattern == "single" or d == 1:
      fs = (first,)
    elif pattern == "adjacent":
      fs = (first, dataclasses.replace(first, stage=nxt))
    elif pattern == "close":
      fs = (first, FailureSpec(stage=nxt, after_steps=at + int(rng.integers(1, 6))))
    else:   # the successor (the replica's holder) or another stage dies mid-recovery
      other = nxt if rng.random() < 0.5 else int(rng.integers(0, d))
      fs = (first, FailureSpec(stage=other, during_recovery=True))
    out.append(Scenario(d, b, strategy, kind, pattern, fs))
  return out


def _workload(c, rng: np.random.Generator, cfg) -> list[Request]:
  reqs = []
  for i in range(c.requests):
    n = int(rng.integers(2, c.max_prompt + 1))
    prompt = tuple(int(t) for t in rng.integers(3, cfg.vocab_size, n))
    reqs.append(Request(i, c.arrival_gap_s * i, prompt, int(rng.integers(c.min_new, c.max_new + 1))))
  return reqs


def run_campaign(c, log=print) -> dict:
  """Runs every scenario of config `c` (see configs/campaign_tiny.py); returns the report."""
  cfg = tiny_config("opt", num_layers=c.num_layers, max_positions=c.max_len)
  rng = np.random.default_rng(c.seed)
  scenarios = draw_scenarios(c, rng)
  groups = collections.defaultdict(list)
  for sc in scenarios:
    groups[(sc.depth, sc.microbatch, sc.strategy)].append(sc)
  by = {k: collections.Counter() for k in ("strategy", "pattern", "kind", "depth")}
  totals = collections.Counter()
  examples = []
  t0 = time.perf_counter()
  for (d, b, strategy), group in sorted(groups.items()):
    cost = TableCostModel(cfg, prompt=c.prompt_step_s * d / cfg.num_layers,
                          token=c.token_step_s * d / cfg.num_layers)
    serve = ServeConfig(num_stages=d, microbatch_size=b, max_len=c.max_len, program="fake",
                        pacing="paced", recovery=strategy, heartbeat_s=c.heartbeat_s,
                        heartbeat_timeout_s=c.heartbeat_timeout_s,
                        progress_timeout_s=c.progress_timeout_s, snapshot_every=c.snapshot_every,
                        step_timeout_s=c.deadline_s)
    with PipelineEngine(cfg, None, serve, cost_model=cost) as eng:
      eng.warmup()
      for sc in group:
        reqs = _workload(c, rng, cfg)
        ref = {r.request_id: fake_generate(cfg, [r.prompt], r.max_new_tokens)[0] for r in reqs}
        start = time.perf_counter()
        ok_done = ok_same = hang = False
        error = None
        try:
          res = eng.serve(reqs, failures=sc.failures)
          toks = res.tokens()
          ok_done = all(len(toks.get(r.request_id, ())) == r.max_new_tokens for r in reqs)
          ok_same = toks == ref
          totals["recoveries"] += len(res.recoveries)
          totals["untriggered"] += not res.recoveries   # the run ended before the failure
          totals["recomputed_tokens"] += sum(ev.recomputed_tokens for ev in res.recoveries)
        except Exception as e:  # pylint: disable=broad-except
          hang = isinstance(e, TimeoutError)
          error = f"{type(e).__name__}: {e}"
        totals["runs"] += 1
        totals["failures_injected"] += len(sc.failures)
        totals["completed"] += ok_done
        totals["identical"] += ok_same
        totals["hangs"] += hang
        for key, val in (("strategy", strategy), ("pattern", sc.pattern), ("kind", sc.kind),
                         ("depth", str(d))):
          by[key][f"{val}:runs"] += 1
          by[key][f"{val}:completed"] += ok_done
          by[key][f"{val}:identical"] += ok_same
        if not (ok_done and ok_same) and len(examples) < 10:
          examples.append({"depth": d, "microbatch": b, "strategy": strategy,
                           "failures": [f.describe() for f in sc.failures],
                           "error": error, "completed": ok_done, "identical": ok_same})
        if c.verbose:
          log(f"  D={d} B={b} {strategy:28s} {sc.pattern:16s} "
              f"{'; '.join(f.describe() for f in sc.failures):60s} "
              f"{'ok' if ok_done and ok_same else 'FAIL'} {time.perf_counter() - start:.2f} s")
      log(f"group D={d} B={b} {strategy}: {len(group)} scenarios, "
          f"{totals['runs']}/{len(scenarios)} done, {time.perf_counter() - t0:.0f} s")
  n = max(totals["runs"], 1)

  def table(counter):
    out = {}
    for key, v in counter.items():
      name, field = key.rsplit(":", 1)
      out.setdefault(name, {})[field] = v
    return out

  return {
      "injections": totals["runs"],
      "failures_injected": totals["failures_injected"],
      "completed_fraction": totals["completed"] / n,
      "identical_fraction": totals["identical"] / n,
      "hangs": totals["hangs"],
      "recoveries": totals["recoveries"],
      "untriggered": totals["untriggered"],
      "recomputed_tokens": totals["recomputed_tokens"],
      "by_strategy": table(by["strategy"]),
      "by_pattern": table(by["pattern"]),
      "by_kind": table(by["kind"]),
      "by_depth": table(by["depth"]),
      "failed_examples": examples,
      "wall_s": round(time.perf_counter() - t0, 1),
      "seed": c.seed,
  }
