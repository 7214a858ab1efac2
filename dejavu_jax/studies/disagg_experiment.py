"""The disaggregation scenario, paced: a paper-scale deployment replayed by the real engines.

What runs: a colocated `PipelineEngine` of depth D (the paper's baseline) and
`DisaggregatedEngine`s of Dp + Dt = D stages (the planner's split and its neighbours), all on
the fake stage program with as many layers as the paced model (so every split maps stage for
stage onto the simulator's), in paced mode: every stage step computes for real and then lasts
what the roofline cost model of the paper-scale model says (OPT-66B on machines of 2 x A100-80GB
by default), stretched by `time_scale`. Prompts are `real_prompt_len` tokens long but are charged
as `prompt_len` (1000) tokens (`PaperScaleCost`), so the tiny computation stays far below the
modeled step times. Output lengths: one per microbatch from the LMSys-fitted lognormal (all rows of
a microbatch share it, paper mode). The same requests go to the simulator (`sim`), with the same
cost model, the stream link for prompt streaming and the hardware's host link for the overlapped
host-to-device load, and to the planner's search (`planner`).

Chunks (`chunk` = c > 1, the figure's setting; 1 in the benchmark): a paced decode step stands
for c decode steps of the paper's model and lasts as long (c token times at the chunk's mean
modelled context, c LM heads), so a paper-scale run of 10^5 stage steps fits the figure's budget
on 2 cores without the real steps outlasting the paced ones. The prompt step differs by system,
so that each keeps its own timing structure:
  * colocated (Baseline-D): the prompt step yields the first chunk (the prompt, then c - 1
    decode steps: `first_chunk_in_prompt`), a request of N tokens is ceil(N / c) paced tokens;
    the pipeline bubble behind a prompt (prompt step minus token step, the loss disaggregation
    removes) stays what it is at paper scale;
  * disaggregated: the prompt step stays one prompt (the prompt machines never decode), a
    request is 1 + ceil((N - 1) / c) paced tokens.
Each request's last chunk is rounded up; `simulate(..., chunked=False)` runs the same requests
unchunked (the gain at c = 8 moved by 0-7% in the simulator).

Used by `experiments/disaggregation.py` (latency vs rate, every system, JSONL and a plot) and
`benchmarks/disaggregation.py` (saturated throughput: planner vs simulator vs paced runs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from dejavu_jax import costmodel as cm
from dejavu_jax import planner as planner_lib
from dejavu_jax import sim
from dejavu_jax.config import ServeConfig, get_model_config, tiny_config
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.disagg_engine import DisaggregatedEngine
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request, poisson_arrivals


@dataclasses.dataclass(frozen=True)
class Scenario:
  model: str = "opt_66b"
  hardware: str = "a100_80gb"
  gpus_per_machine: int = 2
  machines: int = 4
  prompt_len: int = 1000          # modeled prompt length
  real_prompt_len: int = 16       # what the fake program really computes
  batch: int = 8
  output_mean: float = 214.5      # LMSys-Chat-1M mean response length
  time_scale: float = 0.5         # paced step = modeled step x time_scale
  stream_link: str | None = "default"
  host_slots: int | None = None
  seed: int = 0
  chunk: int = 1                  # paper-scale decode steps per paced decode step (module doc)

  def __post_init__(self):
    if not isinstance(self.chunk, int) or self.chunk < 1:
      raise ValueError(f"chunk must be an integer >= 1, got {self.chunk!r}")

  def max_output(self) -> int:
    return max(2, int(round(self.output_mean * 950 / 214.5)))

  def paced_len(self, output_len: int, system: tuple = ("disagg",)) -> int:
    """Paced tokens of a request of `output_len` tokens on `system` (module doc): chunks of
    `chunk`, the first from the prompt step (colocated) or after the prompt's token."""
    n, c = int(output_len), self.chunk
    if first_chunk_in_prompt(system):
      return max(1, math.ceil(n / c))
    return 1 + math.ceil((n - 1) / c)

  def max_len(self) -> int:
    n = self.real_prompt_len + self.paced_len(self.max_output()) + 1
    return 1 << (n - 1).bit_length()


def first_chunk_in_prompt(system: tuple) -> bool:
  """Whether `system`'s prompt step yields a whole chunk (module doc: the colocated one)."""
  return system[0] == "colocated"


