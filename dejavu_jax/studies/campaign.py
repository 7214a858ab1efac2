"""A randomized failure campaign against the public serving API, with an oracle per run, that
reports what happened rather than what was configured.

Each scenario draws
  program     the fake stage program (`pipeline/fake.py`), a real tiny transformer with random
              weights scaled so its greedy outputs vary (`real_model_params`), or, on a few
              scenarios, SmolLM2-135M (the packaged GGUF weights);
  mechanism   colocated, colocated with microbatch swapping, or prompt-token disaggregated
              (failures on the prompt side or the token side; `FailureSpec.stage` numbers the
              prompt stages first);
  runtime     local threads, or Ray actors (a crash is a real SIGKILL of the actor process, a
              stall ends in one when the watchdog sees it; `sigkills` per record; full config
              only);
and a pipeline depth, a microbatch size, a recovery strategy (or chain), a failure kind (crash or
stall) and a pattern (one stage; two adjacent stages at once or a little apart; a first failure
and a second one during its recovery: of the replica's holder, of the stage being restored, or
of another).

Failures are timed so that the configured strategy can do its job: a failure fired 5 ms into a
run, before any orbax save has finished, is handled by the `restart` every chain ends in, and a
campaign timed like that says "snapshot: 100% identical" about runs in which no snapshot was ever
read. So `snapshot` failures fire right after the pipeline's 2nd or 3rd complete snapshot
(`FailureSpec.after_snapshots`) under a slower pacing (a microbatch lives longer than a save
takes), and `replica` failures fire after enough steps that every in-flight microbatch has an
acknowledged replica. A stall must outlast the progress timeout (`check_config`), or the worker
resumes unseen and nothing fires. Such scenarios are `targeted`: for each configured strategy,
the share of its targeted scenarios that fired and lost work in which its first strategy really
handled microbatches (`RecoveryEvent.handled_by`) must reach `c.handled_target`. Patterns a
strategy is not designed to survive (adjacent failures or a replica holder dying for `replica`;
the stage being restored dying mid-load for `replica` and `snapshot`, which the engine then
plans again without them; disaggregated snapshot runs, which refuse snapshot-timed failures) are
run and reported, but not targeted.

Oracle: every request completes, and its tokens equal `fake_generate` (fake program; exact for
every strategy) or the single-device greedy run (real model). `reprefill` recomputes keys and
values in another summation order, so real-model scenarios draw only from the exact strategies
(`c.model_strategies`). A run whose failures never fired (it ended first) is counted apart as
untriggered, never as identical. With `c.cache_oracle` a second oracle sees the caches
(serving/cache_oracle.py): every cache a worker resumed from (a replica or snapshot restore, a
swap-in, a prompt-slot load) must equal, bit for bit, the dead worker's own last step at that
point or else a failure-free run of the same workload on the same token stages
(`cache_identical`: None when the scenario had no such point). `report["ok"]` is False (and the
script exits non-zero) when a target is missed, a run did not complete, a completed run differs
from an oracle, fewer failures fired than `c.min_fired` (the campaign's injections are failures
that fired), or a program, mechanism or runtime drawn had none fire.

What is shared, so that a scenario costs about its own serve (`run_campaign`; `phases_s` in the
report says where the time went): one engine per group (program, mechanism, runtime, shape,
pacing), reused for its scenarios (replaced workers and all, as a long-running server sees them)
and switched between strategies by `set_recovery`, which keeps the compiled steps and, on Ray,
the session's pooled actor processes; workloads from a small pool, so a workload's token oracle
is computed once and its failure-free reference once per token-stage layout (the fake program's
on a plain, unpaced local engine: its cache entries are integers fixed by the tokens and the
stage's layers, whatever the microbatch, mechanism or runtime).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time

import numpy as np

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving import cache_oracle
from dejavu_jax.serving.disagg_engine import make_engine
from dejavu_jax.studies.cli import UsageError
from dejavu_jax.workload import Request

PATTERNS = ("single", "adjacent", "close", "during_recovery")
# Drawn patterns are named more precisely where it matters: a during-recovery failure of the
# successor (the replica's holder) or of the stage whose replacement is being loaded.
ALL_PATTERNS = PATTERNS + ("during_recovery_holder", "during_recovery_loaded")
# Patterns in which the first strategy of the chain can handle the failure by design: a replica
# lives on the successor, so it is gone when both die, or when the holder dies mid-restore; a
# restore whose target dies while it loads is planned again without that strategy
# (serving/recovery.py), so neither a replica nor a snapshot can handle it.
_DESIGNED = {"replica": ("single", "close"),
             "snapshot": tuple(p for p in ALL_PATTERNS if p != "during_recovery_loaded")}


@dataclasses.dataclass
class Scenario:
  program: str          # "fake" | "model" (tiny random) | "smollm2" (SmolLM2-135M's weights)
  mechanism: str        # "colocated" | "swapping" | "disagg"
  runtime: str          # "local" | "ray"
  depth: int            # colocated stages, or token stages when disaggregated
  prompt_depth: int     # prompt stages (disaggregated), else 0
  microbatch: int
  strategy: str
  kind: str
  pattern: str
  side: str             # "prompt" | "token" (the first failure's side; "token" when colocated)
  targeted: bool
  failures: tuple
  workload: int = 0     # index into the campaign's pool of workloads of its kind (`_pool_key`)

  @property
  def own(self) -> str:
    return self.strategy.split(",")[0]

  @property
  def slow(self) -> bool:
    return any(f.after_snapshots is not None for f in self.failures)

  def group(self) -> tuple:
    """Scenarios that share one engine (strategies switch on it: `set_recovery`)."""
    # SmolLM2's pacing is its own whatever the timing (`_cost`): one engine for all of it.
    return (self.program, self.mechanism, self.runtime, self.depth, self.prompt_depth,
            self.microbatch, self.slow and self.program != "smollm2")


def _pick(rng, values):
  return values[int(rng.integers(0, len(values)))]


def _stall_s(c, prefix: str) -> float:
  return c.get(prefix + "stall_s", c.stall_s)


def _spec(kind, c, stage, prefix="", **trigger):
  return FailureSpec(stage=stage, kind=kind,
                     stall_s=_stall_s(c, prefix) if kind == "stall" else 0.0, **trigger)


def _draw_one(c, rng, runtime="local", program=None) -> Scenario:
  program = program or ("model" if rng.random() < c.model_fraction else "fake")
  if program == "smollm2":   # a few scenarios: real compute of a 30-layer model is slow here
    mechanism, d, b = "colocated", 2, 2
    strategy = _pick(rng, tuple(c.smollm2_strategies))
  elif runtime == "ray":
    program, mechanism = "fake", "colocated"
    d, b, strategy = _pick(rng, tuple(c.ray_depths)), 2, _pick(rng, tuple(c.ray_strategies))
  elif program == "model":
    mechanism = _pick(rng, tuple(c.model_mechanisms))
    d, b = _pick(rng, tuple(c.model_depths)), _pick(rng, tuple(c.model_microbatch_sizes))
    strategy = _pick(rng, tuple(c.model_strategies))
  else:
    mechanism = str(rng.choice(c.mechanisms, p=c.mechanism_p))
    d = _pick(rng, tuple(c.disagg_depths if mechanism == "disagg" else c.depths))
    b = _pick(rng, tuple(c.microbatch_sizes if mechanism == "colocated"
                         else c.other_microbatch_sizes))
    strategy = _pick(rng, tuple(c.strategies))
  dp = _pick(rng, tuple(c.prompt_depths)) if mechanism == "disagg" else 0
  prefix = _prefix(runtime, program)
  kind = _pick(rng, tuple(c.kinds))
  pattern = _pick(rng, PATTERNS)
  side = "prompt" if dp and rng.random() < c.prompt_side_p else "token"
  n, lo = (dp, 0) if side == "prompt" else (d, dp)   # the side's stages are lo .. lo + n - 1
  s = int(rng.integers(0, n))
  nxt = (s + 1) % n
  own = strategy.split(",")[0]
  by_snapshot = own == "snapshot" and mechanism != "disagg"
  if by_snapshot:
    at = int(rng.integers(c.snapshot_rounds[0], c.snapshot_rounds[1] + 1))
    first = _spec(kind, c, prefix=prefix, stage=lo + s, after_snapshots=at)
    later = _spec("crash", c, prefix=prefix, stage=lo + nxt, after_snapshots=at + 1)
  elif side == "prompt":   # a prompt worker steps once per microbatch's prefill: a few per run
    at = int(rng.integers(1, c.prompt_max_step + 1))
    first = _spec(kind, c, prefix=prefix, stage=lo + s, after_steps=at)
    later = _spec("crash", c, prefix=prefix, stage=lo + nxt, after_steps=at + 1)
  else:
    least = c.min_step
    if own == "replica":   # after every in-flight microbatch's step was replicated and acked
      least = max(least, c.replica_steps_per_stage * d)
    at = int(rng.integers(least, max(least, c.max_step) + 1))
    first = _spec(kind, c, prefix=prefix, stage=lo + s, after_steps=at)
    later = _spec("crash", c, prefix=prefix, stage=lo + nxt,
                  after_steps=at + int(rng.integers(1, 6)))
  if pattern == "single" or n == 1:
    pattern, fs = "single", (first,)
  elif pattern == "adjacent":
    fs = (first, dataclasses.replace(first, stage=lo + nxt))
  elif pattern == "close":
    fs = (first, later)
  else:   # the successor (the replica's holder) or another stage dies mid-recovery
    other = nxt if rng.random() < 0.5 else int(rng.integers(0, n))
    fs = (first, _spec("crash", c, prefix=prefix, stage=lo + other, during_recovery=True))
    if other == nxt:
      pattern = "during_recovery_holder"
    elif other == s:
      pattern = "during_recovery_loaded"
  designed = _DESIGNED.get(own, ALL_PATTERNS)
  targeted = (side == "token" and pattern in designed and
              (own != "snapshot" or by_snapshot))
  return Scenario(program, mechanism, runtime, d, dp, b, strategy, kind, pattern, side, targeted,
                  fs, int(rng.integers(0, _pool_size(c, program))))


def draw_scenarios(c, rng: np.random.Generator) -> list[Scenario]:
  out = [_draw_one(c, rng) for _ in range(c.scenarios)]
  out += [_draw_one(c, rng, "ray") for _ in range(c.get("ray_scenarios", 0))]
  out += [_draw_one(c, rng, program="smollm2") for _ in range(c.get("smollm2_scenarios", 0))]
  return out


def real_model_params(cfg, seed: int, scale: float):
  """Random weights whose greedy outputs vary: at flax's default init a tiny OPT's logits are
  nearly flat and greedy decoding repeats one token ("15 15 15 ..."), which cannot tell a
  resumed cache from a wrong one. Scaling every matrix sharpens the logits."""
  import jax  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.decoder import init_params  # pylint: disable=g-import-not-at-top
  params = init_params(cfg, jax.random.key(seed))
  return jax.tree.map(lambda a: a * scale if a.ndim >= 2 else a, params)


def _pool_key(sc: Scenario) -> tuple:
  """Scenarios whose workloads come from one pool: (vocabulary, long outputs). SmolLM2's
  greedy oracle is slow, so all its scenarios share one pool of the long (snapshot) kind."""
  return ("smollm2", True) if sc.program == "smollm2" else ("tiny", sc.slow)


def _pool_size(c, program: str) -> int:
  return c.smollm2_workload_pool if program == "smollm2" else c.workload_pool


def _workloads(c, cfg, slow: bool, seed: tuple, size: int) -> list[list[Request]]:
  """`size` open-loop workloads (requests `arrival_gap_s` apart). Scenarios draw from a pool,
  so the oracles of a workload (its tokens; the failure-free run's caches for a stage layout)
  are computed once and shared by every scenario that serves it."""
  rng = np.random.default_rng(seed)
  lo, hi = (c.slow_min_new, c.slow_max_new) if slow else (c.min_new, c.max_new)
  pool = []
  for _ in range(size):
    reqs = []
    for i in range(c.requests):
      n = int(rng.integers(2, c.max_prompt + 1))
      prompt = tuple(int(t) for t in rng.integers(3, cfg.vocab_size, n))
      reqs.append(Request(i, c.arrival_gap_s * i, prompt, int(rng.integers(lo, hi + 1))))
    pool.append(reqs)
  return pool


def _prefix(runtime: str, program: str) -> str:
  """The config prefix of a scenario's timeouts and stall length: Ray actors and SmolLM2's real
  steps can hold a worker silent for longer than the fake program's timeouts (a compile, a
  loaded machine), and a death declared then is spurious."""
  if runtime == "ray":
    return "ray_"
  return "smollm2_" if program == "smollm2" else ""


def check_config(c) -> None:
  """A stall no longer than the progress timeout is never detected: the stalled worker resumes
  and the scenario ends untriggered (the Ray scenarios of an earlier default config did, their
  5 s stalls against a 5 s timeout). Refuses such a config by name (a `UsageError`: one line,
  exit 2 from the main, under --help too)."""
  if "stall" not in tuple(c.kinds):
    return
  for prefix in ("", "ray_", "smollm2_"):
    timeout, stall = c.get(prefix + "progress_timeout_s"), _stall_s(c, prefix)
    if timeout is not None and not stall >= c.stall_over_timeout * timeout:
      raise UsageError(
          f"campaign config: {prefix}stall_s ({stall:g} s) must be at least stall_over_timeout "
          f"({c.stall_over_timeout:g}) x {prefix}progress_timeout_s ({timeout:g} s), or the "
          "progress watchdog never sees the stall and its scenarios stay untriggered")


def _serve_config(c, sc: Scenario, colocated: bool = False) -> ServeConfig:
  """The scenario's engine config (`colocated`: the same token stages without a prompt
  pipeline, the cache oracle's reference for a disaggregated scenario)."""
  shape = (dict(prompt_stages=sc.prompt_depth, token_stages=sc.depth)
           if sc.mechanism == "disagg" and not colocated else dict(num_stages=sc.depth))
  slow = _prefix(sc.runtime, sc.program)
  return ServeConfig(microbatch_size=sc.microbatch, max_len=c.max_len,
                     program="fake" if sc.program == "fake" else "model",
                     pacing="paced", recovery=sc.strategy, heartbeat_s=c.heartbeat_s,
                     heartbeat_timeout_s=c[slow + "heartbeat_timeout_s"],
                     progress_timeout_s=c[slow + "progress_timeout_s"],
                     snapshot_every=c.snapshot_every, step_timeout_s=c.deadline_s,
                     swapping="on" if sc.mechanism == "swapping" else "off",
                     runtime=sc.runtime, cache_probe=bool(c.get("cache_oracle", False)),
                     **shape)


