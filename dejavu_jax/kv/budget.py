"""The device KV budget: which microbatch size fits, and whether swapping should be on.

One worker's device holds its stage's cache buffers: D of them without swapping (one per
microbatch in flight), 2 with swapping (runtime/swapping.py). Given a budget in bytes per worker, the
microbatch size is the largest whose buffers fit on every stage (`batch_for_budget`); swapping
frees D - 2 buffers, so its batch is about D/2 times larger. Whether that pays is a cost-model
question (`choose`): the next microbatch's swap-in (its whole context, over the device<->host
link) must hide under the current step, else every step waits for the link. The engine
(`ServeConfig.swapping="auto"`) and the simulator use the same rule, and the run's summary
carries the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig


class KVBudgetError(ValueError):
  """The device KV budget cannot hold the buffers the chosen mode needs (not even one row)."""


def row_bytes(model: ModelConfig, layers: int, max_len: int) -> int:
  """Device bytes of one batch row of a stage's cache buffer: K and V over `max_len` positions
  of `layers` layers, plus the row's int32 length (exactly `cache_nbytes` / B)."""
  return 2 * layers * max_len * model.num_kv_heads * model.head_dim * model.dtype_bytes + 4


def buffers(depth: int, swapping: bool) -> int:
  """Cache buffers a worker holds: one per microbatch in flight, or two with swapping (even at
  depth 1: the policy always keeps two, one computing and one loading)."""
  return 2 if swapping else depth


def batch_for_budget(model: ModelConfig, layers: Sequence[int], max_len: int, budget: float,
                     depth: int, swapping: bool) -> int:
  """The largest microbatch size whose buffers fit `budget` bytes on every stage."""
  worst = max(row_bytes(model, n, max_len) for n in layers)
  nbuf = buffers(depth, swapping)
  batch = int(budget // (nbuf * worst))
  if batch < 1:
    what = ("two buffers (swapping)" if swapping else
            f"{nbuf} buffer(s) (one per microbatch in flight)")
    raise KVBudgetError(
        f"device KV budget of {int(budget)} bytes per worker cannot hold {what} of one row: "
        f"a row of the largest stage ({max(layers)} layers, max_len {max_len}) takes {worst} "
        f"bytes, so at least {nbuf * worst} bytes are needed")
  return batch


@dataclasses.dataclass(frozen=True)
class SwapChoice:
  """What `choose` decided: swapping on or off, the batch it runs, and why."""
  swapping: bool
  batch: int
  batch_without: int | None     # batch without swapping under the budget (None: does not fit)
  batch_with: int | None        # batch with swapping under the budget
  reason: str


def hides(cost: cm.CostModel, link: cm.Link, layers: float, batch: int,
          context: int) -> tuple[bool, float, float]:
  """(the swap-in hides under the step, swap-in seconds, decode step seconds) for one stage."""
  swap = cm.swap_in_time(link, cost.model, layers, batch, context)
  step = cost.token_time(layers, batch, context)
  return swap <= step, swap, step


def choose(mode: str, model: ModelConfig, layers: Sequence[int], max_len: int,
           budget: float | None, depth: int, default_batch: int,
           cost: cm.CostModel | None = None, link: cm.Link | None = None,
           context: int | None = None, layer_scale: float = 1.0) -> SwapChoice:
  """Swapping on/off and the microbatch size for `mode` "off" | "on" | "auto".

  Without a budget the batch is `default_batch` (and "auto" stays off: swapping cannot enlarge
  the batch). With one, the batch is the largest that fits (`batch_for_budget`). "auto" turns
  swapping on only where the swap-in of the larger batch hides under its decode step on the
  slowest stage at `context` (default `max_len`) tokens and the throughput estimate
  batch / max(step, swap-in) beats the batch without swapping; `cost` is the modeled system
  (`layer_scale` maps served layers onto its layers) and `link` its device<->host link.
  """
  if mode not in ("off", "on", "auto"):
    raise ValueError(f"unknown swapping mode {mode!r}; expected 'off', 'on' or 'auto'")
  if budget is None:
    on = mode == "on"
    why = ("swapping on (no device KV budget: the batch is microbatch_size)" if on else
           "swapping off" + (" (auto: no device KV budget, so swapping cannot enlarge the "
                             "batch)" if mode == "auto" else ""))
    return SwapChoice(on, default_batch, None, None, why)
  if mode == "off":
    b = batch_for_budget(model, layers, max_len, budget, depth, False)
    return SwapChoice(False, b, b, None, f"swapping off: {depth} buffers of batch {b} fit")
  b_on = batch_for_budget(model, layers, max_len, budget, depth, True)
  try:
    b_off = batch_for_budget(model, layers, max_len, budget, depth, False)
  except KVBudgetError:
    b_off = None
  if mode == "on":
    return SwapChoice(True, b_on, b_off, b_on,
                      f"swapping on: 2 buffers of batch {b_on} fit (without: {b_off})")
  if b_off is None:
    return SwapChoice(True, b_on, None, b_on, f"auto: swapping on, the only mode that fits "
                      f"(2 buffers of batch {b_on}; {depth} buffers of one row do not)")
  if depth <= 2 or b_on <= b_off:
    return SwapChoice(False, b_off, b_off, b_on, f"auto: swapping off, it frees no memory at "
                      f"depth {depth} (batch {b_off} either way)")
  if cost is None or link is None:
    raise ValueError("swapping='auto' with a device KV budget needs a cost model and a link")
  ctx = max_len if context is None else context
  worst = max(layers) * layer_scale
  ok, swap, step_on = hides(cost, link, worst, b_on, ctx)
  step_off = cost.token_time(worst, b_off, ctx)
  gain = (b_on / max(step_on, swap)) / (b_off / step_off)
  nums = (f"swap-in of batch {b_on} at context {ctx} takes {swap * 1e3:.3g} ms over "
          f"{link.name}, its decode step {step_on * 1e3:.3g} ms; modeled throughput x{gain:.2f} "
          f"vs batch {b_off} without swapping")
  if ok and gain > 1:
    return SwapChoice(True, b_on, b_off, b_on, f"auto: swapping on: {nums}")
  return SwapChoice(False, b_off, b_off, b_on, f"auto: swapping off: {nums}")
