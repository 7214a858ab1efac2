"""The collective lock serializes tensor-parallel steps on CPU devices only (where async
collectives from several threads can deadlock); on GPUs it would stop pipeline stages from
overlapping."""

import types

import jax

from dejavu_jax.pipeline.stage import needs_collective_lock


def test_cpu_devices_take_the_lock():
  assert needs_collective_lock(jax.devices()[:2])


def test_gpu_devices_do_not():
  gpus = [types.SimpleNamespace(platform="gpu"), types.SimpleNamespace(platform="gpu")]
  assert not needs_collective_lock(gpus)
  assert needs_collective_lock(gpus + [types.SimpleNamespace(platform="cpu")])
