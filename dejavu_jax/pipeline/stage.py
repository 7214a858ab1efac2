"""StageProgram: the compiled prefill/decode steps of one pipeline stage on its sub-mesh.

Stateless: the worker that runs it owns the params and the per-microbatch KV caches. Shapes are
static per (microbatch size, prompt bucket, cache length), so serving compiles a handful of
programs per stage and decoding never recompiles. Cache arguments are donated.

A prefill can also run layer group by layer group (`StageSlot.prefill_layerwise`): one jitted
program per group [a, b) of the stage's layers (the embedding runs with the first, the head with
the last), dispatched from a Python loop on the caller's thread, which is handed the cache after
each group is dispatched (a disaggregated prompt worker streams that group's KV from there while
the next group computes). The groups run the same stage function as a pipeline split at their
boundaries would, so the tokens are the whole-stage prefill's.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import ModelConfig
from dejavu_jax.kv.cache import KVCache, init_cache_for
from dejavu_jax.models.decoder import stage_params
from dejavu_jax.models.generate import decode_context, decode_params, jit, step_functions
from dejavu_jax.pipeline import plan as plan_lib
from dejavu_jax.stream import packing

# XLA collectives on forced CPU devices, dispatched asynchronously from several threads, can
# deadlock (measured: about half the runs). Tensor-parallel stages on CPU devices therefore
# dispatch and complete their step under one process-wide lock. Only there: on GPUs the lock would
# serialize the stages of a pipeline, which is exactly the overlap pipelining is for.
_COLLECTIVE_LOCK = threading.Lock()


def needs_collective_lock(devices) -> bool:
  """Whether steps with collectives over `devices` must be serialized (CPU devices only)."""
  return any(d.platform == "cpu" for d in devices)


class StageSlot:
  """Where stage `s` of `plan` sits: its layers [start, stop) and its sub-mesh of `mesh` (what
  every stage program, real or fake, shares)."""

  def __init__(self, cfg: ModelConfig, plan: plan_lib.StagePlan, mesh, s: int):
    self.cfg, self.index = cfg, s
    self.start, self.stop = plan.ranges[s]
    self.first, self.last = self.start == 0, self.stop == cfg.num_layers
    self.num_layers = self.stop - self.start
    self.sub = plan_lib.stage_mesh(mesh, s)
    self.tensor = plan.tensor
    self.devices = tuple(self.sub.devices.flat)
    self._lock_collectives = needs_collective_lock(self.devices)

  def layer_groups(self, group: int = 1) -> list[tuple[int, int]]:
    """The stage's layers as consecutive global ranges of `group` layers (the last may be
    shorter)."""
    if group < 1:
      raise ValueError(f"layer group size must be >= 1, got {group}")
    return [(a, min(a + group, self.stop)) for a in range(self.start, self.stop, group)]

  def prefill_layerwise(self, params, cache: KVCache, x, positions, emit, group: int = 1,
                        pack=None):
    """The prefill, one layer group at a time. After group [a, b) (global) is dispatched,
    `emit((a, b), cache, packets)` runs on this thread: `packets` are the prompt's KV of the
    global ranges `pack(a, b)` names (default none), as `stream.packing.Packed` (positions
    [0, prompt bucket)), already dispatched. `cache` holds layers up to b; the next group donates
    it, so what `emit` reads of it must be dispatched before it returns (XLA orders those reads
    before the donation). Returns (cache, out) as `prefill`; `cache` is donated."""
    x, positions = self.to_stage(x), self.to_stage(jnp.asarray(positions, jnp.int32))
    for a, b in self.layer_groups(group):
      ranges = tuple(tuple(r) for r in pack(a, b)) if pack is not None else ()
      cache, x, packets = self._prefill_group(params, cache, x, positions, a, b, ranges)
      emit((a, b), cache, packets)
    return cache, x

  def _prefill_group(self, params, cache, x, positions, a: int, b: int, ranges):
    """(cache, out, [Packed of each global range in `ranges`]) of the prefill of global layers
    [a, b) of this stage (inputs placed)."""
    raise NotImplementedError


class StageProgram(StageSlot):
  """Compiled steps of stage `s` of `plan` on `mesh`."""

  def __init__(self, cfg: ModelConfig, plan: plan_lib.StagePlan, mesh, s: int):
    super().__init__(cfg, plan, mesh, s)
    rep = plan_lib.replicated(self.sub)
    kv_sharding = plan_lib.cache_sharding(self.sub)
    self._rep = rep
    self._cache_sharding = KVCache(k=kv_sharding, v=kv_sharding, lengths=rep)
    prefill, decode = step_functions(cfg, self.start, self.stop)
    out = (self._cache_sharding, rep)
    self._prefill = jit(prefill, donate_argnums=(1,), out_shardings=out)
    self._decode = jit(decode, donate_argnums=(1,), out_shardings=out,
                       static_argnames=("context",))
    self._groups: dict[tuple[int, int], object] = {}   # (a, b) -> jitted group prefill

  def place_params(self, params):
    """This stage's subset of the whole model's params, placed (and sharded) on its devices."""
    sub = stage_params(self.cfg, params, self.start, self.stop)
    return jax.device_put(sub, plan_lib.param_shardings(self.sub, sub, self.cfg))

  def new_cache(self, batch: int, max_len: int) -> KVCache:
    cache = init_cache_for(self.cfg, self.num_layers, batch, max_len)
    return jax.device_put(cache, self._cache_sharding)

  def place_cache(self, cache: KVCache) -> KVCache:
    """A cache (e.g. restored from a host replica) placed and sharded on this stage's devices."""
    return jax.device_put(cache, self._cache_sharding)

  def to_stage(self, x):
    """Moves an input (tokens, hidden states, positions) onto this stage's devices."""
    return jax.device_put(x, self._rep)

  def prefill(self, params, cache: KVCache, x, positions):
    """See `step_functions`; `cache` is donated."""
    return self._run(self._prefill, params, cache, x, positions)

  def decode(self, params, cache: KVCache, x, positions):
    """See `step_functions`; `cache` is donated. Attention reads the bucketed context of the
    step's longest row (`decode_context`: one compile per bucket)."""
    context = decode_context(np.asarray(positions), cache.max_len)
    params = decode_params(self.cfg, params, self.stop == self.cfg.num_layers)
    return self._run(functools.partial(self._decode, context=context), params, cache, x,
                     positions)

  def _prefill_group(self, params, cache, x, positions, a, b, ranges):
    # The packets are gathered inside the group's program: a separate gather program still
    # reading the cache when the next group donates it made XLA:CPU steps markedly slower.
    key = (a, b, ranges, int(np.shape(positions)[1]))
    fn = self._groups.get(key)
    if fn is None:
      fn = self._groups[key] = jit(_group_prefill(self.cfg, self.start, a, b, ranges, key[3]),
                                   donate_argnums=(1,),
                                   out_shardings=(self._cache_sharding, self._rep, self._rep))
    return self._run(fn, params, cache, x, positions)

  def _run(self, fn, params, cache, x, positions):
    x, positions = self.to_stage(x), self.to_stage(jnp.asarray(positions, jnp.int32))
    if self.tensor == 1 or not self._lock_collectives:
      return fn(params, cache, x, positions)
    with _COLLECTIVE_LOCK:
      out = fn(params, cache, x, positions)
      jax.block_until_ready(out)
      return out


def _group_prefill(cfg: ModelConfig, base: int, a: int, b: int, ranges=(), size: int = 0):
  """prefill(params, cache, x, positions) -> (cache, out, packets) of global layers [a, b) over a
  stage's whole cache (whose layer 0 is global layer `base`): the stage [a, b)'s prefill on that
  slice of it, plus positions [0, size) of the global layer ranges `ranges`, packed."""
  prefill, _ = step_functions(cfg, a, b)

  def fn(params, cache: KVCache, x, positions):
    lo, hi = a - base, b - base
    sub = KVCache(k=cache.k[lo:hi], v=cache.v[lo:hi], lengths=cache.lengths)
    sub, out = prefill(stage_params(cfg, params, a, b), sub, x, positions)
    cache = KVCache(k=cache.k.at[lo:hi].set(sub.k), v=cache.v.at[lo:hi].set(sub.v),
                    lengths=sub.lengths)
    packets = [packing.gather(cache, 0, size, (r0 - base, r1 - base), layer_base=base)
               for r0, r1 in ranges]
    return cache, out, packets

  return fn
