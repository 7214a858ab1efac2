"""Which disaggregated prompt/token splits fit memory, by the planner's own check.

`feasible_splits(model, hardware, machines, ...)` lists the (Dp, Dt) with Dp + Dt = machines for
which the planner's memory model (`planner.Memory`: a prompt stage holds its weights and one
prompt cache per layer, a token stage its weights and the caches of every microbatch in flight)
admits the split; `check_split` says why one does not. The simulator itself does not enforce
memory, so experiments ask here before simulating a split.
"""

from __future__ import annotations

import math

from dejavu_jax import costmodel as cm
from dejavu_jax import planner


def _memory(model, hardware: str, prompt_len: int, output_len: int, batch: int,
            gpus_per_machine: int) -> tuple[planner.Memory, int]:
  cost = cm.roofline(model, hardware, gpus_per_machine=gpus_per_machine)
  wl = planner.Workload(prompt_len, output_len, batch)
  return planner.Memory.of(model, wl, cost.machine_memory_bytes), model.num_layers


def check_split(model, hardware: str, dp: int, dt: int, prompt_len: int, output_len: int,
                batch: int, gpus_per_machine: int = 2) -> str | None:
  """None when Dp prompt and Dt token stages fit memory, else why not."""
  mem, L = _memory(model, hardware, prompt_len, output_len, batch, gpus_per_machine)
  pn, tn = mem.prompt_layers(), mem.token_layers(L)
  if pn < 1 or math.ceil(L / pn) > dp:
    return (f"a prompt stage holds at most {max(pn, 0)} of {model.name}'s {L} layers: "
            f"needs Dp >= {math.ceil(L / pn) if pn >= 1 else 'inf'}, got {dp}")
  if tn < 1 or math.ceil(L / tn) > dt:
    return (f"a token stage holds at most {max(tn, 0)} of {L} layers with its caches: needs "
            f"Dt >= {math.ceil(L / tn) if tn >= 1 else 'inf'}, got {dt}")
  return None


def feasible_splits(model, hardware: str, machines: int, prompt_len: int, output_len: int,
                    batch: int, gpus_per_machine: int = 2) -> list[tuple[int, int]]:
  """Every memory-feasible (Dp, Dt) with Dp + Dt = machines, Dp ascending."""
  return [(dp, machines - dp) for dp in range(1, machines)
          if check_split(model, hardware, dp, machines - dp, prompt_len, output_len, batch,
                         gpus_per_machine) is None]
