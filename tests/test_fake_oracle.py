"""The fake stage program's oracle sees its whole cache: every K and V entry of every layer, head
and dim at the positions a query reads. Mutation tests: one changed entry changes the output, at
the program and through each host copy of a cache the serving stack keeps (replica log, swapped
out log, disaggregation prompt slot), while the uncorrupted run equals `fake_generate`. Without
this, a replication, snapshot, swap or transfer bug that drops V or mis-slices the head axis
would leave every token of every other test unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.controller import FailureSpec
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.pipeline import fake
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.disagg_engine import DisaggregatedEngine
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request
from dejavu_jax.stream.hostlog import HostKVLog

CFG = tiny_config("opt", num_layers=4, max_positions=128)   # cache [L, B, S, H=4, K=16]


def _explicit_generate(cfg, prompt, new_tokens):
  """The module docstring's recurrence entry by entry (no closed form), for one sequence."""
  m = fake.modulus(cfg)
  c = fake.coefficients(cfg).tolist()
  heads, dim = cfg.num_kv_heads, cfg.head_dim
  cache = [[] for _ in range(cfg.num_layers)]   # per layer, per position: {(kv, h, d): value}

  def forward(x):
    for g, layer in enumerate(cache):
      entries = {}
      for h in range(heads):
        for d in range(dim):
          e = 2 * (h * dim + d)
          entries["k", h, d] = (x + g + e + 1) % m
          entries["v", h, d] = (x + g + e + 2) % m
      layer.append(entries)
      total = 0
      for pos in layer:                          # j <= p: every position written so far
        for (kv, h, d), val in pos.items():
          total += c[2 * (h * dim + d) + (kv == "v")] * val
      x = (x + 1 + total) % m
    return x % cfg.vocab_size

  tok = None
  for x in prompt:
    tok = forward(x)
  out = [tok]
  while len(out) < new_tokens:
    out.append(forward(out[-1]))
  return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype,heads", [("float32", 4), ("bfloat16", 2)])
def test_oracle_is_the_docstring_recurrence(dtype, heads):
  cfg = tiny_config("opt", num_layers=3, hidden_size=8 * heads, num_heads=heads,
                    max_positions=32, dtype=dtype)
  for prompt in ([5, 9, 3], [120, 0, 77, 4, 4]):
    assert fake_generate(cfg, [prompt], 6)[0] == _explicit_generate(cfg, prompt, 6)


# ---- program level ----

LAYERS = 3             # stage [0, 3) of 4 layers: the output is the hidden state, not a token
LENGTHS = (5, 8)


def _prefilled():
  """A host copy of the stage's cache after a prompt of LENGTHS rows."""
  cache = init_cache_for(CFG, LAYERS, len(LENGTHS), 32)
  cols = np.arange(max(LENGTHS))[None, :]
  lengths = np.asarray(LENGTHS)[:, None]
  x = np.where(cols < lengths, (7 * cols + 3) % CFG.vocab_size, 0).astype(np.int32)
  positions = np.where(cols < lengths, cols, -1).astype(np.int32)
  cache, _ = fake._PREFILL(CFG, 0, LAYERS, cache, jnp.asarray(x), jnp.asarray(positions))
  return jax.tree.map(np.array, cache)


def _decode(host_cache):
  """The stage's hidden output [B] for one decode step at each row's next position."""
  _, h = fake._DECODE(CFG, 0, LAYERS, jax.tree.map(jnp.asarray, host_cache),
                      jnp.asarray([4, 9], jnp.int32), jnp.asarray(LENGTHS, jnp.int32))
  return np.asarray(h)[:, 0]


def _changed(cache, which, layer, row, pos, head, dim, delta=1.0):
  arr = getattr(cache, which).copy()
  arr[layer, row, pos, head, dim] += delta
  return cache.replace(**{which: arr})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which,layer,row,pos,head,dim", [
    ("v", 1, 0, 2, 2, 5),      # one V entry in one head of one (middle) layer
    ("v", 2, 1, 0, 3, 15),     # the last head's last dim, at position 0, in the stage's last layer
    ("k", 0, 1, 7, 1, 9),      # one K entry in a head > 0 at a dim > 0, at the row's last position
    ("k", 2, 0, 4, 3, 1),
])
def test_one_changed_entry_changes_the_step(which, layer, row, pos, head, dim):
  clean = _prefilled()
  want = _decode(clean)
  got = _decode(_changed(clean, which, layer, row, pos, head, dim))
  other = 1 - row
  assert got[row] != want[row], (which, layer, head, dim)
  assert got[other] == want[other]     # rows never read each other's cache
  # A change by a multiple of M is the only invisible one (entries are read mod M).
  same = _decode(_changed(clean, which, layer, row, pos, head, dim, float(fake.modulus(CFG))))
  np.testing.assert_array_equal(same, want)


