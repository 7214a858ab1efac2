"""The randomized failure campaign (experiments/failure_campaign.py): 320 scenarios over programs
(the fake stage program; a real tiny transformer with sharpened random weights), mechanisms
(colocated, swapping, prompt-token disaggregated with prompt- and token-side failures), depths
2-4, microbatches 1-4, every strategy and a fallback chain, crashes and stalls, single / adjacent
/ close / during-recovery failures; plus a few scenarios on Ray actors (real SIGKILLs). Each
strategy must have handled (`RecoveryEvent.handled_by`) at least `handled_target` of its own
targeted scenarios, and every restored cache must equal the failure-free run's bit for bit."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # Scenarios on local workers (1-2 failures each; the ray_ and smollm2_ ones come on top).
  c.scenarios = 320
  c.seed = 0
  # The campaign's injections are the failures that fired; fewer than this misses a target.
  c.min_fired = 500
  # Workloads come from a pool of this many per kind, so each one's oracles (its tokens, the
  # failure-free run's caches per stage layout) are computed once for every scenario serving it.
  c.workload_pool = 8
  # ---- dimensions ----
  c.depths = (2, 3, 4)
  c.microbatch_sizes = (1, 2, 4)
  c.strategies = ("restart", "reprefill", "replica", "snapshot", "replica,snapshot,reprefill")
  c.kinds = ("crash", "stall")
  c.mechanisms = ("colocated", "swapping", "disagg")
  c.mechanism_p = (0.6, 0.2, 0.2)
  c.other_microbatch_sizes = (2,)   # swapping and disaggregated: fewer engines to build
  c.prompt_depths = (1, 2)          # disaggregated: prompt stages
  c.disagg_depths = (2, 3)          # disaggregated: token stages
  c.prompt_side_p = 0.3             # disaggregated: the first failure hits a prompt stage
  # The real model: its greedy tokens are the oracle, exact only for exact strategies.
  c.model_fraction = 0.05
  c.model_seed = 1
  c.model_scale = 4.0
  c.model_mechanisms = ("colocated", "swapping")
  c.model_depths = (2,)
  c.model_microbatch_sizes = (2,)
  c.model_strategies = ("restart", "replica", "snapshot")
  # SmolLM2-135M (packaged GGUF weights, real compute: seconds per scenario on this CPU).
  c.smollm2_scenarios = 3
  c.smollm2_strategies = ("replica", "snapshot")
  c.smollm2_prompt_step_s = 0.06
  c.smollm2_token_step_s = 0.04
  c.smollm2_heartbeat_timeout_s = 2.0
  c.smollm2_progress_timeout_s = 3.0
  c.smollm2_stall_s = 4.5
  c.smollm2_workload_pool = 1       # its token oracle (greedy runs of the 30-layer model) is slow
  # Ray actors (a crash is a SIGKILL of the actor process); Ray takes seconds to start.
  c.ray_scenarios = 6
  c.ray_depths = (2,)
  c.ray_strategies = ("replica", "restart")
  c.ray_num_cpus = 8
  c.ray_heartbeat_timeout_s = 30.0  # Ray's actor-death notice detects a SIGKILL first
  c.ray_progress_timeout_s = 2.0
  c.ray_stall_s = 3.0
  # ---- the model and the workload per scenario: open loop, requests 2 ms apart ----
  c.num_layers = 4
  c.max_len = 64
  c.requests = 6
  c.max_prompt = 10
  c.min_new, c.max_new = 8, 20
  c.arrival_gap_s = 0.002
  # ---- when failures fire ----
  # after_steps failures fire right after a random step of the worker in [min_step, max_step];
  # replica-first strategies not before replica_steps_per_stage * depth steps (each in-flight
  # microbatch has a replicated, acknowledged step by then).
  c.min_step, c.max_step = 2, 24
  c.replica_steps_per_stage = 3
  c.prompt_max_step = 2        # disaggregated prompt-side failures: after 1..2 prefills
  # Snapshot-first strategies: right after the pipeline's n-th complete snapshot, n in this
  # range (the 1st may be of the previous run's microbatches), paced slowly enough that a
  # microbatch outlives an orbax save.
  c.snapshot_rounds = (2, 3)
  c.snapshot_every = 4
  c.slow_prompt_step_s = 0.03
  c.slow_token_step_s = 0.02
  c.slow_min_new, c.slow_max_new = 12, 20
  # A stall lasts stall_s (ray_stall_s, smollm2_stall_s there): long enough for the watchdog,
  # short enough that a stall nobody can kill early (the replica holder's, two adjacent ones)
  # costs a scenario little.
  c.stall_s = 1.0
  # A stall must outlast every progress timeout by this factor, or the watchdog may never see
  # it (the worker resumes first) and the scenario ends untriggered (`check_config`).
  c.stall_over_timeout = 1.5
  # Pacing: a prompt step lasts prompt_step_s over the whole pipeline, a token step token_step_s.
  c.prompt_step_s = 0.004
  c.token_step_s = 0.002
  c.heartbeat_s = 0.02
  c.heartbeat_timeout_s = 0.15
  c.progress_timeout_s = 0.3
  c.reference_timeout_s = 10.0  # the failure-free references' engine: no spurious deaths
  c.deadline_s = 30.0          # a scenario with no step finishing for this long is a hang
  # ---- the verdict ----
  c.handled_target = 0.8       # share of a strategy's judged scenarios it handled itself
  c.min_judged = 5             # fewer judged scenarios than this: too few to judge
  # The cache oracle (studies/campaign.py): every restored, swapped-in or slot-loaded cache
  # compared bit for bit with a failure-free run of the same workload (one per workload and
  # stage layout, shared by the scenarios serving it).
  c.cache_oracle = True
  c.verbose = False
  return c
