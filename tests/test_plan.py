"""Stage plans: balanced splits, explicit ranges, every impossible plan named, TP placement."""

import jax
import pytest

from dejavu_jax.config import tiny_config
from dejavu_jax.models import init_params
from dejavu_jax.partition import balanced_ranges
from dejavu_jax.pipeline.plan import make_mesh, plan_stages
from dejavu_jax.pipeline.stage import StageProgram

CFG = tiny_config("opt", num_layers=6)


def test_balanced():
  assert balanced_ranges(6, 4) == ((0, 2), (2, 4), (4, 5), (5, 6))
  assert balanced_ranges(12, 3) == ((0, 4), (4, 8), (8, 12))


@pytest.mark.parametrize("kw,match", [
    (dict(num_stages=7), "more stages than layers"),
    (dict(num_stages=3, tensor=3), "tensor parallelism 3 must be >= 1 and divide the 4"),
    (dict(num_stages=3, tensor=4), "needs 3 stages x 4 devices = 12 devices but only 8"),
    (dict(num_stages=2, ranges=((0, 4), (3, 6))), "overlap"),
    (dict(num_stages=2, ranges=((0, 2), (3, 6))), "leave a gap"),
    (dict(num_stages=2, ranges=((0, 2), (2, 5))), "end at layer 5, but the model has 6"),
    (dict(num_stages=2, ranges=((0, 3),)), "1 layer ranges given for 2 stages"),
    (dict(num_stages=0), "num_stages must be >= 1"),
])
def test_impossible_plans_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    plan_stages(CFG, **kw)


def test_stages_on_disjoint_devices_and_tensor_sharding():
  plan = plan_stages(CFG, 3, tensor=2)
  mesh = make_mesh(plan)
  params = init_params(CFG, jax.random.key(0))
  seen = set()
  for s in range(3):
    prog = StageProgram(CFG, plan, mesh, s)
    placed = prog.place_params(params)
    devs = {d for leaf in jax.tree.leaves(placed) for d in leaf.devices()}
    assert len(devs) == 2 and not devs & seen
    seen |= devs
    q = placed[f"layers_{plan.ranges[s][0]}"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.shard_shape(q.shape) == (64, 32)        # columns split over 2 devices
    fc2 = placed[f"layers_{plan.ranges[s][0]}"]["mlp"]["fc2"]["kernel"]
    assert fc2.sharding.shard_shape(fc2.shape) == (64, 64)    # rows split (128 -> 64)
    cache = prog.new_cache(2, 16)
    assert cache.k.sharding.shard_shape(cache.k.shape)[3] == 2  # heads split (4 -> 2)
