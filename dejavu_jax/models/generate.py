"""Jitted prefill/decode steps over length buckets, sampling, and a batched generation loop.

Static per compile: the model config, the stage's layer range, the batch size, the prompt bucket
and the cache length. Traced: tokens, positions, lengths, PRNG keys. So a decode loop compiles
once, and a prefill compiles once per bucket (powers of two from 16). Every decode step takes
its params through `decode_params`: on one CPU device, float32 weights packed once for the CPU
custom calls of `models.cpu_kernels` (the decode matmuls at 0.7-1.0 of the read bandwidth where
XLA's dots reach ~0.35); elsewhere the params as they are.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import ModelConfig, SamplingConfig
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.kv.cache import KVCache, init_cache_for
from dejavu_jax.models import cpu_kernels
from dejavu_jax.models.decoder import PackedParams, check_layer_range, pack_params, stage_apply



def step_functions(cfg: ModelConfig, start: int = 0, stop: int | None = None):
  """The un-jitted (prefill, decode) step functions of the stage [start, stop).

  prefill(params, cache, x, positions) -> (cache, out)
    Starts a new sequence in every row (lengths are reset: a reused slot's stale entries are
    overwritten or masked). x: tokens [B, T] (first stage) or hidden [B, T, D]; positions [B, T],
    -1 marks padding. out: logits [B, V] of each row's last prompt token on the last stage, else
    hidden [B, T, D].
  decode(params, cache, x, positions, context=None) -> (cache, out)
    x: tokens [B] (first stage) or hidden [B, 1, D]; positions [B] (a row's current length;
    -1 for a row that must not write). out: logits [B, V] (last stage) or hidden [B, 1, D].
    context (static; None: the cache length): attention reads the first `context` positions
    only; it must exceed every row's position (`decode_context` picks a bucket), so a step's cost
    follows the context rather than the allocated cache length.
  """
  stop = cfg.num_layers if stop is None else stop
  check_layer_range(cfg, start, stop)
  last = stop == cfg.num_layers

  def prefill(params, cache: KVCache, x, positions):
    cache = cache.replace(lengths=jnp.zeros_like(cache.lengths))
    select = jnp.argmax(positions, axis=1) if last else None
    cache, out = stage_apply(cfg, start, stop, params, cache, x, positions, select=select)
    return cache, (out[:, 0] if last else out)

  def decode(params, cache: KVCache, x, positions, context: int | None = None):
    if positions.ndim == 1:
      positions = positions[:, None]
    if start == 0 and x.ndim == 1:
      x = x[:, None]
    context = cache.max_len if context is None else min(context, cache.max_len)
    cache, out = stage_apply(cfg, start, stop, params, cache, x, positions, context=context)
    return cache, (out[:, 0] if last else out)

  return prefill, decode


# XLA:CPU hands reductions to YNNPACK by default. A library reduction cannot read a slice of the
# stacked cache in place, so XLA materializes each layer's slice of the cache and then copies the
# whole cache to keep the in-place cache update legal (measured with the reduction form of
# layers._attend_one: it doubled a batch-1 decode step). Matmuls stay with YNNPACK (its batch-8
# LM-head matmul is about twice as fast as XLA's Eigen one), one library call per dot:
# LIBRARY_FUSION_TYPE_DOT fuses chains of dots and their elementwise neighbours into one YNNPACK
# graph, which ran the 73 matmuls of a batch-8 OPT-125M step at 1.6x the CPU time of separate dots
# (113 vs 70 ms, one CPU, load 3.8), and a whole batch-8 step took 19% (OPT-125M) and 11%
# (SmolLM2-135M) less CPU time with separate ones (benchmarks/decode_matmul.py; RESULTS.md).
# Decode steps on one CPU device read their weights through `cpu_kernels` instead (decode_params);
# these options still serve prefill, tensor-parallel stages and DEJAVU_CPU_KERNELS=0.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def jit(fn, **kw):
  """jax.jit with CPU_COMPILER_OPTIONS when the default backend is the CPU."""
  if jax.default_backend() == "cpu":
    kw["compiler_options"] = CPU_COMPILER_OPTIONS
  return jax.jit(fn, **kw)


def decode_context(positions, max_len: int) -> int:
  """The attention context of a decode step at `positions` (host ints, [B]): the bucket of the
  longest row after the step, so decode compiles once per bucket (as prefill does)."""
  return bucket_length(int(np.max(positions)) + 1, max_len)


# (treedef, ids of every leaf, head) -> (weakrefs to those leaves, packed tree or None). An entry
# leaves when any of its leaves dies, so a key never outlives the arrays it names (ids are unique
# among live objects) and a replaced model's packed copy is freed with it.
_PACKS: dict = {}
_PACKS_LOCK = threading.Lock()


def decode_params(cfg: ModelConfig, params, head: bool = True):
  """The params a decode step should be given: `params` with its float32 kernels packed for the
  CPU custom call (`decoder.PackedParams`, packed once per set of weight arrays and reused while
  they live), or `params` unchanged where the call does not apply (not one CPU device, traced
  values, no kernels, kernels unavailable or `DEJAVU_CPU_KERNELS=0`). `head`: the stage computes
  logits (a tied LM head is packed too). Every decode path of the project goes through here, so
  the plain single-device run and every pipeline, microbatch and recovery decode with the same
  numerics. Called on every decode step: a hit costs one flatten of the params (~0.1 ms for
  SmolLM2-135M's 272 arrays)."""
  if isinstance(params, PackedParams):
    return params
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if (not leaves or not isinstance(leaves[0], jax.Array)
      or isinstance(leaves[0], jax.core.Tracer)):
    return params
  key = (treedef, tuple(map(id, leaves)), head)
  with _PACKS_LOCK:
    hit = _PACKS.get(key)
  if hit is None:
    devices = leaves[0].sharding.device_set
    # the platform before `available()`: on a GPU the CPU kernels are never built
    if (len(devices) != 1 or next(iter(devices)).platform != "cpu"
        or not cpu_kernels.available()):
      return params
    packed = pack_params(cfg, params, head).packed or None
    drop = lambda _, k=key: _PACKS.pop(k, None)   # noqa: E731
    hit = ([weakref.ref(leaf, drop) for leaf in leaves], packed)
    with _PACKS_LOCK:
      _PACKS[key] = hit
  elif not cpu_kernels.available():   # DEJAVU_CPU_KERNELS=0 set after the packing
    return params
  return params if hit[1] is None else PackedParams(params=params, packed=hit[1])


class PackedDecode:
  """A jitted decode function called with `decode_params(cfg, params, head)` in place of its
  first argument (`lower` too, for inspecting the program)."""

  def __init__(self, fn, cfg: ModelConfig, head: bool):
    self.fn, self.cfg, self.head = fn, cfg, head

  def __call__(self, params, *args, **kw):
    return self.fn(decode_params(self.cfg, params, self.head), *args, **kw)

  def lower(self, params, *args, **kw):
    return self.fn.lower(decode_params(self.cfg, params, self.head), *args, **kw)

  def __getattr__(self, name):   # the jitted function's other attributes (e.g. its cache size)
    return getattr(self.fn, name)


@functools.lru_cache(maxsize=None)
def make_steps(cfg: ModelConfig, start: int = 0, stop: int | None = None):
  """Jitted `step_functions` (see there) for one device. The cache argument of both is donated:
  the caller must not read the cache it passed in again (copy it first if a background thread
  still needs it). decode's `context` is static (one compile per value); decode packs the params
  (`decode_params`)."""
  prefill, decode = step_functions(cfg, start, stop)
  head = (cfg.num_layers if stop is None else stop) == cfg.num_layers
  return (jit(prefill, donate_argnums=(1,)),
          PackedDecode(jit(decode, donate_argnums=(1,), static_argnames=("context",)), cfg, head))


@functools.lru_cache(maxsize=None)
def make_decode_n(cfg: ModelConfig, num_steps: int, sampling: SamplingConfig | None = None):
  """A jitted loop of `num_steps` whole-model decode steps that feeds each sampled token back.

  decode_n(params, cache, tokens, positions, key, context=None) -> (cache, new_tokens)
    tokens: [B] each row's latest token, not yet in the cache; positions: [B] its position;
    key: a PRNG key (unused when greedy); context (static): as `step_functions`' decode, for
    every step of the loop (it must exceed the last step's positions).
    new_tokens: [B, num_steps] the tokens sampled after it (greedy by default). The cache
    argument is donated. Every row runs all steps (no EOS stop): a caller that needs early stops
    or per-row lengths steps with `make_steps` instead.

  One dispatch and one host transfer for the whole loop, where `generate` pays both per token
  (measured: about 2% of a batch-1 OPT-125M step on CPU; nothing at batch 8).
  """
  sampling = GREEDY if sampling is None else sampling
  _, decode = step_functions(cfg)

  def decode_n(params, cache: KVCache, tokens, positions, key, context: int | None = None):
    def step(carry, _):
      cache, tok, pos, key = carry
      key, sub = jax.random.split(key)
      cache, logits = decode(params, cache, tok, pos, context)                 # [B, V]
      nxt = sample(logits, sub, sampling.temperature, sampling.top_k, sampling.top_p)
      return (cache, nxt, pos + 1, key), nxt
    (cache, _, _, _), new = jax.lax.scan(step, (cache, tokens, positions, key), None,
                                         length=num_steps)
    return cache, new.T                                                         # [B, steps]

  return PackedDecode(jit(decode_n, donate_argnums=(1,), static_argnames=("context",)), cfg, True)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Next tokens [B] from logits [B, V]: greedy when temperature == 0, else tempered sampling
  restricted to the top_k most likely tokens (0: all) and the top_p probability mass."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# One sampling config for the engine and this loop (declared and checked in config.py).
GREEDY = SamplingConfig()


def _is_int(x) -> bool:
  # bool is an int subclass but never a token id or a count; floats are never silently truncated.
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def validate_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     max_len: int | None = None) -> None:
  """Raises ValueError naming the first problem: `max_new_tokens` not an integer >= 1, a prompt
  that is not a sequence, empty, with a token id that is not an integer or outside the
  vocabulary, or (plus the tokens to generate) longer than the model's positions or the cache.
  Everything is checked by type first: 5.7 or "5" is an error, never truncated or parsed."""
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1 and an integer, got {max_new_tokens!r}")
  if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
    raise ValueError(f"prompts must be a sequence of prompts, got {type(prompts).__name__}")
  if len(prompts) == 0:
    raise ValueError("no prompts given")
  limit = cfg.max_positions if max_len is None else min(max_len, cfg.max_positions)
  for i, p in enumerate(prompts):
    _check_tokens(cfg, i, p)
    if len(p) + max_new_tokens > limit:
      raise ValueError(f"prompt {i} of {len(p)} tokens + {max_new_tokens} new tokens is longer "
                       f"than the context of {limit} positions")


