"""The cache oracle (serving/cache_oracle.py) on the fake program: after a replica restore, a
snapshot restore, a swap-in and a prompt-slot load, the cache a worker resumes from equals the
failure-free run's over every used row, bit for bit; and it fails on a deliberately corrupted
restore (one V entry of one layer changed, or K and V of a layer swapped), whatever the tokens
say."""

import time

import numpy as np
import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.controller import FailureSpec
from dejavu_jax.kv.cache import KVCache
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.runtime import snapshot as snapshot_lib
from dejavu_jax.runtime.api import CacheProbe, cache_digests
from dejavu_jax.runtime.replication import ReplicaStore
from dejavu_jax.serving import cache_oracle
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.slots import HostSlots
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=4, max_positions=128)
REQS = [Request(i, 0.0, (3 + i, 7, 11 + i, 5), 40) for i in range(6)]
# Prompts of different lengths in one microbatch: a restored row must hold its own length, not
# its microbatch's longest prompt (a replica block once carried the bucket's padding as used).
MIXED = [Request(i, 0.0, tuple(range(3 + i, 5 + i + i % 3)), 36) for i in range(6)]
LONG = [Request(i, 0.0, (3 + i, 7, 11 + i), 100) for i in range(9)]


def _tokens_ok(res, reqs):
  return res.tokens() == {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0]
                          for r in reqs}


def test_digest_sees_one_entry_and_ignores_padding():
  rng = np.random.default_rng(0)
  k = rng.normal(size=(2, 3, 8, 2, 4)).astype(np.float32)
  v = rng.normal(size=(2, 3, 8, 2, 4)).astype(np.float32)
  cache = KVCache(k=k, v=v, lengths=np.array([5, 0, 3], np.int32))
  base = cache_digests(cache)
  assert [(b, n) for b, n, _ in base] == [(0, 5), (2, 3)]   # the empty row is left out
  past = KVCache(k=k.copy(), v=v.copy(), lengths=cache.lengths)
  past.k[:, 0, 5:] = 9.0                                     # past row 0's length: not digested
  past.v[:, 2, 3:] = -1.0
  assert cache_digests(past) == base
  for arr in ("k", "v"):
    hit = KVCache(k=k.copy(), v=v.copy(), lengths=cache.lengths)
    getattr(hit, arr)[1, 2, 2, 1, 3] += 1e-6                 # one entry of row 2, layer 1
    got = cache_digests(hit)
    assert got[0] == base[0] and got[1] != base[1], arr


def test_compare_reports_mismatch_missing_and_conflict():
  ev = CacheProbe(0, 7, 3, "replica", ((0, 5, "aa"), (1, 4, "bb")))
  run = cache_oracle.records(ev, (10, 11))
  ref = cache_oracle.records(CacheProbe(0, 2, 3, "step", ((0, 5, "aa"), (1, 4, "cc"))), (10, 11))
  v = cache_oracle.compare(ref, run)
  assert v.checked == 2 and len(v.mismatches) == 1 and v.identical is False
  assert v.mismatches[0][0].request_id == 11 and "differ" in v.describe()
  assert cache_oracle.compare(ref, cache_oracle.records(ev, (10, 12))).missing
  twice = ref + cache_oracle.records(CacheProbe(0, 2, 3, "swap_in", ((0, 5, "zz"),)), (10,))
  assert cache_oracle.compare(twice, run[:1]).conflicts == [(0, 10, 5)]
  assert cache_oracle.compare(ref, []).identical is None     # nothing compared: no verdict
  with pytest.raises(ValueError, match="cache_probe=True"):
    cache_oracle.compare([], run)


# ---- corruptions of a restore path (the log or store they read from stays intact) ----

def _flip_v(kv):
  kv = np.array(kv)
  kv[1, -1, 0, 0, -1, -1] += 1          # V, the last layer, row 0, position 0, last head/dim
  return kv


