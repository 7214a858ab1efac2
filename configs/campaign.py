"""The randomized failure campaign (experiments/failure_campaign.py): 500 scenarios on the fake
stage program, paced, over depths 2-4, microbatches 1-4, every strategy and a fallback chain,
crashes and stalls, single / adjacent / close / during-recovery failures."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.injections = 500
  c.seed = 0
  c.depths = (2, 3, 4)
  c.microbatch_sizes = (1, 2, 4)
  c.strategies = ("restart", "reprefill", "replica", "snapshot", "replica,snapshot,reprefill")
  c.kinds = ("crash", "stall")
  c.num_layers = 4
  c.max_len = 64
  # Workload per scenario: open loop, requests 2 ms apart.
  c.requests = 6
  c.max_prompt = 10
  c.min_new, c.max_new = 8, 20
  c.arrival_gap_s = 0.002
  # The failure fires right after a random step of the worker, in [min_step, max_step].
  c.min_step, c.max_step = 2, 24
  c.stall_s = 5.0
  # Pacing: a prompt step lasts prompt_step_s over the whole pipeline, a token step token_step_s.
  c.prompt_step_s = 0.004
  c.token_step_s = 0.002
  c.heartbeat_s = 0.02
  c.heartbeat_timeout_s = 0.15
  c.progress_timeout_s = 0.3
  c.snapshot_every = 4
  c.deadline_s = 30.0          # a scenario with no step finishing for this long is a hang
  c.verbose = False
  return c
