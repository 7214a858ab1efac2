"""Save, restore and check params with orbax-checkpoint (also how a replacement worker gets its
weights; `check_params_checkpoint` lets an engine check a checkpoint at construction)."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def save_params(path: str, params) -> None:
  """Writes `params` to the directory `path` (absolute or relative; must not exist)."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)
    ckptr.wait_until_finished()


def restore_params(path: str, like=None):
  """Reads params saved by `save_params`. `like` (a params tree or `ShapeDtypeStruct`s, e.g.
  `param_shapes(cfg)` or one stage's subset of it) restores only that subset with those dtypes."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise ValueError(f"no checkpoint at {path!r}")
  if like is None:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    # Partial: a stage restores just the parameters it owns.
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))


def check_params_checkpoint(path: str, like) -> None:
  """Raises ValueError unless the checkpoint at `path` holds every array of `like` (e.g. one
  stage's `param_shapes`) with its shape. Reads only orbax's metadata, not the weights, so an
  engine can check at construction what a replacement worker would restore much later."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise ValueError(f"params_checkpoint: no checkpoint at {path!r}")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"params_checkpoint: {path!r} is not a readable orbax checkpoint: "
                     f"{type(e).__name__}: {e}") from e
  meta = getattr(meta, "item_metadata", meta)   # orbax >= 0.11 wraps the tree
  tree = getattr(meta, "tree", meta)
  stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  for key, want in jax.tree_util.tree_leaves_with_path(like):
    name = jax.tree_util.keystr(key)
    got = stored.get(name)
    if got is None:
      raise ValueError(f"params_checkpoint {path!r} has no array {name} (another model's "
                       "checkpoint?)")
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(f"params_checkpoint {path!r}: {name} has shape {tuple(got.shape)} but "
                       f"the model needs {tuple(want.shape)} (another model's checkpoint?)")