def _corrupt_replica(monkeypatch):
  read = ReplicaStore.read
  monkeypatch.setattr(ReplicaStore, "read",
                      lambda self, *a: (lambda kv, n: (_flip_v(kv), n))(*read(self, *a)))


def _corrupt_snapshot(monkeypatch):
  restore = snapshot_lib.restore

  def swapped(path, sid):   # K and V of layer 0 swapped in every restored cache
    out = {}
    for mb, (c, step) in restore(path, sid).items():
      k, v = c.k.copy(), c.v.copy()
      k[0], v[0] = c.v[0], c.k[0]
      out[mb] = (KVCache(k=k, v=v, lengths=c.lengths), step)
    return out
  monkeypatch.setattr(snapshot_lib, "restore", swapped)


def _corrupt_swap_in(monkeypatch):
  prefix = HostKVLog.read_prefix
  monkeypatch.setattr(HostKVLog, "read_prefix",
                      lambda log, *a, **kw: (lambda p: p.replace(data=_flip_v(p.data)))(
                          prefix(log, *a, **kw)))


def _corrupt_slot(monkeypatch):
  read = HostSlots.read

  def flipped(self, mb_id):
    c = read(self, mb_id)
    v = c.v.copy()
    v[0, 0, 1, 0, 3] += 1               # V, the worker's first layer, row 0, position 1
    return KVCache(k=c.k, v=v, lengths=c.lengths)
  monkeypatch.setattr(HostSlots, "read", flipped)


def _settle(eng):
  deadline = time.monotonic() + 5
  while (any(st.inbox for st in eng.worker_stats()) and time.monotonic() < deadline):
    time.sleep(0.01)


def _verdicts(monkeypatch, make, failures, corrupt, reqs, reference_serve=None):
  """(clean verdict, clean result, corrupted verdict, corrupted result) against one failure-free
  reference served first on the same engine (or on `reference_serve`'s)."""
  with make() as eng:
    # No warmup: the first serve compiles what the others run (the same requests).
    ref = (reference_serve or eng.serve)(reqs)
    assert ref.cache_probes and _tokens_ok(ref, reqs)
    clean = eng.serve(reqs, failures=failures)
    _settle(eng)
    with monkeypatch.context() as m:
      corrupt(m)
      bad = eng.serve(reqs, failures=failures, raise_on_error=False)
      _settle(eng)
  return (cache_oracle.compare(ref, clean), clean, cache_oracle.compare(ref, bad), bad)


def _fake_engine(**kw):
  stages = kw.pop("num_stages", 2)
  cost = TableCostModel(CFG, prompt=0.004 * stages / 2, token=0.002 * stages / 2)
  serve = ServeConfig(num_stages=stages, microbatch_size=3, max_len=kw.pop("max_len", 64),
                      heartbeat_s=0.03, heartbeat_timeout_s=0.3, program="fake", pacing="paced",
                      cache_probe=True, **kw)
  return lambda: PipelineEngine(CFG, None, serve, cost_model=cost,
                                swap_link=cm.Link("fast", 1e15))


@pytest.mark.timeout(120)
def test_replica_restore_equals_the_failure_free_cache(monkeypatch):
  """Stage 1 of 2 dies after 30 steps; its replacement's caches come from the replica on stage
  0: equal to the reference's at that step. With one V entry of the restored cache changed, the
  oracle names the differing rows."""
  clean_v, clean, bad_v, bad = _verdicts(
      monkeypatch, _fake_engine(recovery="replica"), [FailureSpec(after_steps=30, stage=1)],
      _corrupt_replica, MIXED)
  for res in (clean, bad):
    (ev,) = res.recoveries
    assert ev.handled_by.get("replica", 0) >= 1, ev
  assert clean_v.identical is True and clean_v.by_point.get("replica", 0) >= 3, clean_v.describe()
  assert _tokens_ok(clean, MIXED)
  assert bad_v.identical is False and bad_v.mismatches, bad_v.describe()
  assert {rec.point for rec, _ in bad_v.mismatches} == {"replica"}
  assert all(rec.stage == 1 for rec, _ in bad_v.mismatches)


