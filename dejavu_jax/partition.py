"""Splitting a model's layers over pipeline stages: the one implementation.

`balanced_ranges(num_layers, num_stages)` gives contiguous [start, stop) layer ranges whose sizes
differ by at most one, the earlier stages taking the extra layers: 6 layers over 4 stages is
((0, 2), (2, 4), (4, 5), (5, 6)). The pipeline planner, the streaming router and the simulator
all split this way, so a simulated stage, a served stage and a routed cache agree on which
layers a stage owns. This module imports nothing from the package, so any module may use it.
"""

from __future__ import annotations


def balanced_ranges(num_layers: int, num_stages: int) -> tuple[tuple[int, int], ...]:
  """Contiguous, non-empty ranges whose sizes differ by at most one (earlier stages get the extra).

  Raises ValueError when there are no stages or more stages than layers.
  """
  if num_stages < 1:
    raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages: a pipeline "
                     "needs at least one stage")
  if num_stages > num_layers:
    raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages: more stages "
                     "than layers")
  base, extra = divmod(num_layers, num_stages)
  out, start = [], 0
  for s in range(num_stages):
    stop = start + base + (s < extra)
    out.append((start, stop))
    start = stop
  return tuple(out)
