"""Discrete-event simulator of the serving systems, for models and clusters this machine cannot hold.

Pure Python + numpy (no JAX compute). Time comes from a `dejavu_jax.costmodel.CostModel`; the
workload, request records and metrics match the serving engine's, so results are comparable.

Modules: `engine` (event loop, microbatch state), `pipeline` (stages, swapping, replication,
snapshots), `feed` (arrivals, microbatch formation), `colocated` (the baseline), `disagg`
(prompt/token disaggregation), `failures` (detection, and recovery planned by the engine's own
strategy objects from fault/strategies.py, fed modelled acks and snapshots), `workload`,
`records` (request records, `summarize`, `SimResult`). `STRATEGIES` is the engine's registry.
"""

from dejavu_jax.costmodel import streamed_prompt_time
from dejavu_jax.sim.colocated import simulate_colocated
from dejavu_jax.sim.disagg import simulate_disaggregated
from dejavu_jax.sim.failures import STRATEGIES, Failure, RecoveryConfig
from dejavu_jax.sim.records import RequestRecord, SimResult, summarize
from dejavu_jax.sim.workload import from_serving, make_requests, poisson_arrivals, \
    sample_output_lens, saturated_requests

__all__ = [
    "simulate_colocated", "simulate_disaggregated", "streamed_prompt_time", "STRATEGIES",
    "Failure", "RecoveryConfig", "RequestRecord", "SimResult", "summarize", "from_serving",
    "make_requests", "poisson_arrivals", "sample_output_lens", "saturated_requests",
]