class PaperScaleCost:
  """A cost model that charges a prompt of `real` tokens as `modeled` ones (contexts shift by
  the same amount), so a short real prompt replays a paper-scale one; with `chunk` = c > 1 a
  decode step is c decode steps of `base` at the chunk's mean context (module doc)."""

  def __init__(self, base: cm.CostModel, real: int, modeled: int, chunk: int = 1,
               first_chunk_in_prompt: bool = False):
    self.base, self.model, self.hardware = base, base.model, base.hardware
    self.real, self.modeled, self.chunk = real, modeled, chunk
    self.first_chunk_in_prompt = first_chunk_in_prompt and chunk > 1
    self._shift = modeled - real

  def __getattr__(self, name):   # memory sizes and the like: the base model's
    if name == "base":   # not set yet (a copy under construction)
      raise AttributeError(name)
    return getattr(self.base, name)

  def modeled_prompt_len(self, tokens: int) -> int:
    return tokens + self._shift

  def prompt_time(self, layers, tokens, batch):
    t = self.base.prompt_time(layers, tokens + self._shift, batch)
    if self.first_chunk_in_prompt:   # the rest of the first chunk: c - 1 decode steps
      c = self.chunk
      t += (c - 1) * self.base.token_time(layers, batch, tokens + self._shift + c / 2)
    return t

  def token_time(self, layers, batch, context):
    c = self.chunk
    # Paced context real + k stands for the modelled contexts modeled + (k-1)c+1 .. modeled + kc
    # (c - 1 later when the prompt step yielded a whole chunk).
    ctx = self.modeled + (context - self.real) * c - (c - 1) / 2
    if self.first_chunk_in_prompt:
      ctx += c - 1
    return c * self.base.token_time(layers, batch, ctx)

  def head_time(self, batch):
    # The prompt step's head is charged c times as well (engine and simulator alike: < 0.1% of
    # a paper-scale prompt step).
    return self.chunk * self.base.head_time(batch)


def cost_model(sc: Scenario) -> cm.CostModel:
  return cm.roofline(get_model_config(sc.model, dtype="float16"), sc.hardware,
                     gpus_per_machine=sc.gpus_per_machine)


def stream_link(sc: Scenario) -> cm.Link | None:
  if sc.stream_link is None:
    return None
  if sc.stream_link == "default":
    return planner_lib.default_stream_link(sc.hardware)
  return cm.LINKS[sc.stream_link]


def fake_config(sc: Scenario):
  """The fake program's model: as many layers as the paced model, so splits match the sim's."""
  # One KV head of 4 dims: the fake program reads one entry per position, and a small cache
  # keeps its real step time far below the modeled one.
  return tiny_config("opt", num_layers=cost_model(sc).model.num_layers, hidden_size=4,
                     num_heads=1, ffn_dim=8, max_positions=sc.max_len())


def workload(sc: Scenario) -> planner_lib.Workload:
  return planner_lib.Workload(sc.prompt_len, max(2, round(sc.output_mean)), sc.batch,
                              "per_microbatch", sc.seed)


def output_lens(sc: Scenario, num_microbatches: int) -> list[int]:
  """The paper-scale output lengths of `make_requests`'s requests: one sampled length per run
  of `batch` (the planner's `saturated_workload` draw)."""
  return [r.output_len for r in planner_lib.saturated_workload(workload(sc), sc.batch,
                                                                num_microbatches)]


def make_requests(sc: Scenario, num_microbatches: int, rate: float | None = None,
                  system: tuple = ("disagg",)) -> list[Request]:
  """`num_microbatches` x batch requests of `output_lens` tokens (`paced_len` of them on
  `system`, in chunks); all at t=0 (rate None) or Poisson at `rate`."""
  n = num_microbatches * sc.batch
  lens = output_lens(sc, num_microbatches)
  arrivals = np.zeros(n) if rate is None else poisson_arrivals(rate, n, sc.seed)
  rng = np.random.default_rng(sc.seed + 7)
  vocab = fake_config(sc).vocab_size
  return [Request(i, float(arrivals[i]),
                  tuple(int(t) for t in rng.integers(3, vocab, sc.real_prompt_len)),
                  sc.paced_len(lens[i], system))
          for i in range(n)]


def system_name(system: tuple) -> str:
  return f"colocated D={system[1]}" if system[0] == "colocated" else (
      f"disaggregated {system[1]}+{system[2]}")


def planner_split(sc: Scenario) -> tuple[int, int]:
  """The planner's split of `machines` (the analytical answer)."""
  cost = cost_model(sc)
  ap = planner_lib.analytical_plan(cost, sc.machines, workload(sc), cost.machine_memory_bytes,
                                   stream_link=stream_link(sc))
  return ap.Dp, ap.Dt


def systems(sc: Scenario) -> list[tuple]:
  """The baseline of depth `machines`, the planner's split and its neighbours (Dp +- 1)."""
  dp, dt = planner_split(sc)
  out = [("colocated", sc.machines), ("disagg", dp, dt)]
  for p in (dp - 1, dp + 1):
    if 1 <= p < sc.machines and (p, sc.machines - p) != (dp, dt):
      out.append(("disagg", p, sc.machines - p))
  return out


