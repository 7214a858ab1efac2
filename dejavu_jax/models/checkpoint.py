"""Save and restore params with orbax-checkpoint (also how a replacement worker gets its weights)."""

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