@pytest.mark.timeout(180)
def test_snapshot_restore_equals_the_failure_free_cache(monkeypatch):
  """Stage 1 of 2 dies right after the pipeline's 2nd complete snapshot; restored from it, every
  cache equals the reference's; with K and V of one layer swapped in the restore, it does not."""
  clean_v, clean, bad_v, bad = _verdicts(
      monkeypatch, _fake_engine(recovery="snapshot", snapshot_every=8, max_len=128),
      [FailureSpec(stage=1, after_snapshots=2)], _corrupt_snapshot, LONG)
  for res in (clean, bad):
    (ev,) = res.recoveries
    assert ev.handled_by.get("snapshot", 0) >= 1, ev
  assert clean_v.identical is True and clean_v.by_point.get("snapshot", 0) >= 1, clean_v.describe()
  assert _tokens_ok(clean, LONG)
  assert bad_v.identical is False and bad_v.mismatches, bad_v.describe()
  assert {rec.point for rec, _ in bad_v.mismatches} == {"snapshot"}


@pytest.mark.timeout(120)
def test_swap_in_equals_the_cache_computed_without_swapping(monkeypatch):
  """Three microbatches on three swapping stages (two device buffers each): every swap-in equals
  the cache a non-swapping engine computed at that step; a swap-in with one V entry changed
  does not."""
  reqs = REQS + [Request(6 + i, 0.0, (40 + i, 7, 11, 5), 40) for i in range(3)]
  with _fake_engine(num_stages=3)() as plain:
    ref = plain.serve(reqs)
  clean_v, clean, bad_v, _ = _verdicts(
      monkeypatch, _fake_engine(num_stages=3, swapping="on"), [], _corrupt_swap_in, reqs,
      reference_serve=lambda r: ref)
  assert clean.summary["swapping"]
  assert clean_v.identical is True and clean_v.by_point.get("swap_in", 0) > 20, clean_v.describe()
  assert _tokens_ok(clean, reqs)
  assert bad_v.identical is False and bad_v.mismatches, bad_v.describe()
  assert {rec.point for rec, _ in bad_v.mismatches} == {"swap_in"}


@pytest.mark.timeout(120)
def test_prompt_slot_load_equals_the_colocated_prefill(monkeypatch):
  """Disaggregated (1 prompt stage, 2 token stages, a token stage killed mid-run): every prompt
  cache a token worker loads from its host slot equals what a colocated 2-stage engine's own
  prefill wrote; with one V entry of a slot's copy changed, it does not."""
  with _fake_engine(num_stages=2)() as plain:
    ref = plain.serve(REQS)
  cost = TableCostModel(CFG, prompt=0.004, token=0.002)
  serve = ServeConfig(prompt_stages=1, token_stages=2, microbatch_size=3, max_len=64,
                      program="fake", pacing="paced", heartbeat_s=0.03,
                      heartbeat_timeout_s=0.3, recovery="replica", cache_probe=True)
  clean_v, clean, bad_v, _ = _verdicts(
      monkeypatch, lambda: PipelineEngine(CFG, None, serve, cost_model=cost),
      [FailureSpec(after_steps=20, stage=2)], _corrupt_slot, REQS,
      reference_serve=lambda r: ref)
  (ev,) = clean.recoveries
  assert clean_v.identical is True and clean_v.by_point.get("prompt_load", 0) >= 4, \
      clean_v.describe()
  assert _tokens_ok(clean, REQS)
  assert bad_v.identical is False, bad_v.describe()
  # (a replica restore of the corrupted cache differs too: replication copied what was loaded)
  assert "prompt_load" in {rec.point for rec, _ in bad_v.mismatches}