def _record(sc: Scenario) -> dict:
  return {"program": sc.program, "mechanism": sc.mechanism, "runtime": sc.runtime,
          "depth": sc.depth, "prompt_depth": sc.prompt_depth, "microbatch": sc.microbatch,
          "strategy": sc.strategy, "kind": sc.kind, "pattern": sc.pattern, "side": sc.side,
          "targeted": sc.targeted, "failures": [f.describe() for f in sc.failures],
          "specified": len(sc.failures), "workload": sc.workload, "error": None, "hang": False}


def _run_one(eng, sc: Scenario, reqs, ref, cache_ref=None, phases=None) -> dict:
  """Serves one scenario; returns its record (what fired, who handled what, the verdicts).
  `cache_ref`: the failure-free run's `ServeResult` (cache probes), or None (no cache oracle).
  `phases`: seconds per phase, added to (the serve under failures, the cache comparison)."""
  phases = collections.Counter() if phases is None else phases
  rec = _record(sc)
  kills = getattr(eng.runtime, "kills", None)   # Ray: one record per SIGKILL of an actor
  before = len(kills) if kills is not None else 0
  start = time.perf_counter()
  try:
    res = eng.serve(reqs, failures=sc.failures, raise_on_error=False)
  except Exception as e:  # pylint: disable=broad-except
    res = getattr(e, "result", None)
    rec["error"] = f"{type(e).__name__}: {e}"
    rec["hang"] = isinstance(e, TimeoutError)
  if res is not None and res.error is not None:
    rec["error"] = rec["error"] or res.error
    rec["hang"] = rec["hang"] or "TimeoutError" in res.error
  events = res.recoveries if res is not None else []
  toks = res.tokens() if res is not None else {}
  handled = collections.Counter()
  for ev in events:
    handled.update(ev.handled_by)
  deaths = sum(len(ev.stages) for ev in events)
  rec.update(
      completed=rec["error"] is None and all(
          len(toks.get(r.request_id, ())) == len(ref[r.request_id]) for r in reqs),
      identical=rec["error"] is None and toks == ref,
      recoveries=len(events),
      # A spec fired if a stage died for it; deaths beyond the specs (the progress watchdog
      # killing a stage starved by a stalled one) are reported, not counted as fired.
      fired=min(len(sc.failures), deaths), extra_deaths=max(0, deaths - len(sc.failures)),
      lost_microbatches=sum(ev.lost_microbatches for ev in events),
      recomputed_tokens=sum(ev.recomputed_tokens for ev in events),
      handled_by=dict(handled), load_errors=sum(len(ev.load_errors) for ev in events),
      wall_s=round(time.perf_counter() - start, 2))
  phases["run"] += time.perf_counter() - start
  if kills is not None:   # the actor processes killed (by the driver or by themselves)
    rec["sigkills"] = len(kills) - before
    rec["killed_pids"] = [k["pid"] for k in kills[before:]]
  # Untriggered: the run ended before any failure fired. A run that failed with no recovery
  # event is not one of them (it is judged, and fails).
  rec["triggered"] = bool(events) or rec["error"] is not None
  rec["handled_own"] = handled.get(sc.own, 0) > 0
  rec["cache_identical"], rec["cache_points"] = None, {}
  start = time.perf_counter()
  if cache_ref is not None:
    if res is None or cache_ref.error is not None:
      rec["cache_identical"] = False
      rec["cache_detail"] = f"no reference run: {getattr(cache_ref, 'error', None)}"
    else:
      verdict = cache_oracle.compare(cache_ref, res)
      rec["cache_identical"], rec["cache_points"] = verdict.identical, verdict.by_point
      if verdict.identical is False:
        rec["cache_detail"] = verdict.describe()
  phases["cache_compare"] += time.perf_counter() - start
  return rec


