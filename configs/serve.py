"""The serving experiment on random weights: a small end-to-end run on this machine, with one
failure and recovery.

OPT-125M-shaped random weights (or a local Hugging Face checkpoint), a 2-stage pipeline on
virtual CPU devices, an open-loop Poisson client, and stage 1 killed right after its 40th step
(a point of the run that does not move with the machine's load; wall clock instead:
`--config.fail_after_steps='()' --config.fail_times='(4.0,)'`).

Every field is declared, with its meaning, once: the experiment's in
dejavu_jax/studies/runconfig.py, the ServeConfig's (under their flat names, e.g.
`--config.recovery=snapshot`, `--config.temperature=0.7`, `--config.ray_placement=spread`) in
dejavu_jax/config.py. `python -m experiments.serve --config=configs/serve.py --help` lists them
all; here only the values that differ from the declared defaults are set.
"""

from dejavu_jax.studies import runconfig


def get_config():
  return runconfig.experiment_config(
      ("model", "numerics", "cost", "workload", "failures", "reporting"),
      model_overrides={"max_positions": 2048},
      num_stages=2,
      # DéjàVu's replication; a comparison: '(restart,reprefill,replica,snapshot)' (one compile).
      recovery="replica",
      heartbeat_s=0.1,
      heartbeat_timeout_s=0.5,      # the paper uses 1 s / 3 s
      fail_after_steps=(40,),
      fail_times=(),
  )