@pytest.mark.timeout(60)
def test_swapped_k_and_v_or_heads_change_the_step():
  clean = _prefilled()
  want = _decode(clean)
  swapped = clean.replace(k=clean.v.copy(), v=clean.k.copy())
  assert (_decode(swapped) != want).all()
  heads = clean.replace(v=clean.v[:, :, :, ::-1].copy())      # the head axis reversed, in V only
  assert (_decode(heads) != want).all()
  layer = clean.replace(k=clean.k.copy())
  layer.k[1] = clean.k[0]                                     # layer 0's keys in layer 1
  assert (_decode(layer) != want).all()


@pytest.mark.timeout(60)
def test_positions_past_the_row_are_never_read():
  """The mask, not the data: garbage at and after a row's length changes nothing."""
  clean = _prefilled()
  want = _decode(clean)
  k, v = clean.k.copy(), clean.v.copy()
  for b, n in enumerate(LENGTHS):
    k[:, b, n:] = 777.0
    v[:, b, n:] = -5.5
  np.testing.assert_array_equal(_decode(clean.replace(k=k, v=v)), want)


# ---- through the serving stack: one V entry changed in a host copy ----

class _CorruptReads:
  """Wraps HostKVLog's reads so each returned copy has one V entry (last layer of the log, row 0,
  position 0, the last head, the last dim) raised by 1: every later step of that row reads it.
  The log itself is untouched. `calls` counts the reads that hold such an entry, changed or
  not (enabled False), so both runs of a test show that the path under test ran."""

  def __init__(self, monkeypatch, enabled: bool):
    self.calls = 0
    read_host, read_prefix = HostKVLog.read_host, HostKVLog.read_prefix

    def corrupt(data, live):
      if not live:
        return data
      self.calls += 1
      if not enabled:
        return data
      data = np.array(data)                     # a copy: read_prefix may return a view
      data[1, -1, 0, 0, -1, -1] += 1
      return data

    def host(log, *a, **kw):
      kv, lengths = read_host(log, *a, **kw)
      return corrupt(kv, lengths.size and lengths[0] > 0), lengths

    def prefix(log, *a, **kw):
      packed = read_prefix(log, *a, **kw)
      return packed.replace(data=corrupt(packed.data, packed.positions[0, 0] == 0))

    monkeypatch.setattr(HostKVLog, "read_host", host)
    monkeypatch.setattr(HostKVLog, "read_prefix", prefix)


def _reference(reqs):
  return {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}


def _check(res, reqs, corrupt, reads):
  assert res.error is None and reads.calls > 0
  if corrupt:
    assert res.tokens() != _reference(reqs)
  else:
    assert res.tokens() == _reference(reqs)


# Equal prompt and output lengths: every row of a microbatch lives to the end, so a changed entry
# at row 0, position 0 is read by every later step of that row.
REQS = [Request(i, 0.0, (3 + i, 7, 11 + i, 5), 40) for i in range(6)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("corrupt", [False, True])
def test_replica_restore_reads_v(monkeypatch, corrupt):
  """Stage 1 of 2 dies mid-run; its replacement's caches come from the replica log on stage 0."""
  reads = _CorruptReads(monkeypatch, corrupt)
  cost = TableCostModel(CFG, prompt=0.004, token=0.002)
  serve = ServeConfig(num_stages=2, microbatch_size=3, max_len=64, heartbeat_s=0.03,
                      heartbeat_timeout_s=0.3, recovery="replica", program="fake",
                      pacing="paced")
  with PipelineEngine(CFG, None, serve, cost_model=cost) as eng:
    res = eng.serve(REQS, failures=[FailureSpec(after_steps=30, stage=1)])
  (ev,) = res.recoveries
  assert ev.handled_by.get("replica", 0) >= 1, ev
  _check(res, REQS, corrupt, reads)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("corrupt", [False, True])
def test_swap_in_reads_v(monkeypatch, corrupt):
  """Three microbatches on three stages with two device buffers each: every step swaps in."""
  reads = _CorruptReads(monkeypatch, corrupt)
  reqs = REQS + [Request(6 + i, 0.0, (40 + i, 7, 11, 5), 40) for i in range(3)]
  serve = ServeConfig(num_stages=3, microbatch_size=3, max_len=64, program="fake",
                      swapping="on")
  with PipelineEngine(CFG, None, serve) as eng:
    assert eng.swap_choice.swapping
    res = eng.serve(reqs)
    swap_ins = sum(eng.runtime.worker(s).stats().swap["swap_ins"] for s in range(3))
  assert swap_ins > 0
  _check(res, reqs, corrupt, reads)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("corrupt", [False, True])
def test_prompt_slot_reads_v(monkeypatch, corrupt):
  """A 1-stage prompt pipeline streams each prompt cache into a token worker's host slot."""
  reads = _CorruptReads(monkeypatch, corrupt)
  serve = ServeConfig(prompt_stages=1, token_stages=2, microbatch_size=3, max_len=64,
                      program="fake", heartbeat_s=0.03, heartbeat_timeout_s=0.3)
  with DisaggregatedEngine(CFG, None, serve) as eng:
    res = eng.serve(REQS)
  _check(res, REQS, corrupt, reads)
