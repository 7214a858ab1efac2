"""An OpenAI-compatible server over the engine: the real SmolLM2-135M-Instruct on a pipeline with
DéjàVu's fault tolerance, for any OpenAI client, chat front end or load generator.

  python -m experiments.api_server --config=configs/api_server.py
  curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "stream": true,
         "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
  curl -X POST http://127.0.0.1:8000/admin/kill -d '{"stage": 1}'   # streams go on, unchanged
  ... --config.data_parallel=2     # 2 replicas behind a router; kill {"stage": 1, "replica": 0}

Routes (dejavu_jax/server/app.py): /v1/chat/completions and /v1/completions (stream or not),
/v1/models, /health, /metrics (Prometheus), /admin/kill, /admin/summary. Binds 127.0.0.1 unless
--config.host says otherwise; --config.api_key (or $DEJAVU_API_KEY) asks clients for a Bearer
key. Every ServeConfig field is a --config.<field> (runtime, recovery, num_stages, max_pending,
disaggregation, swapping, data_parallel, ray_spares ...). The log names each kill, its detection
and the resume.
"""

import logging
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from dejavu_jax.studies import cli  # noqa: E402
from dejavu_jax.studies import runconfig  # noqa: E402


def _check(c):
  from dejavu_jax.server import launch  # pylint: disable=g-import-not-at-top
  launch.validate(c)


def main(c):
  import jax  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top
  from dejavu_jax.server import app as app_lib, launch  # pylint: disable=g-import-not-at-top
  launch.validate(c, num_devices=len(jax.devices()))
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  backend = launch.build_backend(
      c, progress=lambda i, n: print(f"warmup {i}/{n}", file=sys.stderr, flush=True))
  try:
    key = launch.api_key_of(c)
    print(f"serving {c.model_id} on http://{c.host}:{c.port}/v1 "
          f"({'API key required' if key else 'no API key'})", file=sys.stderr, flush=True)
    uvicorn.run(app_lib.create_app(backend, key), host=c.host, port=c.port, log_level="info")
  finally:
    backend.engine.close()
  return 0


if __name__ == "__main__":
  cli.run(main, "configs/api_server.py", __doc__, describe=runconfig.describe,
          errors=(runconfig.ConfigError,), check=_check)