def _cache_reference(eng, reqs):
  """The failure-free run the cache oracle compares with (module doc)."""
  try:
    return eng.serve(reqs, raise_on_error=False)
  except Exception as e:  # pylint: disable=broad-except
    return getattr(e, "result", None)


def _reference_config(c, sc: Scenario) -> ServeConfig | None:
  """The engine that serves the failure-free reference, or None: the scenario's own. The fake
  program's references come from a plain engine of the same token stages (local, unpaced, no
  replication or snapshots: whatever mechanism, microbatch or runtime the scenario has, its
  caches hold the same integers); a disaggregated scenario's from a colocated engine of its
  token stages (what the slots should hold)."""
  if sc.program == "fake":
    return ServeConfig(num_stages=sc.depth, microbatch_size=max(c.microbatch_sizes),
                       max_len=c.max_len, program="fake", pacing="real", recovery="restart",
                       heartbeat_s=c.heartbeat_s, heartbeat_timeout_s=c.reference_timeout_s,
                       progress_timeout_s=c.reference_timeout_s, step_timeout_s=c.deadline_s,
                       cache_probe=True)
  if sc.mechanism == "disagg":
    return _serve_config(c, sc, colocated=True)
  return None


def _reference_key(sc: Scenario) -> tuple:
  """Scenarios whose failure-free runs probe the same caches. The fake program's cache entries
  are integers fixed by a request's tokens and a stage's layers, whatever the microbatch, the
  swapping or the runtime, so one run per token-stage layout and workload serves them all; a
  float model's K/V differ in low bits with the batch's shapes, so its runs are kept per
  microbatch size."""
  shape = (sc.depth,) if sc.program == "fake" else (sc.depth, sc.microbatch)
  return (sc.program, shape, _pool_key(sc), sc.workload)


