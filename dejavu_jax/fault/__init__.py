"""Fault-tolerance policy: failure injection specs (inject.py), heartbeat detection and the
recovery record (controller.py), and the recovery strategies (strategies.py: one registry, used by
the engine and the simulator). The worker-side mechanisms the strategies ask for (replication
tap, snapshotter) run inside the workers and live in `dejavu_jax.runtime`."""
