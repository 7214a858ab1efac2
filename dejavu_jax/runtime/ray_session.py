"""The Ray session side of the Ray runtime: joining or starting a session (a local one listens on
loopback only), the environment of a stage actor's process, and the per-session pool of started
actor processes (runtime/ray.py)."""

from __future__ import annotations

import contextlib
import os
import tempfile

import ray


# Ray's switch for sessions confined to one machine (off by default on macOS and Windows). On
# Linux it is on, and `ray.init(_node_ip_address="127.0.0.1")` is rewritten to the machine's
# outward address (`services.resolve_ip_for_localhost` -> `get_node_ip_address`), so every server
# listened on all interfaces. With it off the node address stays 127.0.0.1, and Ray binds each
# server to loopback: the GCS, raylet (node and object manager) and worker gRPC servers when
# `node_ip_address == "127.0.0.1"`, the dashboard agent and autoscaler metrics when
# `is_localhost(ip)`, the runtime-env agent on the node address itself.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_node():
  """Ray nodes started inside this context (`ray.init`, `ray.cluster_utils.Cluster`) take
  127.0.0.1 and listen on loopback only, and `ray.init(address="127.0.0.1:...")` keeps that
  address (outside it, Ray rewrites it to the machine's). Ray reads the switch into
  `ray_constants.ENABLE_RAY_CLUSTER` when it is imported (already done here), so that value is
  set too; the environment variable reaches the processes started meanwhile."""
  from ray._private import ray_constants  # pylint: disable=g-import-not-at-top
  saved = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
  os.environ[_CLUSTER_ENV] = "0"
  ray_constants.ENABLE_RAY_CLUSTER = False
  try:
    yield
  finally:
    if saved[0] is None:
      os.environ.pop(_CLUSTER_ENV, None)
    else:
      os.environ[_CLUSTER_ENV] = saved[0]
    ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def init_ray(address: str | None = None, num_cpus: int | None = None, loopback: bool = True,
             **kwargs) -> bool:
  """Connects to `address` (a running cluster) or starts a local session without a dashboard,
  whose every server listens on 127.0.0.1 only (`loopback`; False: the machine's address, on
  all interfaces); returns True when this call started Ray (the caller shuts it down)."""
  if ray.is_initialized():
    return False
  if address:
    ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
    return True
  # address "local": a new session even where RAY_ADDRESS or Ray's last-cluster file
  # (/tmp/ray/ray_current_cluster, written by `ray start` and `cluster_utils.Cluster`, left
  # behind by a killed one) names another, which `ray.init()` would join.
  with loopback_node() if loopback else contextlib.nullcontext():
    ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1),
             include_dashboard=False, _node_ip_address="127.0.0.1" if loopback else None,
             log_to_driver=False, **kwargs)
  return True


def actor_env(tensor: int, gpus: float) -> dict:
  import dejavu_jax  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(dejavu_jax.__file__)))
  env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
         "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
  # Every actor is a fresh process: without a shared persistent compilation cache each one
  # (and each replacement, in the middle of a recovery) would compile its stage's steps again.
  cache = os.environ.get("DEJAVU_RAY_COMPILE_CACHE",
                         os.path.join(tempfile.gettempdir(), "dejavu_jax_xla_cache"))
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if not gpus:   # one (or `tensor`) CPU device per actor, whatever the driver forces for itself
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={tensor}"
  return env


# Started actor processes with no stage, per Ray session and actor environment: a closed
# pipeline's live actors come back here, so the next pipeline of the session starts at once.
_POOL: dict = {"job": None, "actors": {}}


def _session() -> tuple:
  # Job ids restart at 1 in every cluster; the driver's node id does not repeat.
  ctx = ray.get_runtime_context()
  return ctx.get_job_id(), ctx.get_node_id()


def pool_take(key):
  if _POOL["job"] != _session():
    _POOL.update(job=_session(), actors={})
  free = _POOL["actors"].get(key)
  return free.pop() if free else None


def pool_put(key, actor) -> None:
  if _POOL["job"] != _session():
    _POOL.update(job=_session(), actors={})
  _POOL["actors"].setdefault(key, []).append(actor)