def _oracle(sc: Scenario, cfg, params, reqs) -> dict:
  if sc.program == "fake":
    return {r.request_id: fake_generate(cfg, [r.prompt], r.max_new_tokens)[0] for r in reqs}
  from dejavu_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
  # The engine serves without a stop token (ServeConfig.eos_token_id None); so does the oracle.
  return {r.request_id: generate(cfg, params, [r.prompt], r.max_new_tokens, eos_token_id=-1)[0]
          for r in reqs}


def _cost(c, cfg, sc: Scenario):
  prompt, token = ((c.slow_prompt_step_s, c.slow_token_step_s) if sc.slow else
                   (c.prompt_step_s, c.token_step_s))
  if sc.program == "smollm2":   # its real steps take longer: the pacing sets a floor only
    prompt, token = c.smollm2_prompt_step_s, c.smollm2_token_step_s
  return TableCostModel(cfg, prompt=prompt * sc.depth / cfg.num_layers,
                        token=token * sc.depth / cfg.num_layers)


@contextlib.contextmanager
def _timed(phases, name):
  start = time.perf_counter()
  try:
    yield
  finally:
    phases[name] += time.perf_counter() - start


def _load_model(c, program, tiny):
  if program == "model":
    return tiny, real_model_params(tiny, c.model_seed, c.model_scale)
  from dejavu_jax.models import gguf  # pylint: disable=g-import-not-at-top
  return gguf.load_smollm2("float32")[:2]


