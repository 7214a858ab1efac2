"""Decode step time against the allocated cache length at a fixed context (a step's cost
should follow the context, not the cache length).

  python benchmarks/decode_context.py [--model=smollm2_135m] [--batch=8] [--runs=9]

Random float32 weights of the preset (drawn with numpy: nothing to compile for the init), a
16-token prefill, then decode steps at position 31 (context bucket 32) with caches of S = 64,
256 and 1024 positions; the median of --runs steps each, after two warm-up steps. Every figure is
measured (timed computation on this machine). The last stdout line is one JSON object.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dejavu_jax.config import get_model_config  # noqa: E402
from dejavu_jax.kv.cache import init_cache_for  # noqa: E402
from dejavu_jax.models.decoder import param_shapes  # noqa: E402
from dejavu_jax.models.generate import decode_context, make_steps  # noqa: E402
from dejavu_jax.studies import jaxcache  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2_135m", "model preset")
_BATCH = flags.DEFINE_integer("batch", 8, "rows per step")
_RUNS = flags.DEFINE_integer("runs", 9, "timed steps per cache length (median reported)")
LENGTHS = (64, 256, 1024)


def main(argv):
  del argv
  jaxcache.quiet_logging()
  cfg = get_model_config(_MODEL.value, max_positions=max(LENGTHS))
  b = _BATCH.value
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(np.float32)),
                        param_shapes(cfg))
  prefill, decode = make_steps(cfg)
  steps = {}
  for s in LENGTHS:
    cache = init_cache_for(cfg, cfg.num_layers, b, s)
    toks = jnp.ones((b, 16), jnp.int32)
    pos = jnp.tile(jnp.arange(16, dtype=jnp.int32)[None], (b, 1))
    cache, _ = prefill(params, cache, toks, pos)
    x, p = jnp.ones((b,), jnp.int32), np.full((b,), 31, np.int32)
    ctx = decode_context(p, s)
    times = []
    for i in range(_RUNS.value + 2):
      t = time.perf_counter()
      cache, logits = decode(params, cache, x, jnp.asarray(p), context=ctx)
      logits.block_until_ready()
      if i >= 2:
        times.append(time.perf_counter() - t)
    steps[s] = statistics.median(times) * 1e3
  out = {"model": cfg.name, "batch": b, "context": 32,
         "step_ms": {str(s): round(v, 2) for s, v in steps.items()},
         "s1024_over_s64": round(steps[1024] / steps[64], 3),
         "load_average": round(os.getloadavg()[0], 2)}
  out["kind"] = {"step_ms": "measured", "s1024_over_s64": "measured"}
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
