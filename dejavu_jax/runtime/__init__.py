"""Runtimes: the `Worker`/`Runtime` message boundary (api.py), its implementations (local.py:
threads over the devices of one process; ray*.py: Ray actor processes; disagg.py: the prompt and
token worker sets of disaggregation), and the worker-side services that run beside a worker's
steps: the replication tap and replica store (replication.py), the snapshotter (snapshot.py) and
the swapping cache-placement policy (swapping.py)."""

from dejavu_jax.runtime.api import (Ack, CacheLoaded, Heartbeat, Progress, ReplicaSource,
                                    SnapshotSaved, SnapshotSource, Step, StepError, StepResult,
                                    WorkerOptions, WorkerStats)
from dejavu_jax.runtime.local import LocalRuntime, LocalWorker
