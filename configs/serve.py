"""The main job: a small end-to-end serving run on this machine, with one failure and recovery.

OPT-125M-shaped random weights (or a local Hugging Face checkpoint), a 2-stage pipeline on
virtual CPU devices, an open-loop Poisson client, and stage 1 killed mid-run.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # Model: a preset name, with optional overrides; or a local HF checkpoint directory.
  c.model = "opt_125m"
  c.model_overrides = ml_collections.ConfigDict({"max_positions": 2048})
  c.checkpoint = ""                 # e.g. /path/to/opt-125m (config.json + safetensors)
  c.dtype = "float32"
  c.seed = 0
  # Pipeline.
  c.num_stages = 2
  c.tensor = 1
  c.microbatch_size = 4
  c.max_len = 256
  c.mode = "mixed"                  # "paper": a microbatch's rows share prompt/output lengths
  c.pacing = "real"                 # "paced": stage steps last what `cost` below says
  c.cost = ml_collections.ConfigDict({
      "kind": "roofline",           # "roofline" | "table" | "calibrated"
      "model": "opt_66b",           # for roofline: the model whose timing is replayed
      "hardware": "a100_80gb",
      "time_scale": 1.0,
      "table": "",                  # for table: a JSON file {"prompt": ..., "token": ...}
  })
  # Workload: open loop, Poisson arrivals. Several rates make a rate sweep (one run per rate).
  c.rates = (2.0,)
  c.num_requests = 12
  c.prompt_len = 64
  c.output_len = "lognormal:40,32"  # "lmsys" for the LMSys-Chat-1M fit (mean ~209 tokens)
  c.max_output = 96
  # Fault tolerance: kill these stages right after this many steps of their workers (the same
  # point of the run on a quiet or a loaded machine: a wall-clock time, on a loaded machine,
  # often lands before any token was generated); () for none. Wall clock instead:
  # --config.fail_after_steps='()' --config.fail_times='(4.0,)' (seconds into the run).
  c.fail_stages = (1,)
  c.fail_after_steps = (40,)
  c.fail_times = ()
  # "replica" (DéjàVu) | "restart" | "reprefill" | "snapshot", or a fallback chain such as
  # "replica,snapshot,reprefill" (dejavu_jax/fault/strategies.py); several in parentheses,
  # '(restart,reprefill,replica,snapshot)', are compared in one run on one compiled engine.
  c.recovery = "replica"
  c.snapshot_every = 8              # snapshot strategy: orbax snapshot every this many steps
  c.program = "model"               # "model" | "fake" (hand-checkable arithmetic, for tests)
  c.heartbeat_s = 0.1
  c.heartbeat_timeout_s = 0.5       # the paper uses 1 s / 3 s
  # Admission control: requests waiting for a microbatch slot; one arriving when this many wait
  # is rejected ("queue full"). None: unbounded.
  c.max_pending = ml_collections.config_dict.placeholder(int)
  # Reporting (issue 15): repeat every run with each seed (spread reported); () = (seed,).
  # Goodput (vLLM): requests/s that met both objectives; None = no objective.
  c.seeds = ()
  # Placement: True lays every stage on the same `tensor` devices (a whole pipeline on one GPU;
  # stages then take turns on it); False: stage s owns devices [s*tensor, (s+1)*tensor).
  c.share_devices = False
  c.slo_ttft_ms = ml_collections.config_dict.placeholder(float)
  c.slo_tpot_ms = ml_collections.config_dict.placeholder(float)
  # Where the workers run: "local" (threads of this process) or "ray" (one actor process per
  # stage; a failure is a SIGKILL of its pid). ray.address: a running cluster ("auto",
  # "host:6379"), or "" for a local session on 127.0.0.1; placement "pack" | "spread" (one
  # stage per node); transport "object_store" | "jax_transfer".
  c.runtime = "local"
  # Microbatch swapping (kv/swapping.py): "off" | "on" | "auto" (on where the cost model says the
  # swap-in hides under the step). A device KV budget (bytes per worker) then decides the
  # microbatch size: the largest whose D (swapping: 2) cache buffers fit. None: microbatch_size.
  c.swapping = "off"
  c.device_kv_budget_bytes = ml_collections.config_dict.placeholder(int)
  # Prompt-token disaggregation (serving/disagg_engine.py): prompt_stages + token_stages > 0 runs
  # a prompt pipeline and a token pipeline on disjoint devices (num_stages is then unused;
  # fail_stages number the prompt stages first). host_slots: None = prompt + token stages.
  c.prompt_stages = 0
  c.token_stages = 0
  c.host_slots = ml_collections.config_dict.placeholder(int)
  c.ray = ml_collections.ConfigDict({"address": "", "placement": "pack",
                                     "transport": "object_store", "gpus_per_stage": 0.0})
  return c
