"""Test setup: 8 virtual CPU devices (set before jax is imported), and one JAX persistent
compilation cache per test run, shared by the xdist workers and the subprocesses they start."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_default_matmul_precision", "highest")

# Many files build the same stage programs (the tiny OPT, SmolLM2's two stages) in engines of
# their own, and experiments run in subprocesses: each would compile them again. A cache made
# fresh for this run (never the user's ~/.cache, so a run's time does not depend on earlier
# runs) lets every later build load the executable. Set before any worker starts, so they and
# their subprocesses inherit it; `DEJAVU_JAX_CACHE_DIR=off pytest` disables it.
_RUN_CACHE_VAR = "DEJAVU_TEST_RUN_CACHE"


def pytest_configure(config):
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  is_worker = hasattr(config, "workerinput")
  if not is_worker and jaxcache.ENV_VAR not in os.environ:
    path = tempfile.mkdtemp(prefix="dejavu_jax_test_cache_")
    os.environ[jaxcache.ENV_VAR] = path
    os.environ[_RUN_CACHE_VAR] = path
  jaxcache.enable_compilation_cache()


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput"):
    path = os.environ.pop(_RUN_CACHE_VAR, None)
    if path:
      shutil.rmtree(path, ignore_errors=True)
