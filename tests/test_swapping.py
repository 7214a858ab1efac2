"""Microbatch swapping in the engine (runtime/swapping.py, kv/budget.py) on the fake stage program.

Oracle: every request's tokens equal `fake_generate` (the fake model's plain one-sequence run),
with swapping on at D = 2..4, paper and mixed modes, EOS, and a failure recovered from a replica
or a snapshot. Also: the device KV budget picks the batch and is never exceeded, a swap-in is
always issued before the step that needs it (from the policy's event log, not from timings),
"auto" decides both ways, and impossible budgets are named errors."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ServeConfig, get_model_config, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.controller import FailureSpec
from dejavu_jax.kv import budget as kv_budget
from dejavu_jax.kv.cache import KVCache, init_cache
from dejavu_jax.runtime.swapping import Swapping
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=4, max_positions=128)


def _workload(n=14, seed=0, same=False):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    plen = 5 if same else int(rng.integers(2, 12))
    new = 12 if same else int(rng.integers(4, 24))
    out.append(Request(i, 0.0, tuple(int(t) for t in rng.integers(3, 128, plen)), new))
  return out


def _reference(reqs, eos=None):
  return {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens, eos)[0] for r in reqs}


def _row(stages, max_len):
  layers = -(-CFG.num_layers // stages)   # the largest stage of the balanced split
  return kv_budget.row_bytes(CFG, layers, max_len)


def _check_prefetch_order(events):
  """Every step's microbatch was resident or swapped in since it was last evicted; returns the
  number of swap-ins made on demand (not prefetched)."""
  held, demand = set(), 0
  for kind, mb in events:
    if kind in ("prefetch", "resident"):
      held.add(mb)
    elif kind == "demand":
      held.add(mb)
      demand += 1
    elif kind == "evict":
      held.discard(mb)
    elif kind == "step":
      assert mb in held, f"microbatch {mb} stepped without being swapped in: {events}"
  return demand


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages,mode,eos", [(2, "mixed", None), (3, "paper", None),
                                             (4, "mixed", "pick"), (4, "paper", None)])
def test_tokens_identical_with_swapping(stages, mode, eos):
  same = mode == "paper"
  reqs = _workload(same=same)
  if eos == "pick":   # a token the oracle emits mid-sequence, so rows stop early
    ref0 = _reference(reqs)
    eos = max(set(t for v in ref0.values() for t in v[1:-1]),
              key=lambda t: sum(t in v[1:-1] for v in ref0.values()))
  max_len = 64
  # Swapping's two buffers of 3 rows, and one row of headroom: a swap-in whose prefix copy fits
  # in it moves only the prefix, a longer one is placed whole into the evicted buffer.
  headroom = _row(stages, max_len)
  budget = 2 * 3 * _row(stages, max_len) + headroom
  serve = ServeConfig(num_stages=stages, max_len=max_len, program="fake", mode=mode,
                      swapping="on", device_kv_budget_bytes=budget, eos_token_id=eos)
  seen = []
  with PipelineEngine(CFG, None, serve) as eng:
    assert eng.microbatch_size == 3 and eng.swap_choice.swapping
    for s in range(stages):
      w = eng.runtime.worker(s)
      w.after_step.append(lambda st, msg, w=w: seen.append(w.stats().kv_device_bytes))
    res = eng.serve(reqs)
    stats = eng.worker_stats()
    events = [eng.runtime.worker(s).swap_events for s in range(stages)]
    swaps = [eng.runtime.worker(s).stats().swap for s in range(stages)]
  assert res.tokens() == _reference(reqs, eos)
  if eos is not None:
    assert any(len(v) < r.max_new_tokens for r, v in zip(reqs, res.tokens().values()))
  assert res.summary["swapping"] is True and res.summary["microbatch_size"] == 3
  # Swap-ins happen with D > 2 microbatches; a prefix's staging copy never exceeds the headroom.
  staging = max(sw["max_staging_bytes"] for sw in swaps)
  assert staging <= headroom
  assert (stages > 2) == any(sw["swap_ins"] for sw in swaps)
  # The budget is never exceeded: sampled after every step, and the policy's own peak (two
  # buffers plus any live staging copy).
  assert seen and max(seen) <= budget
  assert all(0 < st.kv_peak_device_bytes <= budget for st in stats)
  demands = [_check_prefetch_order(ev) for ev in events]
  if stages > 2:
    assert sum(ev.count(("prefetch", mb)) for ev in events for _, mb in set(ev)) > 0
  if same:   # equal lengths (paper mode): the stage order is known, every swap-in is a prefetch
    assert demands == [0] * stages, demands


@pytest.mark.timeout(60)
def test_budget_picks_the_batch_and_swapping_doubles_it_at_depth_four():
  max_len, row = 64, _row(4, 64)
  budget = 4 * 2 * row + row // 2          # D buffers of 2 rows (not 3) fit, or 2 of 4
  kw = dict(num_stages=4, max_len=max_len, program="fake", device_kv_budget_bytes=budget)
  with PipelineEngine(CFG, None, ServeConfig(swapping="off", **kw)) as off:
    assert off.microbatch_size == 2 and not off.swap_choice.swapping
    assert max(st.kv_device_bytes for st in off.worker_stats()) <= budget
  with PipelineEngine(CFG, None, ServeConfig(swapping="on", **kw)) as on:
    assert on.microbatch_size == 4
  # Without a budget an explicit microbatch_size works as before.
  with PipelineEngine(CFG, None, ServeConfig(num_stages=2, microbatch_size=5, program="fake",
                                             max_len=64, swapping="on")) as eng:
    assert eng.microbatch_size == 5 and eng.swap_choice.swapping


def test_impossible_budgets_are_named_errors():
  row = _row(2, 64)
  kw = dict(num_stages=2, max_len=64, program="fake")
  with pytest.raises(kv_budget.KVBudgetError, match="two buffers"):
    PipelineEngine(CFG, None, ServeConfig(swapping="on", device_kv_budget_bytes=2 * row - 1,
                                          **kw))
  with pytest.raises(kv_budget.KVBudgetError, match="cannot hold"):
    PipelineEngine(CFG, None, ServeConfig(swapping="off", device_kv_budget_bytes=row, **kw))
  with pytest.raises(kv_budget.KVBudgetError, match="reports its memory"):
    PipelineEngine(CFG, None, ServeConfig(device_kv_budget_fraction=0.5, **kw))
  with pytest.raises(ValueError, match="swapping mode"):
    ServeConfig(swapping="sometimes")
  with pytest.raises(ValueError, match="not both"):
    ServeConfig(device_kv_budget_bytes=10, device_kv_budget_fraction=0.5)
  with pytest.raises(ValueError, match="device_kv_budget_bytes"):
    ServeConfig(device_kv_budget_bytes=0)


def test_auto_mode_decides_both_ways():
  """OPT-66B over 4 A100 stages: with a short context the swap-in of the doubled batch hides
  under the decode step (weights dominate it), with a long one it cannot (PCIe vs HBM)."""
  model = get_model_config("opt_66b", dtype="float16")
  cost = cm.roofline(model, "a100_80gb")
  layers, max_len = [16] * 4, 256
  budget = 4 * 8 * kv_budget.row_bytes(model, 16, max_len)
  link = cost.hardware.host_link
  short = kv_budget.choose("auto", model, layers, max_len, budget, 4, 1, cost, link, context=48)
  assert short.swapping and short.batch == 16 and short.batch_without == 8
  assert "auto: swapping on" in short.reason and "ms" in short.reason
  long = kv_budget.choose("auto", model, layers, max_len, budget, 4, 1, cost, link, context=256)
  assert not long.swapping and long.batch == 8 and "auto: swapping off" in long.reason
  # The engine says which it chose, and why, in the run's summary (tiny model, table costs).
  row = _row(4, 64)
  table = TableCostModel(CFG, prompt=0.004, token=0.004)
  for bandwidth, expect in ((1e15, True), (1e3, False)):
    serve = ServeConfig(num_stages=4, max_len=64, program="fake", swapping="auto",
                        device_kv_budget_bytes=4 * 2 * row)
    with PipelineEngine(CFG, None, serve, cost_model=table,
                        swap_link=cm.Link("test", bandwidth)) as eng:
      assert eng.swap_choice.swapping is expect
      assert eng.microbatch_size == (4 if expect else 2)
      if expect:   # one serve shows the choice and its reason in the run's summary
        res = eng.serve(_workload(n=3))
        assert res.summary["swapping"] is True
        assert res.summary["swapping_reason"].startswith("auto: swapping on")


LONG = [Request(i, 0.0, (3 + i, 7, 11 + i), 120) for i in range(12)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recovery,stage", [("replica", 1), ("snapshot", 2)])
def test_failure_recovered_with_swapping(recovery, stage):
  """A swapped worker dies; its replacement gets its caches back from the successor's replica
  (fed by the swap-out's deltas) or from a snapshot (taken from the host logs), through the
  policy's install path; tokens equal the failure-free oracle."""
  stages = 4
  cost = TableCostModel(CFG, prompt=0.008, token=0.004)
  # A wide heartbeat timeout: swapping adds two threads per worker, and on loaded cores a
  # live worker's heartbeat must not look like a death (one injected failure, one recovery).
  serve = ServeConfig(num_stages=stages, microbatch_size=3, max_len=128, heartbeat_s=0.05,
                      heartbeat_timeout_s=1.0, recovery=recovery, program="fake",
                      pacing="paced", snapshot_every=8, swapping="on")
  with PipelineEngine(CFG, None, serve, cost_model=cost,
                      swap_link=cm.Link("fast", 1e15)) as eng:
    eng.generate([[1, 2, 3]] * 3, 3)   # compiles the one prompt bucket used and the decode step
    res = eng.serve(LONG, failures=[FailureSpec(1.0, stage)])
    deadline = time.monotonic() + 5
    while (any(st.inbox or st.cache_mb_ids for st in eng.worker_stats()) and
           time.monotonic() < deadline):
      time.sleep(0.01)
    stats = eng.worker_stats()
  assert res.tokens() == _reference(LONG)
  assert len(res.recoveries) == 1, res.recoveries
  (ev,) = res.recoveries
  assert ev.handled_by.get(recovery, 0) >= 1 and ev.restored_microbatches >= 1, ev
  assert all(st.cache_mb_ids == [] for st in stats)


@pytest.mark.timeout(60)
def test_swap_in_moves_only_the_used_prefix():
  """A swap-in moves the longest row's length, bucketed (not the whole cache), as one staging
  copy scattered into the evicted buffer: the result equals the swapped-out cache on every used
  position, with its lengths; a context as long as the cache is placed whole."""
  layers, batch, size, heads, dim = 2, 3, 256, 2, 4
  dev = jax.devices()[0]
  sw = Swapping(lambda: jax.device_put(init_cache(layers, batch, size, heads, dim), dev),
                lambda c: jax.device_put(c, dev))
  rng = np.random.default_rng(0)

  def cache(lengths):
    k, v = rng.standard_normal((2, layers, batch, size, heads, dim)).astype(np.float32)
    return KVCache(k=jnp.asarray(k), v=jnp.asarray(v), lengths=jnp.asarray(lengths, jnp.int32))

  lengths = {0: [5, 20, 0], 1: [7, 7, 7], 2: [3, 3, 3], 3: [size, 9, 1]}
  def used_equal(got, mb):   # every used position (each row's [0, length)) and the lengths
    np.testing.assert_array_equal(np.asarray(got.lengths), lengths[mb])
    for b, n in enumerate(lengths[mb]):
      np.testing.assert_array_equal(np.asarray(got.k)[:, b, :n], host[mb].k[:, b, :n])
      np.testing.assert_array_equal(np.asarray(got.v)[:, b, :n], host[mb].v[:, b, :n])

  caches = {mb: cache(n) for mb, n in lengths.items()}
  host = {mb: jax.tree.map(np.array, c) for mb, c in caches.items()}   # before any donation
  try:
    for mb in (0, 1, 2):
      sw.install(mb, caches[mb])
    assert sw.stats()["swap_ins"] == 0
    got = sw.get(0)   # not resident: swapped in on demand, into the evicted buffer
    t = 32            # bucket_length(20, 256)
    itemsize = 4
    expected = 2 * layers * batch * t * heads * dim * itemsize + batch * t * 4   # data + positions
    st = sw.stats()
    assert st["swap_ins"] == 1 and st["last_swap_in_bytes"] == expected
    assert st["max_staging_bytes"] == expected
    full = 2 * layers * batch * size * heads * dim * itemsize
    assert st["peak_device_bytes"] <= 2 * (full + batch * 4) + expected
    used_equal(got, 0)
    # A row as long as the cache: the bucket is the whole length, placed whole (no staging).
    sw.install(3, caches[3])
    for mb in (1, 2):   # each evicts the least recently stepped: 0, then 3
      sw.get(mb)
    got = sw.get(3)
    st = sw.stats()
    assert st["swap_ins"] == 4, st
    assert st["last_swap_in_bytes"] == full + batch * 4
    assert st["max_staging_bytes"] == expected
    used_equal(got, 3)
  finally:
    sw.close()
  # A staging limit below the prefix (a budget's headroom): the log is placed whole instead.
  sw = Swapping(lambda: jax.device_put(init_cache(layers, batch, size, heads, dim), dev),
                lambda c: jax.device_put(c, dev), staging_limit_bytes=expected - 1)
  try:
    for mb in (0, 1, 2):
      sw.install(mb, jax.tree.map(jnp.asarray, host[mb]))
    used_equal(sw.get(0), 0)
    st = sw.stats()
    assert st["last_swap_in_bytes"] == full + batch * 4 and st["max_staging_bytes"] == 0
  finally:
    sw.close()


@pytest.mark.timeout(60)
def test_stale_tail_after_a_prefix_swap_in_is_never_read():
  """After a prefix swap-in the positions past each row's length hold another microbatch's data
  (here: garbage); the fake program, whose every layer sums every entry it reads, decodes the
  same logits from it as from the swapped-out cache: it masks by position, not by what is there."""
  from dejavu_jax.kv.cache import init_cache_for
  from dejavu_jax.pipeline import fake
  batch, size, layers = 3, CFG.max_positions, CFG.num_layers
  dev = jax.devices()[0]
  clean = jax.tree.map(np.array, init_cache_for(CFG, layers, batch, size))   # host: no donation

  def garbage():
    return jax.device_put(KVCache(k=clean.k + 777, v=clean.v - 5,
                                  lengths=jnp.full((batch,), size, jnp.int32)), dev)

  lengths = np.array([3, 7, 11])
  cols = np.arange(16)[None, :]
  x = np.where(cols < lengths[:, None], (cols * 5 + 3) % CFG.vocab_size, 0).astype(np.int32)
  positions = np.where(cols < lengths[:, None], cols, -1).astype(np.int32)
  cache, _ = fake._PREFILL(CFG, 0, layers, jax.device_put(clean, dev), x, positions)
  host = jax.tree.map(np.array, cache)
  tok = jnp.asarray([4, 9, 2], jnp.int32)

  def decode(c):
    return fake._DECODE(CFG, 0, layers, c, tok, jnp.asarray(lengths, jnp.int32))

  sw = Swapping(garbage, lambda c: jax.device_put(c, dev))
  try:
    sw.install(0, cache)
    for mb in (1, 2):    # the second evicts microbatch 0
      sw.install(mb, garbage())
    got = sw.get(0)      # swapped into a garbage buffer; only [0, 16) is written
    assert sw.stats()["swap_ins"] == 1 and sw.stats()["max_staging_bytes"] > 0
    assert (np.asarray(got.k)[:, :, 16:] == 777).all()
    want_cache, want = decode(jax.device_put(jax.tree.map(jnp.asarray, host), dev))
    got_cache, out = decode(got)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    for b, n in enumerate(lengths + 1):
      np.testing.assert_array_equal(np.asarray(got_cache.k)[:, b, :n],
                                    np.asarray(want_cache.k)[:, b, :n])
  finally:
    sw.close()