def make_engine(sc: Scenario, system: tuple):
  cfg = fake_config(sc)
  paced = PaperScaleCost(cost_model(sc), sc.real_prompt_len, sc.prompt_len, sc.chunk,
                         first_chunk_in_prompt(system))
  common = dict(microbatch_size=sc.batch, max_len=sc.max_len(), mode="paper", pacing="paced",
                program="fake")
  if system[0] == "colocated":
    eng = PipelineEngine(cfg, None, ServeConfig(num_stages=system[1], **common),
                         cost_model=paced, time_scale=sc.time_scale)
  else:
    link = stream_link(sc)
    eng = DisaggregatedEngine(cfg, None, ServeConfig(
        prompt_stages=system[1], token_stages=system[2], host_slots=sc.host_slots,
        stream_link=link.name if link is not None and link.name in cm.LINKS else None,
        **common), cost_model=paced, time_scale=sc.time_scale)
  eng.generate([[5] * sc.real_prompt_len] * sc.batch, 3)   # compile outside the measured runs
  return eng


def simulate(sc: Scenario, system: tuple, requests: Sequence[Request],
             chunked: bool = True, output_lens: dict[int, int] | None = None) -> sim.SimResult:
  """The simulator on the same requests (prompts at the modeled length), times unscaled: in
  the paced run's chunks, or (`chunked=False`) at paper scale, each request of its
  `output_lens[request_id]` tokens."""
  if not chunked and output_lens is None:
    raise ValueError("simulate(chunked=False) needs the requests' paper-scale output_lens")
  recs = [sim.RequestRecord(r.request_id, float(r.arrival) / sc.time_scale, sc.prompt_len,
                            int(r.max_new_tokens) if chunked else int(output_lens[r.request_id]))
          for r in sorted(requests, key=lambda r: (r.arrival, r.request_id))]
  return simulate_records(sc, system, recs, chunk=sc.chunk if chunked else 1)


def simulate_records(sc: Scenario, system: tuple, records: Sequence[sim.RequestRecord],
                     chunk: int = 1) -> sim.SimResult:
  """The simulator's run of `system` on fresh request records (modeled time; prompts at the
  modeled length), decode steps in chunks of `chunk`."""
  cost = cost_model(sc)
  if chunk > 1:
    cost = PaperScaleCost(cost, sc.prompt_len, sc.prompt_len, chunk,
                          first_chunk_in_prompt(system))
  if system[0] == "colocated":
    return sim.simulate_colocated(cost, records, system[1], batch_size=sc.batch,
                                  microbatching="paper")
  return sim.simulate_disaggregated(cost, records, system[1], system[2], batch_size=sc.batch,
                                    host_slots=sc.host_slots, stream_link=stream_link(sc),
                                    host_link=cost.hardware.host_link, microbatching="paper")


def modelled_records(records, scale: float, prompt_len: int,
                     lens: dict[int, int]) -> list[sim.RequestRecord]:
  """Engine or simulator records in modelled seconds (times / `scale`), each of its
  paper-scale output length `lens[id]` (a chunked run generated fewer, longer tokens), for
  `metrics.summarize`."""
  out = []
  for r in records:
    rid = r.request_id if hasattr(r, "request_id") else r.rid
    done = r.finish is not None and not math.isnan(r.finish)
    out.append(sim.RequestRecord(rid, r.arrival / scale, prompt_len, lens[rid],
                                 r.first_token / scale if done else math.nan,
                                 r.finish / scale if done else math.nan))
  return out


def reference_tokens(sc: Scenario, requests: Sequence[Request]) -> dict[int, list[int]]:
  cfg = fake_config(sc)
  return {r.request_id: fake_generate(cfg, [r.prompt], r.max_new_tokens)[0] for r in requests}


def mb_inverse_throughput(finishes: Sequence[float], batch: int, warmup: int,
                          period: int) -> float:
  """Steady-state seconds per microbatch from request finish times (rows of a microbatch
  finish together), skipping `warmup` microbatches at both ends, as the planner measures."""
  t = sorted(finishes)[batch - 1::batch]
  span = (len(t) - 1 - 2 * warmup) // period * period
  if span < 1:
    raise ValueError(f"{len(t)} microbatches are too few for warmup {warmup}, period {period}")
  return (t[warmup + span] - t[warmup]) / span


def rel(a: float, b: float) -> float:
  return abs(a - b) / abs(b) if b else (0.0 if a == b else math.inf)