def _check_tokens(cfg: ModelConfig, i: int, p) -> None:
  if isinstance(p, (list, tuple, range)):
    # Element by element: np.asarray would turn [True, 3] into ints and ["5"] into a str array.
    bad = next((t for t in p if not _is_int(t)), None)
    if bad is not None:
      raise ValueError(f"prompt {i} has token id {bad!r} ({type(bad).__name__}), not an integer")
    # Python ints may be beyond int64: compare them before any conversion.
    bad = next((t for t in p if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
      raise ValueError(f"prompt {i} has token id {int(bad)} outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
    arr = np.asarray(p, np.int64)
  else:
    arr = None if isinstance(p, (str, bytes)) else np.asarray(p)   # numpy or jax arrays
    if arr is None or arr.ndim != 1:
      raise ValueError(f"prompt {i} is not a sequence of token ids: {type(p).__name__} "
                       f"{str(p)[:40]!r}")
    if arr.dtype.kind not in "iu" and arr.size:
      raise ValueError(f"prompt {i} has token ids of dtype {arr.dtype}, not integers")
  if arr.size == 0:
    raise ValueError(f"prompt {i} is empty")
  bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
  if bad.size:
    raise ValueError(f"prompt {i} has token id {int(bad[0])} outside the vocabulary "
                     f"[0, {cfg.vocab_size})")


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int):
  """Right-padded tokens [B, bucket] and positions [B, bucket] (-1 on padding), as numpy."""
  b = len(prompts)
  tokens = np.full((b, bucket), pad_id, np.int32)
  positions = np.full((b, bucket), -1, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    positions[i, :len(p)] = np.arange(len(p))
  return tokens, positions


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig = GREEDY, key: jax.Array | None = None,
             eos_token_id: int | None = None, max_len: int | None = None) -> list[list[int]]:
  """Generates up to `max_new_tokens` per prompt on one device; a row stops at EOS (kept in its
  output). Rows of different prompt lengths share the batch. Returns the new tokens per row."""
  validate_prompts(cfg, prompts, max_new_tokens, max_len)
  longest = max(len(p) for p in prompts)
  max_len = max_len or bucket_length(longest + max_new_tokens, cfg.max_positions)
  bucket = bucket_length(longest, max_len)
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  key = jax.random.key(0) if key is None else key
  prefill, decode = make_steps(cfg)
  tokens, positions = pad_prompts(prompts, bucket, cfg.pad_token_id)
  cache = init_cache_for(cfg, cfg.num_layers, len(prompts), max_len)
  cache, logits = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(positions))
  pos = np.array([len(p) for p in prompts], np.int32)
  out: list[list[int]] = [[] for _ in prompts]
  done = np.zeros(len(prompts), bool)
  for step in range(max_new_tokens):
    key, sub = jax.random.split(key)
    nxt = np.asarray(sample(logits, sub, sampling.temperature, sampling.top_k, sampling.top_p))
    for i in np.flatnonzero(~done):
      out[i].append(int(nxt[i]))
    if eos is not None:  # a model without a stop token (eos None) always runs to the limit
      done |= nxt == eos
    done |= np.array([len(o) >= max_new_tokens for o in out])
    if done.all():
      break
    cache, logits = decode(params, cache, jnp.asarray(nxt), jnp.asarray(np.where(done, -1, pos)),
                           context=decode_context(pos, max_len))
    pos = pos + 1
  return out
