"""Stage plans: L layers -> D contiguous layer ranges -> disjoint device groups of a Mesh.

The mesh has axes ('stage', 'tensor'): stage s owns the devices mesh.devices[s], and its
parameters are placed on that sub-mesh, tensor-sharded Megatron-style when 'tensor' > 1. Each
family names the logical axes of its weights (`Family.param_axes`: q/k/v and the MLP's input
projections split by heads / KV heads / MLP features, the output projections by their input);
LOGICAL_TO_MESH says which logical axes the 'tensor' mesh axis splits. The KV cache is split by
KV heads.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dejavu_jax.config import ModelConfig
from dejavu_jax.partition import balanced_ranges
from dejavu_jax.models import families


@dataclasses.dataclass(frozen=True)
class StagePlan:
  ranges: tuple[tuple[int, int], ...]   # [start, stop) layers per stage
  tensor: int = 1

  @property
  def num_stages(self) -> int:
    return len(self.ranges)

  def layers(self, s: int) -> int:
    return self.ranges[s][1] - self.ranges[s][0]


def plan_stages(cfg: ModelConfig, num_stages: int, ranges=None, tensor: int = 1,
                num_devices: int | None = None) -> StagePlan:
  """Validates and returns a plan; every impossible plan is a ValueError that says why."""
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")
  if num_stages > cfg.num_layers:
    raise ValueError(f"cannot split {cfg.num_layers} layers into {num_stages} stages: more stages "
                     "than layers")
  if tensor < 1 or cfg.num_heads % tensor or cfg.num_kv_heads % tensor:
    raise ValueError(f"tensor parallelism {tensor} must be >= 1 and divide the "
                     f"{cfg.num_heads} attention heads and the {cfg.num_kv_heads} KV heads")
  num_devices = len(jax.devices()) if num_devices is None else num_devices
  if num_stages * tensor > num_devices:
    raise ValueError(f"plan needs {num_stages} stages x {tensor} devices = "
                     f"{num_stages * tensor} devices but only {num_devices} are available")
  if ranges is None:
    ranges = balanced_ranges(cfg.num_layers, num_stages)
  ranges = tuple((int(a), int(b)) for a, b in ranges)
  if len(ranges) != num_stages:
    raise ValueError(f"{len(ranges)} layer ranges given for {num_stages} stages")
  expect = 0
  for a, b in ranges:
    if b <= a:
      raise ValueError(f"stage range [{a}, {b}) is empty")
    if a != expect:
      what = "overlap" if a < expect else "leave a gap"
      raise ValueError(f"stage ranges {list(ranges)} {what} at layer {min(a, expect)}: they must "
                       f"cover [0, {cfg.num_layers}) contiguously")
    expect = b
  if expect != cfg.num_layers:
    raise ValueError(f"stage ranges {list(ranges)} end at layer {expect}, but the model has "
                     f"{cfg.num_layers} layers")
  return StagePlan(ranges=ranges, tensor=tensor)


def make_mesh(plan: StagePlan, devices=None) -> Mesh:
  """A ('stage', 'tensor') mesh over the first D * tensor devices (or `devices`)."""
  devices = jax.devices() if devices is None else list(devices)
  n = plan.num_stages * plan.tensor
  if len(devices) < n:
    raise ValueError(f"plan needs {n} devices, got {len(devices)}")
  return Mesh(np.asarray(devices[:n]).reshape(plan.num_stages, plan.tensor), ("stage", "tensor"))


def stage_mesh(mesh: Mesh, s: int) -> Mesh:
  """The 1-D ('tensor',) sub-mesh of stage s."""
  return Mesh(mesh.devices[s], ("tensor",))


# Logical axis -> mesh axis; a logical axis not named here (embed, vocab) is replicated.
LOGICAL_TO_MESH = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


def param_spec(path, cfg: ModelConfig) -> P:
  """PartitionSpec of a parameter (by its path) in a tensor-parallel stage of model `cfg`: the
  logical axes its family gives the (owner, leaf) pair, mapped by LOGICAL_TO_MESH; parameters
  without axes (norms, embeddings) are replicated."""
  names = [getattr(k, "key", str(k)) for k in path]
  leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
  axes = families.get(cfg.family).param_axes.get(owner, {}).get(leaf)
  if axes is None:
    return P()
  return P(*(LOGICAL_TO_MESH.get(a) for a in axes))


def param_shardings(sub: Mesh, params, cfg: ModelConfig):
  """NamedShardings of a (stage's) params tree on the stage sub-mesh `sub`."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: NamedSharding(sub, param_spec(p, cfg)), params)


def cache_sharding(sub: Mesh) -> NamedSharding:
  """KV [L, B, S, Hkv, K] split by KV heads over the stage's tensor devices."""
  return NamedSharding(sub, P(None, None, None, "tensor", None))


def replicated(sub: Mesh) -> NamedSharding:
  return NamedSharding(sub, P())
