"""Prompt/token planner: how to split D machines between a prompt and a token pipeline.

Two answers, as in the paper:
  * `analytical_plan`: the closed-form split (DEJAVU.md) with the memory constraints,
      I_c = Y + N t + (D-1)(Y-t)/D,   I_p = m D Y / Dp,   I_t = N D t / Dt,
      Dt = ceil(D N t / (m Y + N t)),  Dp = D - Dt,
      Pn = floor(M / (C0 + W0)) -> Dp >= ceil(L / Pn),
      Tn = floor((M - L (C0 + K0)) / W0) -> Dt >= ceil(L / Tn),
    where Y and t are per-stage times with the model over D stages and N counts token steps
    (output length - 1: the prompt step yields the first token).
  * `search`: saturated discrete-event simulations over every (Dp, Dt) with Dp + Dt <= D and each
    batch size, against the colocated baseline of depth d with r data-parallel replicas
    (d r <= D). Plans may leave machines idle, so more machines can never be predicted slower.

CLI: python -m dejavu_jax.planner --model=opt_66b --machines=4 --hardware=a100_80gb --prompt_len=1000

Why one module over 400 lines: the analytical split, the simulated search, the report that
explains the recommendation and the CLI read the same candidate records; they are one idea.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Sequence

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig, get_model_config
from dejavu_jax.sim import colocated, disagg, workload

# Device memory kept free for activations, workspace and fragmentation.
DEFAULT_MEMORY_RESERVE = 0.1


OUTPUT_DISTS = ("per_microbatch", "equal")


@dataclasses.dataclass(frozen=True)
class Workload:
  """What the plan is for: fixed prompt length, mean output length, microbatch size.

  `output_dist` says how the search's simulations draw output lengths: "per_microbatch" (the
  paper's setting: one length per microbatch, shared by its rows, from the LMSys-fitted lognormal
  scaled to mean `output_len`, seeded by `seed`), or "equal" (every microbatch `output_len`: all
  in flight finish together and their prompts pass through the pipeline as one train, the
  baseline's best case).
  """

  prompt_len: int = 1000
  output_len: int = 250
  batch_size: int = 8
  output_dist: str = "per_microbatch"
  seed: int = 0

  def __post_init__(self):
    if self.prompt_len < 1 or self.output_len < 2 or self.batch_size < 1:
      raise ValueError(f"need prompt_len >= 1, output_len >= 2, batch_size >= 1; got {self}")
    if self.output_dist not in OUTPUT_DISTS:
      raise ValueError(f"unknown output_dist {self.output_dist!r}; expected one of "
                       f"{', '.join(OUTPUT_DISTS)}")

  @property
  def token_steps(self) -> int:
    return self.output_len - 1

  @property
  def mean_context(self) -> int:
    return self.prompt_len + self.token_steps // 2


@dataclasses.dataclass(frozen=True)
class Memory:
  """The per-machine sizes of the formulas: W0, C0, K0 (bytes per layer) and usable M."""

  W0: int
  C0: int
  K0: int
  M: float

  @classmethod
  def of(cls, model: ModelConfig, wl: Workload, machine_bytes: float,
         reserve: float = DEFAULT_MEMORY_RESERVE, batch: int | None = None) -> "Memory":
    b = wl.batch_size if batch is None else batch
    return cls(model.layer_weight_bytes(), cm.prompt_kv_bytes_per_layer(model, b, wl.prompt_len),
               cm.kv_bytes(model, 1, b, wl.token_steps), machine_bytes * (1 - reserve))

  def colocated_fits(self, layers: int, depth: int) -> bool:
    """A baseline stage holds its layers and the caches of all `depth` microbatches in flight."""
    return math.ceil(layers / depth) * (self.W0 + depth * (self.C0 + self.K0)) <= self.M

  def prompt_layers(self) -> int:
    return int(self.M // (self.C0 + self.W0))  # Pn

  def token_layers(self, layers: int) -> int:
    return int((self.M - layers * (self.C0 + self.K0)) // self.W0)  # Tn


@dataclasses.dataclass(frozen=True)
class AnalyticalPlan:
  """The closed-form answer; `binding` names the constraint that fixed Dt."""

  D: int
  Y: float
  t: float
  N: int
  m: float
  Ic: float
  Ip: float
  It: float
  Dp: int
  Dt: int
  Dt_balance: int
  Dp_min: int
  Dt_min: int
  Pn: int
  Tn: int
  threshold: float
  binding: str

  @property
  def gain(self) -> float:
    return self.Ic / max(self.Ip, self.It)

  @property
  def helps(self) -> bool:
    """The paper's condition Y/t > (D-1)/(D(2-m)-1)."""
    return self.threshold > 0 and self.Y / self.t > self.threshold


def _require_fit(model: ModelConfig, machines: int, mem: Memory) -> None:
  L = model.num_layers
  if machines < 1:
    raise ValueError(f"machines must be >= 1, got {machines}")
  if L * mem.W0 > machines * mem.M:
    raise ValueError(
        f"no feasible plan: {model.name} needs {L * mem.W0 / 1e9:.1f} GB of weights but "
        f"{machines} machine(s) offer {machines * mem.M / 1e9:.1f} GB usable")


def prompt_overhead(cost: cm.CostModel, wl: Workload, layers: int,
                    stream_link: cm.Link | None) -> float:
  """The paper's m for a prompt stage of `layers` layers streaming over `stream_link`."""
  if stream_link is None:
    return 1.0
  y = cost.prompt_time(layers, wl.prompt_len, wl.batch_size)
  x = stream_link.transfer_time(cm.prompt_kv_bytes_per_layer(cost.model, wl.batch_size,
                                                             wl.prompt_len))
  return cm.streamed_prompt_time(y, layers, x) / y


def analytical_plan(cost: cm.CostModel, machines: int, wl: Workload, machine_bytes: float,
                    stream_link: cm.Link | None = None, m: float | None = None,
                    reserve: float = DEFAULT_MEMORY_RESERVE) -> AnalyticalPlan:
  """The paper's split of `machines` into Dp + Dt (see the module docstring).

  Raises:
    ValueError: if the model's weights do not fit, D < 2, or no split satisfies memory.
  """
  model, D, L = cost.model, machines, cost.model.num_layers
  mem = Memory.of(model, wl, machine_bytes, reserve)
  _require_fit(model, D, mem)
  if D < 2:
    raise ValueError("disaggregation needs at least 2 machines (one prompt, one token)")
  Y = cost.prompt_time(L, wl.prompt_len, wl.batch_size) / D
  t = cost.token_time(L, wl.batch_size, wl.mean_context) / D
  N = wl.token_steps
  Ic = Y + N * t + (D - 1) * (Y - t) / D
  Pn, Tn = mem.prompt_layers(), mem.token_layers(L)
  if Pn < 1 or Tn < 1:
    which = "a prompt machine" if Pn < 1 else "a token machine"
    raise ValueError(f"no feasible plan: {which} cannot hold even one layer of {model.name} with "
                     f"its caches (batch {wl.batch_size}, prompt {wl.prompt_len})")
  Dp_min, Dt_min = math.ceil(L / Pn), math.ceil(L / Tn)
  if Dp_min + Dt_min > D:
    raise ValueError(f"no feasible plan: memory needs Dp >= {Dp_min} and Dt >= {Dt_min}, "
                     f"more than {D} machines")
  m_used = 1.0 if m is None else m
  for _ in range(3 if m is None else 1):  # m depends on Dp when estimated from the link
    Dt_bal = min(max(math.ceil(D * N * t / (m_used * Y + N * t)), 1), D - 1)
    Dt, binding = Dt_bal, "balance (I_p = I_t)"
    if Dt < Dt_min:
      Dt, binding = Dt_min, f"token memory (Tn = {Tn} layers per token machine)"
    if D - Dt < Dp_min:
      Dt, binding = D - Dp_min, f"prompt memory (Pn = {Pn} layers per prompt machine)"
    if m is None:
      m_used = prompt_overhead(cost, wl, math.ceil(L / (D - Dt)), stream_link)
  Dp = D - Dt
  denom = D * (2 - m_used) - 1
  return AnalyticalPlan(D, Y, t, N, m_used, Ic, m_used * D * Y / Dp, N * D * t / Dt, Dp, Dt,
                        Dt_bal, Dp_min, Dt_min, Pn, Tn, (D - 1) / denom if denom > 0 else math.inf,
                        binding)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One simulated configuration and its saturated throughput."""

  system: str  # "colocated" or "disaggregated"
  batch: int
  depth: int = 0  # colocated
  replicas: int = 0
  Dp: int = 0  # disaggregated
  Dt: int = 0
  inverse_throughput: float = math.nan  # seconds per microbatch, all replicas together

  @property
  def machines(self) -> int:
    return self.depth * self.replicas if self.system == "colocated" else self.Dp + self.Dt

  @property
  def throughput_rps(self) -> float:
    return self.batch / self.inverse_throughput

  def serve_overrides(self, tensor: int = 1) -> dict:
    """The ServeConfig fields (flat names) that serve this candidate as planned: a colocated one
    as `data_parallel` replicas of a `num_stages` pipeline (serving/dataparallel.py)."""
    if self.system == "colocated":
      return {"num_stages": self.depth, "data_parallel": max(self.replicas, 1),
              "microbatch_size": self.batch, "tensor": tensor}
    return {"prompt_stages": self.Dp, "token_stages": self.Dt, "microbatch_size": self.batch,
            "tensor": tensor}

  def describe(self) -> str:
    if self.system == "colocated":
      return f"colocated D={self.depth} x{self.replicas} replica(s), batch {self.batch}"
    return f"disaggregated Dp={self.Dp} Dt={self.Dt}, batch {self.batch}"


def saturated_workload(wl: Workload, batch: int, num_microbatches: int):
  """The requests of a saturated run: all waiting at t=0, output lengths as `wl` says."""
  n = num_microbatches * batch
  if wl.output_dist == "equal":
    return workload.saturated_requests(n, wl.prompt_len, wl.output_len)
  lens = workload.per_microbatch_output_lens(num_microbatches, batch, wl.output_len, wl.seed)
  return workload.saturated_requests(n, wl.prompt_len, lens)


def _saturated(fn, period: int, wl: Workload, batch: int, machines: int, **kw) -> float:
  # Enough microbatches for warm-up, several steady periods and the drain; with sampled lengths,
  # the same draw for every candidate and enough of them to average the lengths out.
  n_mb = 7 * period + 4 if wl.output_dist == "equal" else 12 * machines + 16
  reqs = saturated_workload(wl, batch, n_mb)
  res = fn(requests=reqs, batch_size=batch, **kw)
  return res.inverse_throughput(warmup=2 * period, cooldown=2 * period, period=period)


def search(cost: cm.CostModel, machines: int, wl: Workload, machine_bytes: float,
           batch_sizes: Sequence[int] = (2, 4, 8, 16), stream_link: cm.Link | None = None,
           host_link: cm.Link | None = None, reserve: float = DEFAULT_MEMORY_RESERVE,
           stats: dict | None = None, host_slots: int | None = None,
           max_replicas: int | None = None) -> list[Candidate]:
  """Simulates the memory-feasible candidates that could win; returns them best first.

  `max_replicas` caps the data-parallel replicas of a colocated candidate (None: as many as the
  machines hold; 1: the paper's baseline, one pipeline, without data-parallel replicas).

  Candidates whose lower-bound time already loses to a simulated one are skipped; `stats`, if
  given, receives the counts ("feasible", "simulated").

  Replicas of a colocated pipeline are independent under saturation, so r replicas are
  simulated as one pipeline with r times its throughput. `host_slots` per token worker (None: the
  simulator's default, Dp + Dt).
  """
  model, L = cost.model, cost.model.num_layers
  _require_fit(model, machines, Memory.of(model, wl, machine_bytes, reserve))
  # (lower bound on seconds per microbatch, candidate, simulation) for every feasible candidate.
  todo = []
  for b in batch_sizes:
    mem = Memory.of(model, wl, machine_bytes, reserve, batch=b)
    bound = _Bounds(cost, dataclasses.replace(wl, batch_size=b))
    for d in range(1, min(machines, L) + 1):
      if not mem.colocated_fits(L, d):
        continue
      r = machines // d if max_replicas is None else min(machines // d, max_replicas)
      todo.append((bound.colocated(d) / r, Candidate("colocated", b, depth=d, replicas=r)))
    Pn, Tn = mem.prompt_layers(), mem.token_layers(L)
    if Pn < 1 or Tn < 1:
      continue
    for dp in range(math.ceil(L / Pn), machines):
      for dt in range(max(math.ceil(L / Tn), 1), machines - dp + 1):
        todo.append((bound.disaggregated(dp, dt), Candidate("disaggregated", b, Dp=dp, Dt=dt)))
  # Simulate the most promising first; skip what cannot beat the best simulated so far. The
  # bounds are true lower bounds on time, so the best plan is exact (and more machines, a
  # superset of candidates, can never be predicted slower).
  out, best = [], 0.0
  for lb, cand in sorted(todo, key=lambda x: x[1].batch / x[0], reverse=True):
    if cand.batch / lb < best * (1 - 1e-9):
      continue
    cand = simulate_candidate(cost, cand, wl, machines, stream_link, host_link, host_slots)
    best = max(best, cand.throughput_rps)
    out.append(cand)
  if stats is not None:
    stats.update(feasible=len(todo), simulated=len(out))
  if not out:
    raise ValueError(f"no feasible plan: no candidate of {model.name} on {machines} machine(s) "
                     f"fits memory for batch sizes {list(batch_sizes)}")
  return sorted(out, key=lambda c: -c.throughput_rps)


def simulate_candidate(cost: cm.CostModel, cand: Candidate, wl: Workload, machines: int,
                       stream_link: cm.Link | None = None, host_link: cm.Link | None = None,
                       host_slots: int | None = None) -> Candidate:
  """`cand` with its saturated inverse throughput simulated (as `search` does)."""
  wl_b = dataclasses.replace(wl, batch_size=cand.batch)
  if cand.system == "colocated":
    inv = _saturated(colocated.simulate_colocated, cand.depth, wl_b, cand.batch, machines,
                     cost=cost, num_stages=cand.depth) / cand.replicas
  else:
    inv = _saturated(disagg.simulate_disaggregated, max(cand.Dp, cand.Dt), wl_b, cand.batch,
                     machines, cost=cost, prompt_stages=cand.Dp, token_stages=cand.Dt,
                     stream_link=stream_link, host_link=host_link, host_slots=host_slots)
  return dataclasses.replace(cand, inverse_throughput=inv)


class _Bounds:
  """Lower bounds on seconds per microbatch: the busiest stage must do all of its own work."""

  def __init__(self, cost: cm.CostModel, wl: Workload):
    self.cost, self.wl = cost, wl
    self._cache = {}

  def _stage(self, layers: int) -> tuple[float, float]:
    if layers not in self._cache:
      wl, c = self.wl, self.cost
      prompt = c.prompt_time(layers, wl.prompt_len, wl.batch_size)
      tokens = sum(c.token_time(layers, wl.batch_size, wl.prompt_len + k - 1)
                   for k in range(1, wl.output_len))
      self._cache[layers] = (prompt, tokens)
    return self._cache[layers]

  def colocated(self, depth: int) -> float:
    p, t = self._stage(math.ceil(self.cost.model.num_layers / depth))
    return p + t

  def disaggregated(self, dp: int, dt: int) -> float:
    L = self.cost.model.num_layers
    return max(self._stage(math.ceil(L / dp))[0], self._stage(math.ceil(L / dt))[1])


def memory_use(model: ModelConfig, wl: Workload, cand: Candidate, machine_bytes: float,
               reserve: float = DEFAULT_MEMORY_RESERVE) -> list[tuple[str, float, float]]:
  """[(machine kind, bytes used, usable bytes M)] of a candidate, by the formulas above: a
  colocated stage holds its layers and the caches of its `depth` microbatches; a prompt machine
  Pn layers with their prompt caches; a token machine its layers and the caches (L (C0 + K0))."""
  L = model.num_layers
  mem = Memory.of(model, wl, machine_bytes, reserve, batch=cand.batch)
  if cand.system == "colocated":
    d = cand.depth
    return [("colocated stage", math.ceil(L / d) * (mem.W0 + d * (mem.C0 + mem.K0)), mem.M)]
  return [("prompt machine", math.ceil(L / cand.Dp) * (mem.W0 + mem.C0), mem.M),
          ("token machine", math.ceil(L / cand.Dt) * mem.W0 + L * (mem.C0 + mem.K0), mem.M)]


def binding_memory(model: ModelConfig, wl: Workload, cand: Candidate, machine_bytes: float,
                   reserve: float = DEFAULT_MEMORY_RESERVE) -> dict:
  """The memory constraint with the least headroom for `cand`, and by how much it binds."""
  uses = memory_use(model, wl, cand, machine_bytes, reserve)
  name, used, limit = min(uses, key=lambda u: u[2] - u[1])
  return {"constraint": name, "used_bytes": used, "usable_bytes": limit,
          "headroom_bytes": limit - used, "headroom_fraction": (limit - used) / limit,
          "reserve": reserve, "all": [{"machine": n, "used_bytes": u, "usable_bytes": m}
                                      for n, u, m in uses]}


def default_stream_link(hardware: str) -> cm.Link:
  """The paper's inter-VM network: 40 Gbps for A100 VMs, 32 Gbps for V100 VMs."""
  return cm.LINKS["inter_vm_32gbps" if hardware.startswith("v100") else "inter_vm_40gbps"]


def plan_report(model: ModelConfig, machines: int, hardware: str, wl: Workload,
                gpus_per_machine: int = 2, batch_sizes: Sequence[int] = (2, 4, 8, 16),
                top: int = 8, reserve: float = DEFAULT_MEMORY_RESERVE,
                stream_link: str | cm.Link | None = "default",
                host_slots: int | None = None,
                max_replicas: int | None = None) -> tuple[str, dict]:
  """Runs both planners and returns (printable report, JSON-able summary).

  `reserve`: fraction of device memory kept free; `stream_link`: the prompt -> token link (a
  `costmodel.LINKS` name or a Link; "default": the paper's inter-VM network for the hardware;
  None: free); `host_slots` per token worker (None: Dp + Dt); `max_replicas` caps the
  colocated candidates' data-parallel replicas (`search`).
  """
  if not 0 <= reserve < 1:
    raise ValueError(f"memory reserve must be in [0, 1), got {reserve}")
  cost = cm.roofline(model, hardware, gpus_per_machine=gpus_per_machine)
  if isinstance(stream_link, str):
    if stream_link == "default":
      link = default_stream_link(hardware)
    elif stream_link in cm.LINKS:
      link = cm.LINKS[stream_link]
    else:
      raise ValueError(f"unknown stream link {stream_link!r}; known: {', '.join(cm.LINKS)}")
  else:
    link = stream_link
  M = cost.machine_memory_bytes
  ap_error = None
  try:
    ap = analytical_plan(cost, machines, wl, M, stream_link=link, reserve=reserve)
  except ValueError as e:
    if "weights" in str(e):
      raise
    ap, ap_error = None, str(e)  # disaggregation is infeasible; the baseline may still fit
  stats = {}
  cands = search(cost, machines, wl, M, batch_sizes, stream_link=link,
                 host_link=cost.hardware.host_link, stats=stats, reserve=reserve,
                 host_slots=host_slots, max_replicas=max_replicas)
  best = cands[0]
  base = next(c for c in cands if c.system == "colocated")
  # The paper's comparison: the analytical split against the same machines as one pipeline
  # without data-parallel replicas, both at the analytical batch. The search prunes whatever
  # cannot win, so either may be missing from its list: they are simulated here.
  def find_or_simulate(cand):
    for c in cands:
      if dataclasses.replace(c, inverse_throughput=math.nan) == cand:
        return c, False
    return simulate_candidate(cost, cand, wl, machines, link, cost.hardware.host_link,
                              host_slots), True
  split = plain_b = None
  extra = []
  if ap is not None:
    split, pruned = find_or_simulate(Candidate("disaggregated", wl.batch_size, Dp=ap.Dp,
                                               Dt=ap.Dt))
    extra += [split] if pruned else []
  if machines <= model.num_layers and Memory.of(model, wl, M, reserve).colocated_fits(
      model.num_layers, machines):
    plain_b, pruned = find_or_simulate(Candidate("colocated", wl.batch_size, depth=machines,
                                                 replicas=1))
    extra += [plain_b] if pruned else []
  plain = [c for c in cands if c.system == "colocated" and c.replicas == 1 and c.depth == machines]
  dis = [c for c in cands if c.system == "disaggregated"]
  lines = [
      f"{model.name} ({model.dtype}, {model.num_layers} layers, "
      f"{model.num_layers * model.layer_weight_bytes() / 1e9:.1f} GB of layer weights) on "
      f"{machines} x {gpus_per_machine} {cost.hardware.name} ({M / 1e9:.0f} GB per machine), "
      f"prompt {wl.prompt_len}, output {wl.output_len} tokens (N = {wl.token_steps} token steps, "
      f"{'one sampled length per microbatch' if wl.output_dist == 'per_microbatch' else 'all equal'}"
      f"), batch {wl.batch_size}, stream link {link.name if link else 'free'}, memory reserve "
      f"{reserve:.0%}",
      "",
  ]
  if ap is None:
    lines += [f"Analytical: disaggregation infeasible ({ap_error})", ""]
  else:
    lines += _analytical_lines(ap, machines)
  lines.append(f"Simulation search (saturated): {stats['feasible']} memory-feasible candidates, "
               f"{stats['simulated']} simulated (the rest cannot beat them), best first:")
  for c in cands[:top]:
    lines.append(f"  {c.describe():48s} {c.machines} machines  {c.throughput_rps:8.3f} req/s")
  for c in extra:
    lines.append(f"  {c.describe():48s} {c.machines} machines  {c.throughput_rps:8.3f} req/s"
                 "  (pruned by the search; simulated for the comparison below)")
  gain = best.throughput_rps / base.throughput_rps if best.system != "colocated" else 1.0
  best_dis = dis[0] if dis else None
  lines += ["", f"Recommended: {best.describe()} ({best.throughput_rps:.3f} req/s, "
                f"{best.throughput_rps * wl.output_len:.1f} tok/s)"]
  lines.append("  serve it: " + " ".join(
      f"--config.{k}={v}" for k, v in best.serve_overrides(gpus_per_machine).items()))
  if best.system == "disaggregated":
    lines.append(f"  gain over the best baseline ({base.describe()}): {gain:.2f}x")
  elif best_dis is not None:
    lines.append(f"  disaggregation does not pay here: best split {best_dis.describe()} reaches "
                 f"{best_dis.throughput_rps / best.throughput_rps:.2f}x of it")
  if plain:
    lines.append(f"  vs the paper's baseline (colocated D={machines}, no replicas, batch "
                 f"{plain[0].batch} best): {best.throughput_rps / plain[0].throughput_rps:.2f}x")
  why = _why(ap, ap_error, best, split, plain_b, machines)
  lines.append(f"  why: {why}")
  paper = None
  if split is not None and plain_b is not None:
    paper = {"split": dataclasses.asdict(split) | {"throughput_rps": split.throughput_rps},
             "no_replicas": dataclasses.asdict(plain_b) | {"throughput_rps":
                                                          plain_b.throughput_rps},
             "gain": split.throughput_rps / plain_b.throughput_rps}
    lines.append(
        f"  the paper's comparison (the same {machines} machines, no data-parallel replicas, "
        f"batch {wl.batch_size}): split Dp={split.Dp} Dt={split.Dt} {split.throughput_rps:.3f} "
        f"req/s vs colocated D={machines} {plain_b.throughput_rps:.3f} req/s: "
        f"{paper['gain']:.2f}x (analytical {ap.gain:.2f}x)")
  binds = binding_memory(model, wl, best, M, reserve)
  lines.append("  memory: " + "; ".join(
      f"{u['machine']} {u['used_bytes'] / 1e9:.1f} of {u['usable_bytes'] / 1e9:.1f} GB usable"
      for u in binds["all"]) + f"; binding: {binds['constraint']}, headroom "
      f"{binds['headroom_bytes'] / 1e9:.1f} GB ({binds['headroom_fraction']:.0%} of usable)")
  summary = {"model": model.name, "machines": machines, "hardware": hardware,
             "prompt_len": wl.prompt_len, "output_len": wl.output_len,
             "analytical": (dataclasses.asdict(ap) | {"gain": ap.gain, "helps": ap.helps})
                           if ap else {"error": ap_error},
             "best": dataclasses.asdict(best) | {"throughput_rps": best.throughput_rps},
             "best_baseline": dataclasses.asdict(base) | {"throughput_rps": base.throughput_rps},
             "gain_vs_best_baseline": best.throughput_rps / base.throughput_rps,
             "output_dist": wl.output_dist, "memory_reserve": reserve,
             "machine_bytes": M, "stream_link": link.name if link else None,
             "memory_binding": binds,
             "best_disaggregated": (dataclasses.asdict(best_dis) |
                                    {"throughput_rps": best_dis.throughput_rps}) if best_dis else None,
             "plain_baseline": (dataclasses.asdict(plain[0]) |
                                {"throughput_rps": plain[0].throughput_rps}) if plain else None,
             "why": why, "paper_comparison": paper, "max_replicas": max_replicas,
             "serve_overrides": best.serve_overrides(gpus_per_machine)}
  return "\n".join(lines), summary


def _why(ap: AnalyticalPlan | None, ap_error: str | None, best: Candidate,
         split: Candidate | None, plain: Candidate | None, machines: int) -> str:
  """Why the recommendation wins: it speaks of the recommended system (the analytical split is
  only its subject when the split is what is recommended)."""
  if ap is None:
    return f"no prompt/token split fits memory ({ap_error}); the best colocated layout wins"
  ratio = (f"; the analytical split Dp={split.Dp} Dt={split.Dt} (batch {split.batch}) reaches "
           f"{split.throughput_rps:.3f} req/s, {split.throughput_rps / best.throughput_rps:.2f}x "
           "of it" if split is not None and split != best else "")
  if best.system == "disaggregated":
    if (best.Dp, best.Dt) == (ap.Dp, ap.Dt):
      return (f"Y/t = {ap.Y / ap.t:.1f} is above the threshold {ap.threshold:.2f}: token steps "
              f"stop waiting behind prompts; the split is bound by {ap.binding}")
    return (f"the simulated split Dp={best.Dp} Dt={best.Dt} beats the analytical Dp={ap.Dp} "
            f"Dt={ap.Dt} (the formula assumes equal output lengths and a fixed m; the "
            f"simulation draws lengths per microbatch and streams over the link){ratio}")
  # A colocated layout is recommended.
  if math.isinf(ap.threshold):
    reason = (f"the streaming overhead m = {ap.m:.2f} is too large for D = {machines}: "
              "D(2-m)-1 <= 0, so no Y/t makes disaggregation pay")
  elif not ap.helps:
    reason = (f"Y/t = {ap.Y / ap.t:.1f} is below the threshold {ap.threshold:.2f}: the bubbles "
              "cost less than the machines a prompt pipeline takes")
  elif best.replicas > 1:
    vs = (f" (over the plain D={machines} pipeline the split gains "
          f"{split.throughput_rps / plain.throughput_rps:.2f}x, the paper's comparison)"
          if split is not None and plain is not None else "")
    reason = (f"{best.replicas} data-parallel replicas of a {best.depth}-stage pipeline: each "
              f"pipeline is shallower, so its prompt bubbles ((D-1)(Y-t)/D per microbatch) "
              f"shrink without giving machines to a prompt pipeline; disaggregation pays against "
              f"one deep pipeline{vs}, but not against replicas")
  elif ap.gain < 1 and not ap.binding.startswith("balance"):
    reason = (f"Y/t = {ap.Y / ap.t:.1f} is above the threshold, but {ap.binding} forces "
              f"Dp = {ap.Dp}, Dt = {ap.Dt} away from the balanced Dt = {ap.Dt_balance}")
  else:
    reason = (f"Y/t = {ap.Y / ap.t:.1f} is above the threshold {ap.threshold:.2f}, yet in "
              f"simulation the split loses: its predicted gain {ap.gain:.2f}x is within what "
              "streaming and uneven output lengths take back")
  return f"{best.describe()} wins: {reason}{ratio}"


def _analytical_lines(ap: AnalyticalPlan, machines: int) -> list[str]:
  return [
      f"Analytical (model over D = {machines} stages): Y = {ap.Y:.4f} s, t = {ap.t * 1e3:.2f} ms,"
      f" Y/t = {ap.Y / ap.t:.1f}, m = {ap.m:.3f}",
      f"  baseline I_c = {ap.Ic:.3f} s/microbatch",
      f"  disaggregation helps when Y/t > (D-1)/(D(2-m)-1) = {ap.threshold:.2f}: "
      f"{'yes' if ap.helps else 'no'}",
      f"  balance Dt = ceil(D N t / (m Y + N t)) = {ap.Dt_balance}; memory: Pn = {ap.Pn} -> "
      f"Dp >= {ap.Dp_min}, Tn = {ap.Tn} -> Dt >= {ap.Dt_min}",
      f"  split Dp = {ap.Dp}, Dt = {ap.Dt}; binding constraint: {ap.binding}",
      f"  I_p = {ap.Ip:.3f} s, I_t = {ap.It:.3f} s -> predicted gain I_c / max(I_p, I_t) = "
      f"{ap.gain:.2f}x",
      "",
  ]


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  model = get_model_config(f.model, dtype=f.dtype)
  if f.hardware not in cm.HARDWARE and f.hardware != "this_cpu":
    cm.get_hardware(f.hardware)  # raises the clear error
  wl = Workload(f.prompt_len, f.output_len, f.batch_size, f.output_dist, f.seed)
  link = None if f.stream_link == "none" else f.stream_link
  text, summary = plan_report(model, f.machines, f.hardware, wl, f.gpus_per_machine,
                              [int(b) for b in f.batch_sizes], reserve=f.memory_reserve,
                              stream_link=link, host_slots=f.host_slots)
  if f.json:
    print(json.dumps(summary, default=float))
  else:
    print(text)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("model", "opt_66b", "model preset (see dejavu_jax.config.PRESETS)")
  flags.DEFINE_string("dtype", "float16", "parameter dtype")
  flags.DEFINE_integer("machines", 4, "machines D (one pipeline stage each)")
  flags.DEFINE_string("hardware", "a100_80gb", "hardware preset: a100_80gb, v100_16gb, "
                      "h100_80gb, this_cpu")
  flags.DEFINE_integer("gpus_per_machine", 2, "devices per machine, tensor-parallel within a "
                       "stage (the paper's VMs have 2)")
  flags.DEFINE_integer("prompt_len", 1000, "prompt tokens")
  flags.DEFINE_integer("output_len", 250, "mean generated tokens per request")
  flags.DEFINE_integer("batch_size", 8, "microbatch size of the analytical plan")
  flags.DEFINE_list("batch_sizes", ["2", "4", "8", "16"], "batch sizes the search tries")
  flags.DEFINE_enum("output_dist", "per_microbatch", list(OUTPUT_DISTS),
                    "output lengths of the search: one sampled per microbatch (the paper's "
                    "setting) or all equal (the baseline's best case)")
  flags.DEFINE_integer("seed", 0, "seed of the sampled output lengths")
  flags.DEFINE_float("memory_reserve", DEFAULT_MEMORY_RESERVE,
                     "fraction of device memory kept free (activations, workspace)")
  flags.DEFINE_string("stream_link", "default", "prompt -> token link: a costmodel.LINKS name, "
                      "'default' (the paper's inter-VM network) or 'none' (free)")
  flags.DEFINE_integer("host_slots", None, "host slots per token worker (default Dp + Dt)")
  flags.DEFINE_bool("json", False, "print the JSON summary (one line) instead of the report")
  app.run(main)
