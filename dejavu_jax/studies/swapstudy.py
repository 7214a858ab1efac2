"""The swapping study: no swapping at batch B against swapping at batch 2B under one KV budget.

Shared by `experiments/swapping.py` (rate sweeps, a context sweep, plots) and
`benchmarks/swapping.py` (the headline numbers). A *system* is a modeled deployment (a model on a
hardware preset, `stages` pipeline stages); its device KV budget per stage is set so that
`stages` buffers of `batch_without` rows of `max_len` tokens fit, i.e. a memory-bound deployment
whose KV space admits batch B without swapping. The engine, given the same budget scaled to the
served (small) model's cache rows, picks B or 2B itself (kv/budget.py), so the study exercises the
real batch choice. Paced runs replay the modeled stage and swap times (serving/pacing.py);
`context_sweep` uses the simulator, whose swapping follows the same rules.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from dejavu_jax import costmodel as cm
from dejavu_jax import sim
from dejavu_jax.config import ModelConfig, ServeConfig, get_model_config
from dejavu_jax.kv import budget as kv_budget
from dejavu_jax import metrics as metrics_lib
from dejavu_jax import workload as wl
from dejavu_jax.serving.engine import PipelineEngine


@dataclasses.dataclass(frozen=True)
class System:
  """A modeled deployment: `model` on `hardware`, `gpus_per_machine` devices per stage, whose
  swaps cross `swap_links` device<->host links in parallel."""
  name: str
  model: str
  hardware: str
  gpus_per_machine: int = 1
  swap_links: int = 1


SYSTEMS = {
    # The legacy study's OPT-66B: one A100 per stage.
    "opt66b_a100": System("opt66b_a100", "opt_66b", "a100_80gb", 1),
    # The paper's VMs hold 2 GPUs: OPT-30B's 15 GB of weights per stage need both V100s.
    "opt30b_v100": System("opt30b_v100", "opt_30b", "v100_16gb", 2),
    # Fig 9 in the paper's setting: each GPU of a 2-GPU stage swaps its half over its own PCIe.
    "opt30b_v100x2": System("opt30b_v100x2", "opt_30b", "v100_16gb", 2, 2),
    "opt66b_a100x2": System("opt66b_a100x2", "opt_66b", "a100_80gb", 2, 2),
    "bloom176b_a100x2": System("bloom176b_a100x2", "bloom_176b", "a100_80gb", 2, 2),
}


def get_system(name: str) -> System:
  if name not in SYSTEMS:
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
  return SYSTEMS[name]


def modeled(system: System) -> tuple[ModelConfig, cm.RooflineCostModel, cm.Link]:
  """(model, roofline cost model, device<->host link) of a system. A stage of n tensor-parallel
  GPUs holds 1/n of every layer's KV on each GPU, and each GPU can swap its share over its own
  PCIe link: with `swap_links` = n the stage's swap link is n links in parallel (the legacy
  systems keep one)."""
  model = get_model_config(system.model, dtype="float16")
  cost = cm.roofline(model, system.hardware, system.gpus_per_machine)
  link, n = cost.hardware.host_link, system.swap_links
  if n > 1:
    link = cm.Link(f"{n}x{link.name}", n * link.bandwidth, link.latency)
  return model, cost, link


def stage_layers(model: ModelConfig, stages: int) -> list[int]:
  return sim.pipeline.split_layers(model.num_layers, stages)


def budget_for(model: ModelConfig, stages: int, max_len: int, batch_without: int) -> int:
  """Bytes per stage that hold `stages` buffers of `batch_without` rows (no more)."""
  row = max(kv_budget.row_bytes(model, n, max_len) for n in stage_layers(model, stages))
  return stages * batch_without * row + row // 2


def batches(model: ModelConfig, stages: int, max_len: int, budget: float) -> tuple[int, int]:
  """(batch without swapping, batch with swapping) under `budget`."""
  layers = stage_layers(model, stages)
  return (kv_budget.batch_for_budget(model, layers, max_len, budget, stages, False),
          kv_budget.batch_for_budget(model, layers, max_len, budget, stages, True))


def requests(num: int, prompt_len: int, output_len: int, vocab: int, rate: float | None,
             batch: int, seed: int = 0) -> list[wl.Request]:
  """Paper-mode requests: Poisson at `rate` (None: all at t=0), fixed prompt and output."""
  if rate is None:
    rng = np.random.default_rng(seed)
    return [wl.Request(i, 0.0, tuple(int(t) for t in rng.integers(3, vocab, prompt_len)),
                       output_len) for i in range(num)]
  reqs = wl.make_workload(wl.WorkloadConfig(
      rate=rate, num_requests=num, prompt_len=prompt_len, output_len=f"fixed:{output_len}",
      vocab_size=vocab, seed=seed, min_output=1, max_output=output_len))
  return wl.group_paper_mode(reqs, batch)


def serve_once(cfg: ModelConfig, params, reqs, *, stages: int, max_len: int, budget: int,
               swapping: bool, program: str = "fake", cost=None, link=None,
               time_scale: float = 1.0) -> dict:
  """One engine run (paced when `cost` is given) under the device KV budget `budget`."""
  serve = ServeConfig(num_stages=stages, max_len=max_len, mode="paper", program=program,
                      pacing="paced" if cost is not None else "real",
                      swapping="on" if swapping else "off", device_kv_budget_bytes=budget,
                      step_timeout_s=600.0)
  with PipelineEngine(cfg, params, serve, cost_model=cost, time_scale=time_scale,
                      swap_link=link) as eng:
    prompt = len(reqs[0].prompt)
    eng.generate([[5] * prompt] * eng.microbatch_size, 3)   # compile outside the measurement
    stats0 = [w.stats().swap for w in (eng.runtime.worker(s) for s in range(stages))]
    busy0 = [st.busy_s for st in eng.worker_stats()]
    t0 = time.perf_counter()
    res = eng.serve(reqs)
    wall = time.perf_counter() - t0
    stats = eng.worker_stats()
    swap = [w.stats().swap for w in (eng.runtime.worker(s) for s in range(stages))]
  busy = sum(st.busy_s for st in stats) - sum(busy0)
  blocked = sum(s.get("blocked_s", 0) - s0.get("blocked_s", 0) for s, s0 in zip(swap, stats0))
  commit = sum(s.get("commit_s", 0) - s0.get("commit_s", 0) for s, s0 in zip(swap, stats0))
  summary = metrics_lib.summarize(res.records)
  return {
      "swapping": swapping, "batch": res.summary["microbatch_size"],
      "reason": res.summary["swapping_reason"], "wall_s": wall,
      "output_throughput": summary["output_throughput"],
      "request_throughput": summary["request_throughput"],
      "norm_latency_p50_s_per_tok": summary["norm_latency_p50_s_per_tok"],
      "norm_latency_p99_s_per_tok": summary["norm_latency_p99_s_per_tok"],
      "paced_overruns": res.summary.get("paced_overruns"),
      "kv_peak_device_bytes": max(st.kv_peak_device_bytes for st in stats),
      "budget_bytes": budget,
      # Worker time on the swap's critical path (waiting for swap-ins, dispatching swap-outs)
      # over all worker step time.
      "swap_overhead_per_step": (blocked + commit) / busy if busy > 0 else 0.0,
      "demand_swap_ins": sum(s.get("demand_swap_ins", 0) for s in swap),
      "tokens": res.tokens(),
  }


def served_budget(cfg: ModelConfig, stages: int, max_len: int, batch_without: int) -> int:
  """The served model's budget that admits the same batches as the modeled system's."""
  return budget_for(cfg, stages, max_len, batch_without)


def context_sweep(system: System, stages: int, contexts, output_len: int, batch_without: int,
                  num_microbatches: int = 8) -> list[dict]:
  """Simulated saturated throughput with and without swapping as the prompt grows (the budget
  always admits `batch_without` rows without swapping at that context)."""
  model, cost, link = modeled(system)
  rows = []
  for ctx in contexts:
    max_len = ctx + output_len
    budget = budget_for(model, stages, max_len, batch_without)
    b0, b1 = batches(model, stages, max_len, budget)
    out = {}
    for swapping, b in ((False, b0), (True, b1)):
      reqs = sim.saturated_requests(num_microbatches * b1, ctx, output_len)
      res = sim.simulate_colocated(cost, reqs, stages, kv_budget_bytes=budget, max_len=max_len,
                                   swap_link=link if swapping else None, microbatching="paper")
      assert res.info["batch_size"] == b
      out[swapping] = metrics_lib.summarize(res.records)["output_throughput"]
    mid = ctx + output_len // 2
    choice = kv_budget.choose("auto", model, stage_layers(model, stages), max_len, budget,
                              stages, b0, cost, link, context=mid)
    ok, swap_s, step_s = kv_budget.hides(cost, link, max(stage_layers(model, stages)), b1, mid)
    rows.append({"kind": "context_sweep", "system": system.name, "prompt_len": ctx,
                 "output_len": output_len, "batch_without": b0, "batch_with": b1,
                 "throughput_without": out[False], "throughput_with": out[True],
                 "gain": out[True] / out[False], "swap_in_s": swap_s, "step_s": step_s,
                 "swap_hides": ok, "auto_choice": choice.swapping, "auto_reason": choice.reason})
  return rows


def rate_sweep(system: System, cfg: ModelConfig, *, stages: int, prompt_len: int,
               output_len: int, batch_without: int, loads, num_microbatches: int,
               time_scale: float = 1.0, program: str = "fake", params=None, seed: int = 0,
               log=print) -> list[dict]:
  """Paced runs, no swapping at B and swapping at 2B under one budget, at each load (a fraction
  of the no-swapping system's simulated saturated request rate). Tokens are checked against
  the fake program's oracle. Rates, throughputs and latencies are reported in modeled time
  (the wall clock runs `time_scale` times slower)."""
  from dejavu_jax.pipeline.fake import fake_generate   # the fake program's oracle
  model, cost, link = modeled(system)
  max_len = prompt_len + output_len
  budget_model = budget_for(model, stages, max_len, batch_without)
  b0, b1 = batches(model, stages, max_len, budget_model)
  sat = sim.simulate_colocated(cost, sim.saturated_requests(num_microbatches * b1, prompt_len,
                                                            output_len), stages,
                               kv_budget_bytes=budget_model, max_len=max_len,
                               microbatching="paper")
  capacity = metrics_lib.summarize(sat.records)["request_throughput"]
  budget = served_budget(cfg, stages, max_len, batch_without)
  rows = []
  for load in loads:
    rate = load * capacity / time_scale   # wall-clock arrivals: paced time runs x time_scale
    for swapping, b in ((False, b0), (True, b1)):
      reqs = requests(num_microbatches * b1, prompt_len, output_len, cfg.vocab_size, rate, b,
                      seed)
      r = serve_once(cfg, params, reqs, stages=stages, max_len=max_len, budget=budget,
                     swapping=swapping, program=program, cost=cost, link=link,
                     time_scale=time_scale)
      identical = None
      if program == "fake":
        identical = r["tokens"] == {q.request_id: fake_generate(cfg, [q.prompt],
                                                               q.max_new_tokens)[0]
                                    for q in reqs}
      row = {k: v for k, v in r.items() if k != "tokens"}
      for k in ("output_throughput", "request_throughput"):   # back to modeled time
        row[k] *= time_scale
      for k in ("norm_latency_p50_s_per_tok", "norm_latency_p99_s_per_tok"):
        row[k] /= time_scale
      row.update(kind="rate", system=system.name, model=system.model,
                 hardware=system.hardware, load=load, rate=rate * time_scale,
                 time_scale=time_scale, num_requests=len(reqs),
                 modeled_batch=b, modeled_budget_bytes=budget_model,
                 within_budget=r["kv_peak_device_bytes"] <= budget,
                 tokens_identical=identical)
      rows.append(row)
      log(f"{system.name} load {load:.2f} ({row['rate']:.2f} req/s) swapping={swapping} batch "
          f"{r['batch']}: {row['output_throughput']:.1f} tok/s, p50 normalized latency "
          f"{row['norm_latency_p50_s_per_tok']:.4f} s/tok (modeled time), "
          f"{r['paced_overruns']} pace overruns")
  return rows


def break_even_context(cost: cm.CostModel, link: cm.Link, layers: int, batch: int,
                       limit: int = 1 << 16) -> int | None:
  """The longest context whose swap-in (the stage's `layers`, `batch` rows, over `link`) still
  hides under the decode step at that context; None if not even context 1 does. Both grow
  linearly in the context, the swap-in faster, so the crossing is one bisection."""
  def hides_at(ctx):
    return kv_budget.hides(cost, link, layers, batch, ctx)[0]
  if not hides_at(1):
    return None
  if hides_at(limit):
    return limit
  lo, hi = 1, limit
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if hides_at(mid) else (lo, mid)
  return lo


def paper_context_sweep(system: System, stages: int, prompts, batch: int, output_mean: float,
                        num_microbatches: int = 32, seed: int = 0) -> list[dict]:
  """Fig 9 in the paper's setting: saturated throughput at batch B without swapping against 2B
  with it, per prompt length, LMSys output lengths (one per microbatch). The device holds D
  buffers of B rows without swapping and 2 of 2B with it: the same KV memory at D = 4 (the
  paper's 2x). The swap unit is the paper's: a stage swaps in only its own layers' cache of the
  next microbatch (prompt block and the tokens so far), while the current one computes, and
  swaps out only each step's token delta (sim/pipeline.py); a swap-in cannot be a delta, since
  the slot it lands in held another microbatch. Each row also carries the swap-in and the
  decode step at the mean context, the fraction of the swap-in hidden under the step, and the
  break-even context (the longest whose swap-in still hides)."""
  from dejavu_jax.studies import paper   # the paper's workload (studies layer)
  model, cost, link = modeled(system)
  layers = max(stage_layers(model, stages))
  rows = []
  for ctx in prompts:
    out = {}
    for swapping, b in ((False, batch), (True, 2 * batch)):
      n = num_microbatches * b
      reqs = sim.saturated_requests(n, ctx, paper.output_lens(n, b, seed, output_mean))
      res = sim.simulate_colocated(cost, reqs, stages, batch_size=b,
                                   swap_link=link if swapping else None, microbatching="paper")
      inv = res.inverse_throughput(warmup=2 * stages, cooldown=2 * stages, period=stages)
      out[swapping] = b / inv
    mean_ctx = int(ctx + output_mean / 2)
    ok, swap_s, step_s = kv_budget.hides(cost, link, layers, 2 * batch, mean_ctx)
    rows.append({"kind": "context_sweep", "system": system.name, "model": system.model,
                 "hardware": system.hardware, "gpus_per_machine": system.gpus_per_machine,
                 "stages": stages, "prompt_len": ctx, "output_mean": output_mean,
                 "batch_without": batch, "batch_with": 2 * batch,
                 "throughput_without": out[False], "throughput_with": out[True],
                 "gain": out[True] / out[False], "swap_in_s": swap_s, "step_s": step_s,
                 "hidden_fraction": min(1.0, step_s / swap_s) if swap_s else 1.0,
                 "swap_hides": ok, "swap_link": link.name,
                 "break_even_context": break_even_context(cost, link, layers, 2 * batch)})
  return rows