def run_campaign(c, log=print) -> dict:
  """Runs every scenario of config `c` (see configs/campaign.py); returns the report.

  What is shared, so that a scenario costs about its own serve: one engine per group of
  scenarios (`Scenario.group`; its strategies switch with `set_recovery`, which keeps the
  compiled steps, and on Ray the pooled actor processes of the one session); workloads from a
  pool, so each workload's token oracle is computed once and its failure-free cache reference
  once per stage layout (`_reference_key`). `report["phases_s"]` says where the time went."""
  check_config(c)
  tiny = tiny_config("opt", num_layers=c.num_layers, max_positions=c.max_len)
  models = {"fake": (tiny, None)}   # program -> (ModelConfig, params), loaded when first needed
  rng = np.random.default_rng(c.seed)
  scenarios = draw_scenarios(c, rng)
  groups = collections.defaultdict(list)
  for sc in scenarios:
    groups[sc.group()].append(sc)
  phases = collections.Counter()
  pools, oracles, references = {}, {}, {}
  cache_on = bool(c.get("cache_oracle", False))
  records = []
  t0 = time.perf_counter()
  ray_up = False
  try:
    for key, group in sorted(groups.items()):
      group.sort(key=lambda sc: sc.strategy)   # stable: one set_recovery per strategy
      first = group[0]
      if first.program not in models:
        with _timed(phases, "model_load"):
          models[first.program] = _load_model(c, first.program, tiny)
      cfg, params = models[first.program]
      if first.runtime == "ray" and not ray_up:
        with _timed(phases, "ray_start"):
          from dejavu_jax.runtime.ray import init_ray  # pylint: disable=g-import-not-at-top
          init_ray(num_cpus=c.ray_num_cpus)
        ray_up = True
      eng = ref_eng = None
      try:
        with _timed(phases, "engine_build"):
          eng = make_engine(cfg, params, _serve_config(c, first), cost_model=_cost(c, cfg, first))
          eng.warmup()
      except Exception as e:  # pylint: disable=broad-except
        for sc in group:   # an engine that cannot be built fails every scenario of its group
          records.append(_run_one_failed(sc, f"{type(e).__name__}: {e}"))
        log(f"group {key}: engine failed: {e}")
        if eng is not None:
          eng.close()
        continue
      try:
        for sc in group:
          if sc.strategy != eng.serve_cfg.fault.recovery:
            with _timed(phases, "set_recovery"):
              eng.set_recovery(sc.strategy)
          pk = _pool_key(sc)
          if pk not in pools:
            pools[pk] = _workloads(c, cfg, pk[1], (c.seed, pk[0] == "smollm2", int(pk[1])),
                                   _pool_size(c, sc.program))
          reqs = pools[pk][sc.workload]
          tok_key = (sc.program, pk, sc.workload)
          if tok_key not in oracles:
            with _timed(phases, "token_oracle"):
              oracles[tok_key] = _oracle(sc, cfg, params, reqs)
          cache_ref = None
          if cache_on:
            ref_key = _reference_key(sc)
            if ref_key not in references:
              with _timed(phases, "reference"):
                ref_cfg = _reference_config(c, sc)
                if ref_cfg is not None and ref_eng is None:   # one per group (one layout)
                  ref_eng = make_engine(cfg, params, ref_cfg, cost_model=_cost(c, cfg, sc))
                  ref_eng.warmup()
                references[ref_key] = _cache_reference(ref_eng or eng, reqs)
            cache_ref = references[ref_key]
          rec = _run_one(eng, sc, reqs, oracles[tok_key], cache_ref, phases)
          records.append(rec)
          if c.verbose:
            log(f"  {sc.program} {sc.mechanism} {sc.runtime} D={sc.depth}/{sc.prompt_depth} "
                f"B={sc.microbatch} w{sc.workload} {sc.strategy:26s} {sc.pattern:22s} "
                f"{'; '.join(rec['failures']):60s} handled {rec['handled_by']} "
                f"{'ok' if rec['identical'] else 'FAIL'} cache {rec['cache_identical']} "
                f"{rec['cache_points']} {rec['wall_s']:.2f} s")
      finally:
        with _timed(phases, "close"):
          eng.close()
          if ref_eng is not None:
            ref_eng.close()
      log(f"group {key}: {len(group)} scenarios, {len(records)}/{len(scenarios)} done, "
          f"{time.perf_counter() - t0:.0f} s")
  finally:
    if ray_up:
      import ray  # pylint: disable=g-import-not-at-top
      ray.shutdown()
  wall = time.perf_counter() - t0
  phases["other"] = max(0.0, wall - sum(phases.values()))
  out = report(c, records, wall)
  out["phases_s"] = {k: round(v, 1) for k, v in sorted(phases.items())}
  out["references"] = len(references)
  out["engines"] = len(groups)
  return out


