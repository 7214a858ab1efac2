"""Fault-tolerance policy: failure injection (inject.py: `FailureSpec`, and the `Injector` that
carries a serve's specs out on the runtimes), detection (controller.py: heartbeat `Controller`,
`ProgressWatchdog`, the `RecoveryEvent` record), and the recovery strategies (strategies.py: one
registry, used by the engine and the simulator; `Chain` is a strategy). The worker-side
mechanisms the strategies ask for (replication tap, snapshotter) run inside the workers and live
in `dejavu_jax.runtime`; this package imports only `runtime.api` from it (and no JAX)."""
