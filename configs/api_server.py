"""The OpenAI-compatible server (experiments/api_server.py): the real SmolLM2-135M-Instruct on a
2-stage pipeline, stage failures recovered from the successor's replica (then a snapshot, then a
re-prefill), bounded admission. Every ServeConfig field is available (`--config.runtime=ray`,
`--config.recovery=restart`, `--config.prompt_stages=1 --config.token_stages=1`,
`--config.data_parallel=2` (replicas behind a router), ...); a stage
can be killed through POST /admin/kill or by the failure fields (seconds after the engine
started serving)."""

from dejavu_jax.studies import runconfig

# ServeConfig fields the server derives (the tokenizer's stop token) or does not run (pacing:
# clients see real time).
EXCLUDED = ("eos_token_id", "pacing")


def get_config():
  return runconfig.experiment_config(
      ("server", "numerics", "failures"), serve_exclude=EXCLUDED,
      num_stages=2,
      microbatch_size=4,
      max_len=512,
      recovery="replica,snapshot,reprefill",
      heartbeat_s=0.1,
      heartbeat_timeout_s=0.5,
      max_pending=64,
      fail_stages=(),
      fail_times=(),
      fail_after_steps=(),
  )
