"""Runtimes: the `Worker`/`Runtime` message boundary (api.py), the one factory that picks an
implementation from the config (`make`), the implementations (local.py: threads over the devices
of one process; ray*.py: Ray actor processes, any role, swapping or not; disagg.py: the prompt
and token worker sets of disaggregation), and the worker-side services that run beside a worker's steps: the replication
tap and replica store (replication.py), the snapshotter (snapshot.py) and the swapping
cache-placement policy (swapping.py).

Importing this package imports no implementation (and no JAX): `fault.strategies` imports
`runtime.api`, and the simulator imports the strategies without JAX. `make` imports the runtime
it builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

RUNTIMES = ("local", "ray")
ROLES = ("pipeline", "token", "prompt")


@dataclasses.dataclass
class RuntimeSpec:
  """What any runtime needs to run one worker set (plain data, built by the engine).

  programs: one compiled stage program per stage (local runtimes; [] for Ray, whose actors build
    their own from cfg, ranges and program).
  params_for: (stage) -> the params a (new) worker of that stage places (local runtimes).
  role: "pipeline" (one pipeline serving both phases), or disaggregation's "token" and "prompt"
    worker sets.
  """
  cfg: Any
  ranges: Sequence[tuple[int, int]]
  depth: int
  microbatch_size: int
  max_len: int
  heartbeat_s: float
  programs: Sequence = ()
  params_for: Callable[[int], Any] | None = None
  params: Any = None
  pace: Any = None
  checkpoint: str | None = None
  swapping: bool = False
  kv_budget_bytes: int | None = None
  role: str = "pipeline"
  host_slots: int = 0                 # token role: host slots per worker
  token_runtime: Any = None           # prompt role: the token runtime its streams land in
  layerwise: bool = True              # prompt role: stream each layer group as it is computed


def in_process(serve) -> bool:
  """Whether the runtime `serve` names runs its workers in this process (on this process's
  devices, over stage programs the engine compiles), or brings its own (Ray actors)."""
  if serve.cluster.runtime not in RUNTIMES:
    raise ValueError(f"unknown runtime {serve.cluster.runtime!r}; expected one of {RUNTIMES}")
  return serve.cluster.runtime == "local"


def make(serve, spec: RuntimeSpec):
  """The runtime `serve.cluster.runtime` names, over `spec`'s workers (not started): on Ray,
  every role (a pipeline, disaggregation's token and prompt worker sets) with or without
  swapping, each worker an actor process."""
  kind = serve.cluster.runtime
  if kind not in RUNTIMES:
    raise ValueError(f"unknown runtime {kind!r}; expected one of {RUNTIMES}")
  if spec.role not in ROLES:
    raise ValueError(f"unknown worker role {spec.role!r}; expected one of {ROLES}")
  if kind == "ray":
    from dejavu_jax.runtime.ray import RayRuntime  # pylint: disable=g-import-not-at-top
    cl = serve.cluster
    return RayRuntime(
        spec.cfg, spec.ranges, serve.topology.tensor, serve.topology.program, spec.params,
        spec.depth, spec.microbatch_size, spec.max_len, spec.pace, spec.heartbeat_s,
        spec.checkpoint, cl.ray_address, cl.ray_placement, cl.ray_transport,
        cl.ray_gpus_per_stage, spares=cl.ray_spares, role=spec.role, swapping=spec.swapping,
        kv_budget_bytes=spec.kv_budget_bytes, host_slots=spec.host_slots,
        token_runtime=spec.token_runtime, layerwise=spec.layerwise)
  if spec.role == "pipeline":
    from dejavu_jax.runtime.local import LocalRuntime  # pylint: disable=g-import-not-at-top
    return LocalRuntime(spec.programs, spec.params_for, spec.depth, spec.microbatch_size,
                        spec.max_len, spec.pace, spec.heartbeat_s, swapping=spec.swapping,
                        kv_budget_bytes=spec.kv_budget_bytes)
  from dejavu_jax.runtime import disagg  # pylint: disable=g-import-not-at-top
  if spec.role == "token":
    return disagg.TokenRuntime(spec.programs, spec.params_for, spec.depth,
                               spec.microbatch_size, spec.max_len, spec.pace, spec.heartbeat_s,
                               spec.ranges, spec.host_slots)
  return disagg.PromptRuntime(spec.programs, spec.params_for, spec.depth, spec.microbatch_size,
                              spec.max_len, spec.pace, spec.heartbeat_s, spec.ranges,
                              spec.token_runtime, layerwise=spec.layerwise)
