"""Execution pacing: how long a stage step lasts in `paced` mode.

In paced mode every stage step still computes for real (the tokens are real), then sleeps until
the duration a cost model gives for that step has passed. Why: on this 2-core machine one XLA CPU
device already uses both cores, so stages cannot really overlap; pacing makes pipeline bubbles and
scheduling effects show in wall-clock time as they would on D accelerators, e.g. "OPT-66B over 4
A100 stages" (`costmodel.roofline(get_model_config('opt_66b', dtype='float16'), 'a100_80gb')`).
A modeled step starts when both its input and its stage are ready (the worker (runtime/local.py) keeps that
clock), so thread hand-offs shorter than the modeled time do not stretch the schedule. The modeled
time must exceed the real compute time for the pacing to be exact; the workers' `overruns` stat counts
the steps where it did not.
"""

from __future__ import annotations

from dejavu_jax import costmodel as cm


def make_pace_fn(cost_model, num_stages: int, time_scale: float = 1.0,
                 layer_scale: float = 1.0, swap_link=None):
  """A `PaceFn` for the workers: (stage, kind, layers, batch, tokens) -> seconds.

  Prefill lasts cost_model.prompt_time(layers, prompt_len, batch), a decode step
  cost_model.token_time(layers, batch, context); the last stage adds head_time (LM head) for the
  tokens whose logits it computes. `time_scale` stretches every duration (e.g. 0.1 replays a
  paper-scale model ten times faster than real time). `layer_scale` maps the served model's layers
  onto the cost model's (cost layers / served layers): a 2-layer test model paced by OPT-66B's
  cost model behaves as 2 stages of 32 OPT-66B layers each. Kinds "swap_in" (tokens: the context
  brought back) and "swap_out" (one token's delta) time microbatch swapping over `swap_link`.
  """

  def pace(stage: int, kind: str, layers: int, batch: int, tokens: int) -> float:
    layers = layers * layer_scale
    if kind in ("swap_in", "swap_out"):   # microbatch swapping over the device<->host link
      if swap_link is None:
        raise ValueError("paced swapping needs a swap link (the cost model's host link)")
      if kind == "swap_in":
        return cm.swap_in_time(swap_link, cost_model.model, layers, batch, tokens) * time_scale
      return cm.swap_out_time(swap_link, cost_model.model, layers, batch) * time_scale
    if kind == "prefill":
      t = cost_model.prompt_time(layers, tokens, batch)
    else:
      t = cost_model.token_time(layers, batch, tokens)
    if stage == num_stages - 1:
      t += cost_model.head_time(batch)
    return t * time_scale

  return pace
