"""Every ablation mode streams the same bytes: prompt layer by layer and step deltas of a real
(tiny) model end up bit-identical to the device cache, in every mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import tiny_config
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.models import init_params, stage_params
from dejavu_jax.models.generate import make_steps
from dejavu_jax.partition import balanced_ranges
from dejavu_jax.stream import ablation
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.streamer import Streamer

B, T, S, STEPS = 2, 16, 32, 3


@pytest.mark.timeout(120)
def test_all_modes_produce_the_same_log():
  cfg = tiny_config(num_layers=4, dtype="bfloat16")
  params = init_params(cfg, jax.random.key(0))
  groups = balanced_ranges(cfg.num_layers, 2)
  steps = [make_steps(cfg, a, b) for a, b in groups]
  gparams = [stage_params(cfg, params, a, b) for a, b in groups]
  tokens = jax.random.randint(jax.random.key(1), (B, T), 3, cfg.vocab_size, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  prompt = 12
  positions = jnp.where(positions < prompt, positions, -1)
  results = {}
  with Streamer() as streamer:
    for mode in ablation.MODES:
      caches = [init_cache_for(cfg, b - a, B, S) for a, b in groups]
      logs = [HostKVLog(b - a, B, S, cfg.num_kv_heads, cfg.head_dim, caches[0].k.dtype,
                        layer_base=a) for a, b in groups]     # one log per worker (stage)
      caches, logits, tickets = ablation.prefill_and_stream(
          mode, [p for p, _ in steps], gparams, caches, groups, tokens, positions, logs, prompt,
          streamer=streamer, key=mode)
      for t in tickets:
        t.wait(60)
      pos = jnp.full((B,), prompt, jnp.int32)
      for _ in range(STEPS):
        out = jnp.argmax(logits, -1).astype(jnp.int32)
        for g, ((_, decode), p, (a, _)) in enumerate(zip(steps, gparams, groups)):
          caches[g], out = decode(p, caches[g], out, pos)
          ablation.stream_token_step(mode, caches[g], pos, logs[g], streamer=streamer,
                                     key=(mode, g), layer_base=a)
        logits = out
        pos = pos + 1
      streamer.drain(60)
      n = prompt + STEPS
      for log, c in zip(logs, caches):
        assert log.step == STEPS
        kv, lengths = log.read_host()
        np.testing.assert_array_equal(lengths, [n] * B)
        np.testing.assert_array_equal(kv[0, :, :, :n], np.asarray(c.k[:, :, :n]))
        np.testing.assert_array_equal(kv[1, :, :, :n], np.asarray(c.v[:, :, :n]))
      results[mode] = np.concatenate([log.read_host()[0] for log in logs], axis=1)
  for mode in ablation.MODES[1:]:
    np.testing.assert_array_equal(results[mode], results["naive"])


def test_unknown_mode_raises():
  with pytest.raises(ValueError):
    ablation.check_mode("fast")
