"""Layer-wise prompt streaming in the DisaggregatedEngine, proven from the prompt runtime's event
log (a sequence counter, not wall time): each layer of a prompt stage is delivered on its own,
only to the token stage that owns it, and the first delivery lands before the stage's prefill
step has finished. Oracle for the tokens: `fake_generate`."""

import itertools
import threading

import jax
import numpy as np
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.models import init_params
from dejavu_jax.pipeline.fake import FakeProgram, fake_generate
from dejavu_jax.pipeline.plan import make_mesh, plan_stages
from dejavu_jax.pipeline.stage import StageProgram
from dejavu_jax.serving.disagg_engine import DisaggregatedEngine
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=6, max_positions=64)
# 2 prompt stages (layers 0-2, 3-5) into 3 token stages (0-1, 2-3, 4-5): each prompt stage
# feeds two token stages, and token stage 1 takes one layer from each prompt stage.
TOKEN_SPLITS = ((0, 2), (2, 4), (4, 6))


def _requests():
  return [Request(i, 0.0, tuple(3 + (5 * i + j) % 80 for j in range(3 + 2 * i)), 4)
          for i in range(5)]


def _owner(layer):
  (d,) = [d for d, (a, b) in enumerate(TOKEN_SPLITS) if a <= layer < b]
  return d


class _Log:
  """The tracer: records (seq, event, prompt stage, mb, layers, token stage) in call order.
  Hold-back: when layer l > a stage's first is dispatched, the prompt worker first waits
  (bounded) until layer l - 1 has landed, so "layer l - 1 lands before the step ends" is certain
  exactly when the implementation really delivers a layer during the step, not a race."""

  def __init__(self, hold_s=5.0):
    self.rows, self._seq, self._lock = [], itertools.count(), threading.Lock()
    self._landed: dict = {}
    self._hold_s = hold_s

  def _event(self, mb, layer):
    with self._lock:
      return self._landed.setdefault((mb, layer), threading.Event())

  def __call__(self, event, stage, mb, layers, token_stage):
    if event == "dispatched" and layers[0] not in (0, 3):   # not a prompt stage's first layer
      self._event(mb, layers[0] - 1).wait(self._hold_s)
    with self._lock:
      self.rows.append((next(self._seq), event, stage, mb, layers, token_stage))
    if event == "landed":
      self._event(mb, layers[0]).set()


def _serve(layerwise):
  serve = ServeConfig(prompt_stages=2, token_stages=3, microbatch_size=2, max_len=32,
                      program="fake", heartbeat_s=0.03, heartbeat_timeout_s=5.0,
                      layerwise_stream=layerwise)
  reqs = _requests()
  log = _Log()
  with DisaggregatedEngine(CFG, None, serve) as eng:
    assert eng.prompt_path.runtime.layerwise is layerwise
    eng.prompt_path.runtime.tracer = log
    res = eng.serve(reqs)
    held = [eng.runtime.worker(d).slots.held() for d in range(3)]
  assert res.error is None
  assert res.tokens() == {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0]
                          for r in reqs}
  assert held == [[], [], []]
  return log.rows


@pytest.mark.timeout(60)
def test_each_layer_is_delivered_alone_to_its_owner_before_the_step_ends():
  rows = _serve(layerwise=True)
  mbs = sorted({r[3] for r in rows})
  assert len(mbs) == 3   # 5 requests in microbatches of 2
  for stage, (lo, hi) in enumerate(((0, 3), (3, 6))):
    for mb in mbs:
      mine = [r for r in rows if r[2] == stage and r[3] == mb]
      dispatched = [r for r in mine if r[1] == "dispatched"]
      landed = [r for r in mine if r[1] == "landed"]
      (done,) = [r for r in mine if r[1] == "step_done"]
      # One dispatch and one delivery per layer, in layer order, each to the layer's owner only.
      assert [r[4] for r in dispatched] == [(l, l + 1) for l in range(lo, hi)]
      assert [(r[4], r[5]) for r in landed] == [((l, l + 1), _owner(l)) for l in range(lo, hi)]
      # Layer l landed before layer l + 1 was dispatched (logged), so before the step ended.
      for l in range(hi - lo - 1):
        assert landed[l][0] < dispatched[l + 1][0] < done[0]
      assert landed[0][0] < done[0]


@pytest.mark.timeout(60)
def test_whole_stage_ablation_sends_after_the_step():
  rows = _serve(layerwise=False)
  assert not [r for r in rows if r[1] == "dispatched"]
  for stage, owners in ((0, (0, 1)), (1, (1, 2))):
    for mb in sorted({r[3] for r in rows}):
      mine = [r for r in rows if r[2] == stage and r[3] == mb]
      (done,) = [r for r in mine if r[1] == "step_done"]
      landed = [r for r in mine if r[1] == "landed"]
      # One packet per overlapping token stage, all after the step.
      assert [r[5] for r in landed] == list(owners)
      assert all(r[0] > done[0] for r in landed)