def _run_one_failed(sc: Scenario, error: str) -> dict:
  return _record(sc) | {
      "error": error, "completed": False, "identical": False, "recoveries": 0, "fired": 0,
      "extra_deaths": 0, "lost_microbatches": 0, "recomputed_tokens": 0, "handled_by": {},
      "load_errors": 0, "wall_s": 0.0, "triggered": False, "handled_own": False,
      "cache_identical": None, "cache_points": {}}


def _tally(recs) -> dict:
  """Counts over records: triggered runs are judged; untriggered ones are only counted."""
  trig = [r for r in recs if r["triggered"]]
  handled = collections.Counter()
  for r in recs:
    handled.update(r["handled_by"])
  points = collections.Counter()
  for r in recs:
    points.update(r.get("cache_points", {}))
  return {"runs": len(recs), "triggered": len(trig), "untriggered": len(recs) - len(trig),
          "completed": sum(r["completed"] for r in trig),
          "identical": sum(r["identical"] for r in trig),
          "cache_identical": sum(r.get("cache_identical") is True for r in recs),
          "cache_different": sum(r.get("cache_identical") is False for r in recs),
          "cache_points": dict(sorted(points.items())),
          "sigkills": sum(r.get("sigkills", 0) for r in recs),
          "failures_specified": sum(r["specified"] for r in recs),
          "failures_fired": sum(r["fired"] for r in recs),
          "handled_by": dict(sorted(handled.items()))}


