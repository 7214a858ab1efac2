"""partition.balanced_ranges: the one layer split the planner, the router and the simulator use."""

import pytest

from dejavu_jax.partition import balanced_ranges


def test_balanced_ranges_are_contiguous_and_front_loaded():
  assert balanced_ranges(6, 4) == ((0, 2), (2, 4), (4, 5), (5, 6))
  assert balanced_ranges(12, 3) == ((0, 4), (4, 8), (8, 12))
  assert balanced_ranges(5, 5) == tuple((i, i + 1) for i in range(5))
  for layers in range(1, 40):
    for stages in range(1, layers + 1):
      r = balanced_ranges(layers, stages)
      sizes = [b - a for a, b in r]
      assert r[0][0] == 0 and r[-1][1] == layers
      assert all(r[i][1] == r[i + 1][0] for i in range(stages - 1))
      assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


@pytest.mark.parametrize("layers,stages", [(4, 0), (4, -1), (4, 5)])
def test_impossible_splits_are_named(layers, stages):
  with pytest.raises(ValueError, match="cannot split"):
    balanced_ranges(layers, stages)