def _stage_run(program_cls, cfg, params, stages, tensor, group):
  """Both prefills of every stage of a `stages` x `tensor` plan, chained: [(whole, layerwise,
  emitted layer ranges)] per stage, as host arrays."""
  plan = plan_stages(cfg, stages, None, tensor, num_devices=stages * tensor)
  mesh = make_mesh(plan, jax.devices()[:stages * tensor])
  tokens = np.array([[5, 9, 2, 7, 1], [3, 4, 0, 0, 0]], np.int32)
  positions = np.array([[0, 1, 2, 3, 4], [0, 1, -1, -1, -1]], np.int32)
  x_whole = x_layer = tokens
  out = []
  for s in range(stages):
    prog = program_cls(cfg, plan, mesh, s)
    p = prog.place_params(params)
    c_whole, x_whole = prog.prefill(p, prog.new_cache(2, 16), x_whole, positions)
    emitted = []
    packed = []

    def emit(layers, c, packets):
      emitted.append(layers)
      packed.extend(packets)

    # Each group packs its first layer: the packets must equal the whole prefill's cache there.
    c_layer, x_layer = prog.prefill_layerwise(p, prog.new_cache(2, 16), x_layer, positions,
                                              emit, group, lambda a, b: [(a, a + 1)])
    for pk in jax.device_get(packed):
      np.testing.assert_allclose(np.asarray(pk.data[0][:, :, :5], np.float32), np.asarray(
          c_whole.k[pk.layers[0] - prog.start:pk.layers[1] - prog.start, :, :5], np.float32),
                                 rtol=1e-5, atol=1e-5)
    out.append((jax.device_get((c_whole, x_whole)), jax.device_get((c_layer, x_layer)), emitted))
  return out


@pytest.mark.timeout(120)
def test_layerwise_prefill_equals_whole_stage_prefill():
  """Program level: the fake program exactly (groups of 2 over stages of 3 layers), the tiny
  transformer to float tolerance with the same greedy token."""
  for (whole, layer, emitted), (lo, hi) in zip(_stage_run(FakeProgram, CFG, None, 2, 1, 2),
                                               ((0, 3), (3, 6))):
    assert emitted == [(lo, lo + 2), (lo + 2, hi)]
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(layer)):
      np.testing.assert_array_equal(a, b)
  # Tensor 2 (the collective-lock path); tensor 1 is the engine's real-model test.
  cfg = tiny_config("opt", num_layers=2, max_positions=32)
  ((whole, layer, emitted),) = _stage_run(StageProgram, cfg, init_params(cfg, jax.random.key(0)),
                                          1, 2, 1)
  assert emitted == [(0, 1), (1, 2)]   # the embedding runs with the first, the head the last
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(layer)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_array_equal(whole[1].argmax(-1), layer[1].argmax(-1))
  plan = plan_stages(CFG, 1)
  with pytest.raises(ValueError, match="layer group size"):
    FakeProgram(CFG, plan, make_mesh(plan), 0).layer_groups(0)


@pytest.mark.timeout(60)
def test_host_slot_completes_when_its_last_layer_lands_in_any_order():
  from dejavu_jax.kv.cache import KVCache  # pylint: disable=g-import-not-at-top
  from dejavu_jax.stream.packing import to_host  # pylint: disable=g-import-not-at-top
  from dejavu_jax.stream.route import stream_out_layers  # pylint: disable=g-import-not-at-top
  from dejavu_jax.stream.slots import HostSlots  # pylint: disable=g-import-not-at-top
  k = np.arange(3 * 2 * 16 * 1 * 2, dtype=np.float32).reshape(3, 2, 16, 1, 2)
  cache = KVCache(k=k, v=-k, lengths=np.array([16, 16], np.int32))   # global layers 2..4
  slots = HostSlots(1, (2, 5), 2, 16, 1, 2, np.float32)
  assert slots.reserve(7)
  for n, layer in enumerate((4, 2, 3)):
    ((d, packet),) = stream_out_layers(cache, 2, (layer, layer + 1), ((0, 2), (2, 5)), size=16)
    assert d == 1 and packet.layers == (layer, layer + 1)
    if n < 2:
      assert not slots.write(7, to_host(packet), cache.lengths)
      with pytest.raises(ValueError, match="have not landed"):
        slots.read(7)
    else:
      assert slots.write(7, to_host(packet), cache.lengths)   # the last layer completes it
  got = slots.read(7)
  np.testing.assert_array_equal(got.k, k)
  np.testing.assert_array_equal(got.v, -k)
  with pytest.raises(ValueError, match="not inside"):
    stream_out_layers(cache, 2, (1, 3), ((0, 2), (2, 5)))
