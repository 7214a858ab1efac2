"""What an engine is sized to: the serve config against the model's limits (`check_limits`),
and the microbatch size and swapping from the device KV budget (`choose_swapping`, kv/budget.py)
over the modeled device<->host link (`host_link`)."""

from __future__ import annotations

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig, ServeConfig
from dejavu_jax.kv import budget as kv_budget


def check_limits(cfg: ModelConfig, serve: ServeConfig) -> None:
  """The serve config against the model: what no prompt path can serve."""
  if serve.topology.max_len > cfg.max_positions:
    raise ValueError(f"max_len {serve.topology.max_len} exceeds the model's {cfg.max_positions} "
                     "positions")
  if serve.sampling.top_k > cfg.vocab_size:
    raise ValueError(f"top_k {serve.sampling.top_k} exceeds the model's vocabulary of "
                     f"{cfg.vocab_size} tokens")
  if serve.sampling.eos_token_id is not None and serve.sampling.eos_token_id >= cfg.vocab_size:
    raise ValueError(f"eos_token_id {serve.sampling.eos_token_id} is outside the model's vocabulary "
                     f"[0, {cfg.vocab_size})")


def host_link(cost_model):
  """The modeled device<->host link: the cost model's hardware's, else PCIe 4."""
  hw = getattr(cost_model, "hardware", None)
  return getattr(hw, "host_link", None) or cm.LINKS["pcie4"]


def choose_swapping(engine, serve: ServeConfig, cost_model, swap_link,
                    layer_scale: float, devices) -> kv_budget.SwapChoice:
  """Swapping on/off and the microbatch size from the ServeConfig's budget (kv/budget.py)."""
  budget = serve.memory.device_kv_budget_bytes
  if serve.memory.device_kv_budget_fraction is not None:
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if not limit:
      raise kv_budget.KVBudgetError(
          f"device_kv_budget_fraction needs a device that reports its memory (a GPU); "
          f"{devices[0].platform} does not: give device_kv_budget_bytes instead")
    budget = int(serve.memory.device_kv_budget_fraction * limit)
  engine.kv_budget_bytes = budget   # the workers keep their swap-in staging within it
  layers = [stop - start for start, stop in engine.plan.ranges]
  cost = cost_model if serve.memory.swapping == "auto" and budget is not None else None
  if serve.memory.swapping == "auto" and budget is not None and cost is None:
    # Real pacing without a cost model: judge the swap on this machine's measured roofline.
    cost = cm.roofline(engine.cfg, cm.measure_cpu())
    swap_link, layer_scale = cost.hardware.host_link, 1.0
  return kv_budget.choose(serve.memory.swapping, engine.cfg, layers, serve.topology.max_len, budget,
                          engine.plan.num_stages, serve.topology.microbatch_size, cost, swap_link,
                          serve.memory.swap_context, layer_scale)
