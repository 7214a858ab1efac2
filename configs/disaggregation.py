"""Prompt-token disaggregation, paced: OPT-66B on 4 machines of 2 x A100-80GB (roofline), prompt
1000, LMSys-fitted output lengths (one per microbatch), microbatch 8; the colocated baseline of
depth 4 vs the planner's split and its neighbours, latency vs rate, with the simulator beside it.
Rates are in modeled requests/s; `time_scale` stretches every paced step (2.0: twice the modeled
time, which keeps pace overruns rare on loaded shared cores); a point lasts about
num_microbatches x batch / rate modeled seconds x time_scale: ~40 minutes in all here.
"""

import ml_collections


def get_config(variant=None):
  if variant == "tiny":   # experiments/figures.py's tiny run (tests)
    from configs import disaggregation_tiny  # pylint: disable=g-import-not-at-top
    return disaggregation_tiny.get_config()
  c = ml_collections.ConfigDict()
  c.model = "opt_66b"
  c.hardware = "a100_80gb"
  c.gpus_per_machine = 2
  c.machines = 4
  c.prompt_len = 1000          # modeled prompt length
  c.real_prompt_len = 16       # what the fake program computes
  c.batch_size = 8
  c.output_mean = 214.5        # LMSys-Chat-1M mean response length
  c.time_scale = 2.0
  c.stream_link = "default"    # the paper's inter-VM network for the hardware
  c.host_slots = ml_collections.FieldReference(None, field_type=int)
  c.rates = (0.6, 0.9, 1.2)
  c.num_microbatches = 12      # per rate point
  c.seed = 0
  return c
