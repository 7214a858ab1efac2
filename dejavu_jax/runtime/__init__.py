"""Runtimes: the `Worker`/`Runtime` message boundary (api.py) and its implementations
(local.py: threads over the devices of one process)."""

from dejavu_jax.runtime.api import (Ack, CacheLoaded, Heartbeat, Progress, ReplicaSource,
                                    SnapshotSaved, SnapshotSource, Step, StepError, StepResult,
                                    WorkerOptions, WorkerStats)
from dejavu_jax.runtime.local import LocalRuntime, LocalWorker