def report(c, records: list, wall: float) -> dict:
  """The campaign's verdict from its per-scenario records (also kept in the report)."""
  trig = [r for r in records if r["triggered"]]
  untrig = [r for r in records if not r["triggered"]]
  targets = {}
  for strategy in sorted({r["strategy"] for r in records}):
    mine = [r for r in records if r["strategy"] == strategy]
    judged = [r for r in mine if r["targeted"] and r["triggered"] and r["lost_microbatches"]]
    rate = sum(r["handled_own"] for r in judged) / len(judged) if judged else None
    targets[strategy] = {
        "own": strategy.split(",")[0], "runs": len(mine),
        "targeted": sum(r["targeted"] for r in mine), "judged": len(judged),
        "handled_own": sum(r["handled_own"] for r in judged),
        "rate": None if rate is None else round(rate, 3),
        # A strategy with fewer than `min_judged` judged scenarios is too rare to judge.
        "met": len(judged) < max(c.min_judged, 1) or rate >= c.handled_target}
  by = {}
  for dim in ("strategy", "program", "mechanism", "runtime", "side", "pattern", "kind", "depth"):
    vals = collections.defaultdict(list)
    for r in records:
      vals[str(r[dim])].append(r)
    by[dim] = {k: _tally(v) for k, v in sorted(vals.items())}
  bad = [r for r in records if r["triggered"] and not (r["completed"] and r["identical"])]
  bad += [r for r in untrig if not (r["completed"] and r["identical"])]
  bad += [r for r in records if r.get("cache_identical") is False and r not in bad]
  total = _tally(records)
  # Every program, mechanism and runtime the campaign drew must have failures that fired: a
  # dimension whose scenarios all ended before their failures (the Ray scenarios of an earlier
  # default config) vouches for nothing.
  unexercised = [f"{dim}={k}" for dim in ("program", "mechanism", "runtime")
                 for k, t in by[dim].items() if t["failures_fired"] == 0]
  min_fired = c.get("min_fired", 0)
  fired_met = total["failures_fired"] >= min_fired
  ok = not bad and all(t["met"] for t in targets.values()) and fired_met and not unexercised
  return {
      "ok": ok,
      "scenarios_run": len(records),
      "triggered": total["triggered"],
      "untriggered": total["untriggered"],
      "failures_specified": total["failures_specified"],
      "failures_fired": total["failures_fired"],
      # The campaign's injections are the failures that fired (a stage died for its spec).
      "fired_target": {"min": min_fired, "met": fired_met},
      "unexercised": unexercised,
      "extra_stage_deaths": sum(r["extra_deaths"] for r in records),
      "completed": total["completed"],
      "identical": total["identical"],
      "identical_fraction": round(total["identical"] / max(len(trig), 1), 4),
      "untriggered_identical": sum(r["identical"] for r in untrig),
      "not_ok_runs": len(bad),
      "cache_oracle": bool(c.get("cache_oracle", False)),
      "cache_identical": total["cache_identical"],
      "cache_different": total["cache_different"],
      "cache_points": total["cache_points"],
      "hangs": sum(r["hang"] for r in records),
      "recoveries": sum(r["recoveries"] for r in records),
      "recomputed_tokens": sum(r["recomputed_tokens"] for r in records),
      "handled_by": {s: v["handled_by"] for s, v in by["strategy"].items()},
      "targets": targets,
      "handled_target": c.handled_target,
      **{f"by_{dim}": v for dim, v in by.items() if dim != "strategy"},
      "by_strategy": by["strategy"],
      "failed_examples": [{k: r.get(k) for k in ("program", "mechanism", "runtime", "depth",
                                                 "prompt_depth", "microbatch", "strategy",
                                                 "failures", "error", "completed", "identical",
                                                 "handled_by", "cache_identical")} |
                          ({"cache_detail": r["cache_detail"]} if "cache_detail" in r else {})
                          for r in bad[:10]],
      "wall_s": round(wall, 1),
      "seed": c.seed,
      "scenarios": records,   # the JSON file keeps them; the printed line leaves them out
  }
