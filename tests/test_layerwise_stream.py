"""Layer-wise prompt streaming in the DisaggregatedEngine, proven from the prompt runtime's event
log (a sequence counter, not wall time): each layer of a prompt stage is delivered on its own,
only to the token stage that owns it, and the first delivery lands before the stage's prefill
step has finished. Oracle for the tokens: `fake_generate`."""

import itertools
import threading

import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.disagg_engine import DisaggregatedEngine
from dejavu_jax.serving.workload import Request

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
    assert eng.prompt_runtime.layerwise is layerwise
    eng.prompt_runtime.tracer = log
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
