"""A served model from a config (configs/api_server.py): `validate`, `build_backend` (the GGUF
model and tokenizer, the engine, with `data_parallel` > 1 replicas of it behind the router, its
warmup and online start), and `ServerThread` (uvicorn on a
thread, for tests and benchmarks; the command line runs it in the foreground)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from dejavu_jax.studies import runconfig
from dejavu_jax.studies.textjob import failures_of

log = logging.getLogger("dejavu_jax.server")


def validate(c, num_devices: int | None = None) -> None:
  """Raises `runconfig.ConfigError` naming the first bad field of a server config."""
  runconfig.validate(c, num_devices=num_devices)
  if len(runconfig.strategies_of(c.recovery)) != 1:
    raise runconfig.ConfigError("recovery", f"a server runs one strategy (or one chain such as "
                                f"'replica,snapshot,reprefill'), not a comparison: {c.recovery!r}")
  port = c.port
  if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
    raise runconfig.ConfigError("port", f"must be an integer in 0..65535, got {port!r}")
  if not isinstance(c.host, str) or not c.host:
    raise runconfig.ConfigError("host", f"must be an address, got {c.host!r}")
  for f in ("default_max_tokens", "retry_after_s"):
    v = c[f]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise runconfig.ConfigError(f, f"must be an integer >= 1, got {v!r}")
  if not isinstance(c.model_id, str) or not c.model_id:
    raise runconfig.ConfigError("model_id", f"must be a non-empty name, got {c.model_id!r}")
  if c.gguf and not os.path.isfile(c.gguf):
    raise runconfig.ConfigError("gguf", f"no such file {c.gguf!r}")


def api_key_of(c) -> str | None:
  return c.api_key or os.environ.get("DEJAVU_API_KEY") or None


def build_backend(c, progress=None):
  """Loads the model, builds and warms the engine, starts it online; the `Backend`."""
  from dejavu_jax.server.app import Backend  # pylint: disable=g-import-not-at-top
  from dejavu_jax.serving.engine import make_engine  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import text  # pylint: disable=g-import-not-at-top
  cfg, params, tok = text.load_text_model(c.gguf, c.dtype)
  sc = runconfig.serve_config(c, eos_token_id=tok.eos_token_id)
  if sc.topology.max_len > cfg.max_positions:
    raise runconfig.ConfigError("max_len", f"{sc.topology.max_len} exceeds the model's "
                                f"{cfg.max_positions} positions")
  failures = failures_of(c)
  reps = sc.topology.data_parallel
  if reps > 1 and failures:   # the configured failures are fail_replica's
    failures = {c.get("fail_replica", 0): failures}
  engine = make_engine(cfg, params, sc)   # data_parallel > 1: replicas behind the router
  try:
    log.info("model %s: %d layers, pipeline %d stages %s%s, microbatch %d, context %d, recovery "
             "%s, runtime %s", cfg.name, cfg.num_layers, engine.plan.num_stages,
             list(engine.plan.ranges), f" x {reps} replicas ({sc.topology.routing})"
             if reps > 1 else "", engine.microbatch_size, sc.topology.max_len,
             sc.fault.recovery, sc.cluster.runtime)
    if c.warmup:
      t = time.perf_counter()
      engine.warmup(progress)
      log.info("warmup: every bucket compiled in %.1f s", time.perf_counter() - t)
    engine.start(failures)
    for r, specs in (failures.items() if isinstance(failures, dict) else [(None, failures)]):
      for f in specs:
        log.warning("configured failure: %s%s (engine clock)", f.describe(),
                    "" if r is None else f" in replica {r}")
  except BaseException:
    engine.close()
    raise
  return Backend(engine, tok, c.model_id, c.default_max_tokens, c.retry_after_s)


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


class ServerThread:
  """uvicorn serving `app` on host:port in a daemon thread; `url` once started."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
    import uvicorn  # pylint: disable=g-import-not-at-top
    self.host, self.port = host, port or free_port(host)
    config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                            lifespan="off", access_log=False)
    self.server = uvicorn.Server(config)
    self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self, timeout: float = 30.0) -> "ServerThread":
    self._thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the server did not start on {self.url}")
      time.sleep(0.02)
    return self

  def stop(self) -> None:
    self.server.should_exit = True
    self._thread.join(30)
