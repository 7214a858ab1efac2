"""What a disaggregated deployment may be, and how its paced steps last.

`check_split` validates a `ServeConfig`'s prompt/token split against the model and the devices
(every impossible split is a `DisaggregationError` naming the constraint); `default_host_slots`
is the sound default number of host slots per token worker; `prompt_pace_fn` paces prompt steps
with layer-wise streaming as the simulator charges them (`costmodel.streamed_prompt_time`).
"""

from __future__ import annotations

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig, ServeConfig
from dejavu_jax.serving.pacing import make_pace_fn


class DisaggregationError(ValueError):
  """An impossible prompt/token split (names the constraint)."""


def default_host_slots(prompt_stages: int, token_stages: int) -> int:
  """Dp + Dt: one slot per prompt in flight, plus one ready microbatch per token stage, so neither
  pipeline waits on slots in steady state (2 Dt starves the prompt side when Dp > 2 Dt)."""
  return prompt_stages + token_stages


def check_split(cfg: ModelConfig, serve: ServeConfig, num_devices: int) -> tuple[int, int, int]:
  """(Dp, Dt, host_slots) of `serve`, or a DisaggregationError naming what is impossible."""
  dp, dt = serve.disagg.prompt_stages, serve.disagg.token_stages
  for name, v in (("prompt_stages", dp), ("token_stages", dt)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise DisaggregationError(f"{name} must be an integer >= 1 for a disaggregated engine, "
                                f"got {v!r}")
  for name, v in (("prompt_stages", dp), ("token_stages", dt)):
    if v > cfg.num_layers:
      raise DisaggregationError(f"{name} = {v} exceeds the model's {cfg.num_layers} layers: "
                                "every stage needs at least one layer")
  need = (dp + dt) * serve.topology.tensor
  if need > num_devices:
    raise DisaggregationError(f"prompt_stages {dp} + token_stages {dt} at tensor {serve.topology.tensor} "
                              f"need {need} devices, but only {num_devices} are available")
  if serve.topology.stage_ranges is not None:
    raise DisaggregationError("stage_ranges is not supported with disaggregation: both "
                              "pipelines use the balanced split of the layers")
  if serve.disagg.stream_link is not None and serve.disagg.stream_link not in cm.LINKS:
    raise DisaggregationError(f"unknown stream_link {serve.disagg.stream_link!r}; known: "
                              f"{', '.join(cm.LINKS)}")
  slots = default_host_slots(dp, dt) if serve.disagg.host_slots is None else serve.disagg.host_slots
  if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
    raise DisaggregationError(f"host_slots must be an integer >= 1, got {slots!r}")
  return dp, dt, slots


def modeled_prompt_len(cost_model, tokens: int) -> int:
  """The prompt length a cost model charges for `tokens` real ones (a cost model may stand a
  short real prompt for a paper-scale one through `modeled_prompt_len`)."""
  f = getattr(cost_model, "modeled_prompt_len", None)
  return tokens if f is None else f(tokens)


def prompt_pace_fn(cost_model, num_stages: int, time_scale: float, layer_scale: float,
                   stream_link: cm.Link | None):
  """Paced prompt steps: compute overlapped layer by layer with streaming the previous layer's
  KV over `stream_link` (costmodel.streamed_prompt_time), as the simulator charges them."""
  base = make_pace_fn(cost_model, num_stages, time_scale, layer_scale)

  def pace(stage: int, kind: str, layers: int, batch: int, tokens: int) -> float:
    t = base(stage, kind, layers, batch, tokens)
    if stream_link is None:
      return t
    n = max(1, round(layers * layer_scale))
    x = stream_link.transfer_time(cm.prompt_kv_bytes_per_layer(
        cost_model.model, batch, modeled_prompt_len(cost_model, tokens)))
    return cm.streamed_prompt_time(t, n, x * time_scale)

  return pace
