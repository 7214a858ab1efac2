"""The serving experiment's config, checked whole before anything is built, and described.

`validate(c)` checks every field of a `configs/serve*.py` config (types, ranges, presets, stage
indices against the pipeline, failure lists, strategy names, device count) and raises a
`ConfigError` naming the first bad field, so a typo fails in milliseconds instead of after a model
build and a compile. `FIELD_DOCS` says what each field means; `describe(c)` is the table that
`experiments/serve.py --print_config` prints (every field, its value, its meaning).
`strategies_of(recovery)` reads the `recovery` field: one strategy or fallback chain
("replica,snapshot,reprefill"), or a parenthesized comparison ("(restart,reprefill,replica)").
"""

from __future__ import annotations

import csv
import math
import os

FIELD_DOCS = {
    "model": "preset name of the model (dejavu_jax/config.py PRESETS); ignored with checkpoint",
    "model_overrides": "ModelConfig fields replaced in the preset (e.g. num_layers)",
    "checkpoint": "local Hugging Face directory (config.json + safetensors); '' = random weights",
    "dtype": "parameter and activation dtype: float32 | bfloat16 | float16",
    "seed": "seed of the random weights, the workload and sampling",
    "seeds": "repeat every run with each of these seeds and report the spread; () = (seed,)",
    "num_stages": "pipeline depth D (stages on disjoint devices)",
    "tensor": "devices per stage (tensor parallelism); num_stages * tensor devices in all",
    "microbatch_size": "requests per microbatch; D microbatches in flight",
    "max_len": "KV cache length per request (prompt + generated tokens must fit)",
    "mode": "mixed (per-row lengths) | paper (a microbatch's rows share lengths)",
    "pacing": "real (steps last what they last) | paced (steps last the cost model's time)",
    "cost": "the cost model that paces steps (pacing=paced)",
    "cost.kind": "roofline | table",
    "cost.model": "roofline: the model whose step times are replayed (a preset)",
    "cost.hardware": "roofline: the hardware (dejavu_jax/costmodel.py HARDWARE)",
    "cost.time_scale": "multiplies every paced step time",
    "cost.table": "table: a JSON file {'prompt': ..., 'token': ...}",
    "rates": "request rates (req/s); one run per rate (a sweep when several)",
    "num_requests": "requests per run",
    "prompt_len": "prompt tokens per request",
    "output_len": "output length distribution: fixed:N | lognormal:MEAN,MEDIAN | lmsys",
    "max_output": "cap on sampled output lengths",
    "fail_stages": "stages killed (paired with fail_times); () for none",
    "fail_times": "seconds into each run at which the stages above are killed",
    "recovery": ("recovery strategy or fallback chain ('replica', 'replica,snapshot,reprefill'), "
                 "or a comparison of several in parentheses: '(restart,reprefill,replica)'"),
    "snapshot_every": "snapshot strategy: a snapshot every this many steps",
    "program": "model (the transformer) | fake (hand-checkable arithmetic, tests)",
    "heartbeat_s": "worker heartbeat period (s)",
    "heartbeat_timeout_s": "silence after which a worker is declared dead (s)",
    "max_pending": "admission queue bound (a request arriving to a full queue is rejected)",
    "share_devices": ("lay every stage on the same `tensor` devices (a whole pipeline on one GPU); "
                      "False: stage s on its own devices"),
    "slo_ttft_ms": "goodput objective on time to first token (ms); None = no objective",
    "slo_tpot_ms": "goodput objective on time per output token (ms); None = no objective",
    "runtime": "local (workers are threads of this process) | ray (one actor process per stage)",
    "ray": "Ray runtime options (runtime=ray)",
    "ray.address": "a running Ray cluster ('auto', 'host:6379'); '' = a local session on 127.0.0.1",
    "ray.placement": "pack (stages where they fit) | spread (one stage per node)",
    "ray.transport": "actor-to-actor transfers: object_store | jax_transfer (under a watchdog)",
    "ray.gpus_per_stage": "GPUs per stage actor (0: one CPU device per actor)",
    "swapping": ("microbatch swapping: off | on (caches in host memory, 2 device buffers) | auto "
                 "(on where the cost model says the swap-in hides under the step)"),
    "device_kv_budget_bytes": ("device KV bytes per worker; decides the microbatch size (the "
                               "largest whose D, or with swapping 2, buffers fit); None = off"),
    "prompt_stages": "disaggregation: prompt pipeline depth Dp (0 with token_stages 0: colocated)",
    "token_stages": "disaggregation: token pipeline depth Dt (disjoint devices after the prompt's)",
    "host_slots": "disaggregation: prompt caches each token worker holds in host memory (None: Dp+Dt)",
    # configs/serve_text.py (the README main job)
    "gguf": "a llama .gguf file; '' = the packaged SmolLM2-135M-Instruct",
    "text_prompts": "text file of prompts (one per line) for the real-model job",
    "text_new_tokens": "tokens generated per text prompt",
    "text_gap_s": "seconds between text prompts (open loop)",
    "fail_after_steps": "kill fail_stages right after this many steps of their workers",
}


class ConfigError(ValueError):
  """A config field is wrong; `field` names it."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config.{field}: {message}")
    self.field = field


def strategies_of(recovery) -> tuple[str, ...]:
  """The strategies a run compares: "replica,snapshot,reprefill" is ONE strategy (a fallback
  chain); "(restart,replica)", "[restart, replica]" or a tuple/list are several. Inside the
  parentheses a chain is quoted: '("replica,snapshot,reprefill", restart)'."""
  if isinstance(recovery, (tuple, list)):
    out = tuple(str(x).strip() for x in recovery)
  else:
    text = str(recovery).strip()
    if text[:1] in "([" and text[-1:] in ")]":
      # Comma-separated, a quoted item may hold commas (a chain): csv's quoting rules.
      inner = text[1:-1]
      quote = min(('"', "'"), key=lambda q: inner.find(q) % (len(inner) + 1))
      items = next(csv.reader([inner], skipinitialspace=True, quotechar=quote), [])
      out = tuple(x.strip() for x in items if x.strip())
    else:
      out = (text,)
  if not out:
    raise ConfigError("recovery", "no strategy given")
  return out


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(field, message)


def _int(c, field: str, lo: int = 1) -> int:
  v = c[field]
  _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, field,
         f"must be an integer >= {lo}, got {v!r}")
  return v


def validate(c, num_devices: int | None = None) -> None:
  """Raises `ConfigError` naming the first bad field of a serve config (module doc)."""
  from dejavu_jax import costmodel  # pylint: disable=g-import-not-at-top
  from dejavu_jax.config import get_model_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.fault import strategies as strat  # pylint: disable=g-import-not-at-top

  _check(c.dtype in ("float32", "bfloat16", "float16"), "dtype",
         f"must be float32, bfloat16 or float16, got {c.dtype!r}")
  if c.get("checkpoint"):
    _check(os.path.isdir(c.checkpoint), "checkpoint", f"no such directory {c.checkpoint!r}")
    max_positions = None
  elif not c.get("text_prompts"):
    try:
      cfg = get_model_config(c.model, dtype=c.dtype, **dict(c.model_overrides or {}))
    except (KeyError, ValueError, TypeError) as e:
      raise ConfigError("model", str(e)) from None
    max_positions = cfg.max_positions
  else:
    max_positions = None
  _int(c, "seed", 0)
  seeds = tuple(c.get("seeds", ()) or ())
  _check(all(isinstance(s, int) and s >= 0 for s in seeds), "seeds",
         f"must be a tuple of integers >= 0, got {seeds!r}")
  d, t = _int(c, "num_stages"), _int(c, "tensor")
  dp, dt = c.get("prompt_stages", 0) or 0, c.get("token_stages", 0) or 0
  if dp or dt:
    _check(isinstance(dp, int) and dp >= 1, "prompt_stages",
           f"disaggregation needs prompt_stages >= 1 (with token_stages {dt!r}), got {dp!r}")
    _check(isinstance(dt, int) and dt >= 1, "token_stages",
           f"disaggregation needs token_stages >= 1 (with prompt_stages {dp!r}), got {dt!r}")
    _check(c.get("runtime", "local") == "local", "runtime",
           "disaggregation runs on the local runtime")
    _check(c.get("swapping", "off") == "off", "swapping",
           "swapping and disaggregation are not combined; use one of them")
    _check(not c.get("share_devices"), "share_devices",
           "the prompt and token pipelines need disjoint devices")
    if num_devices is not None:
      _check((dp + dt) * t <= num_devices, "token_stages",
             f"{dp} prompt + {dt} token stages x tensor {t} need {(dp + dt) * t} devices; this "
             f"process has {num_devices}")
    d = dp + dt   # failures number the prompt stages first, then the token stages
  elif c.get("runtime", "local") == "ray":
    # Every stage actor brings its own device(s); the driver needs the ray package only.
    import importlib.util  # pylint: disable=g-import-not-at-top
    _check(importlib.util.find_spec("ray") is not None, "runtime",
           "runtime='ray' needs the ray extra: pip install -e '.[ray]'")
  elif num_devices is not None and c.get("share_devices"):
    _check(t <= num_devices, "tensor", f"tensor {t} needs {t} devices; this process has "
           f"{num_devices}")
  elif num_devices is not None:
    _check(d * t <= num_devices, "num_stages",
           f"{d} stages x tensor {t} need {d * t} devices; this process has {num_devices} "
           "(set share_devices=True to lay every stage on the same device(s), e.g. one GPU; "
           "WORKSPACE.md 'GPU')")
  _int(c, "microbatch_size")
  max_len = _int(c, "max_len", 2)
  if max_positions is not None:
    _check(max_len <= max_positions, "max_len",
           f"{max_len} exceeds the model's {max_positions} positions")
  _check(c.mode in ("mixed", "paper"), "mode", f"must be 'mixed' or 'paper', got {c.mode!r}")
  _check(c.pacing in ("real", "paced"), "pacing", f"must be 'real' or 'paced', got {c.pacing!r}")
  if c.pacing == "paced":
    _check(c.cost.kind in ("roofline", "table"), "cost.kind",
           f"must be 'roofline' or 'table', got {c.cost.kind!r}")
    if c.cost.kind == "roofline":
      try:
        get_model_config(c.cost.model)
      except (KeyError, ValueError) as e:
        raise ConfigError("cost.model", str(e)) from None
      _check(c.cost.hardware in costmodel.HARDWARE or c.cost.hardware == "this_cpu",
             "cost.hardware", f"unknown hardware {c.cost.hardware!r}; expected one of "
             f"{sorted(costmodel.HARDWARE)}")
    else:
      _check(os.path.isfile(c.cost.table), "cost.table", f"no such file {c.cost.table!r}")
    _check(c.cost.time_scale > 0, "cost.time_scale", f"must be > 0, got {c.cost.time_scale}")
  if not c.get("text_prompts"):
    rates = tuple(c.rates)
    _check(len(rates) > 0 and all(isinstance(r, (int, float)) and r > 0 for r in rates), "rates",
           f"must be a non-empty tuple of rates > 0 (req/s), got {rates!r}")
    _int(c, "num_requests")
    prompt_len = _int(c, "prompt_len")
    _check(prompt_len < max_len, "prompt_len",
           f"{prompt_len} leaves no room for a generated token in max_len {max_len}")
    _int(c, "max_output")
    try:
      from dejavu_jax import workload  # pylint: disable=g-import-not-at-top
      workload.make_workload(workload.WorkloadConfig(rate=1.0, num_requests=1, prompt_len=prompt_len,
                                   output_len=c.output_len, vocab_size=64, seed=0,
                                   max_output=c.max_output))
    except (ValueError, KeyError) as e:
      raise ConfigError("output_len", str(e)) from None
  stages = tuple(c.fail_stages)
  times = tuple(c.fail_times or ())
  steps = tuple(c.get("fail_after_steps", ()) or ())
  for s in stages:
    _check(isinstance(s, int) and 0 <= s < d, "fail_stages",
           f"stage {s!r} is outside the pipeline's stages 0..{d - 1}")
  if steps:
    _check(len(steps) == len(stages), "fail_after_steps",
           f"fail_stages {list(stages)} and fail_after_steps {list(steps)} must have the same "
           "length")
  else:
    _check(len(times) == len(stages), "fail_times",
           f"fail_stages {list(stages)} and fail_times {list(times)} must have the same length")
    _check(all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in times),
           "fail_times", f"must be times >= 0 (s), got {list(times)}")
  for spec in strategies_of(c.recovery):
    for name in spec.split(","):
      _check(name.strip() in strat.STRATEGIES, "recovery",
             f"unknown strategy {name.strip()!r} in {spec!r}; available: "
             f"{sorted(strat.STRATEGIES)} (a chain: 'replica,snapshot,reprefill'; a comparison: "
             "'(restart,replica)')")
  _int(c, "snapshot_every")
  _check(c.program in ("model", "fake"), "program",
         f"must be 'model' or 'fake', got {c.program!r}")
  for f in ("slo_ttft_ms", "slo_tpot_ms"):
    v = c.get(f)
    _check(v is None or (isinstance(v, (int, float)) and v > 0), f,
           f"must be None (no objective) or > 0 ms, got {v!r}")
  # The remaining fields are ServeConfig's; it checks them by name.
  from dejavu_jax.studies.runner import serve_config  # pylint: disable=g-import-not-at-top
  for spec in strategies_of(c.recovery):
    try:
      c2 = c.copy_and_resolve_references()
      with c2.unlocked():
        c2.recovery = spec
      serve_config(c2)
    except ValueError as e:
      field = next((k for k in ("heartbeat_timeout_s", "heartbeat_s", "max_pending",
                                "device_kv_budget_bytes", "swapping", "host_slots",
                                "ray_placement", "ray_transport", "ray_gpus_per_stage",
                                "runtime") if k in str(e)), "serve")
      field = field.replace("ray_", "ray.") if field.startswith("ray_") else field
      raise ConfigError(field, str(e)) from None


def _flatten(c, prefix=""):
  for key in c.keys():
    v = c[key]
    name = f"{prefix}{key}"
    if hasattr(v, "keys") and not isinstance(v, dict) and key != "model_overrides":
      yield name, "", FIELD_DOCS.get(name, "")
      yield from _flatten(v, name + ".")
    else:
      yield name, dict(v) if hasattr(v, "keys") else v, FIELD_DOCS.get(name, "")


def describe(c) -> str:
  """Every field of `c` with its value (the config file's default, or the override) and meaning."""
  rows = list(_flatten(c))
  width = max(len(r[0]) for r in rows)
  vwidth = min(34, max(len(repr(r[1])) for r in rows))
  lines = [f"{'field':<{width}}  {'value':<{vwidth}}  meaning", "-" * (width + vwidth + 40)]
  for name, v, doc in rows:
    val = "" if v == "" and doc and name in ("cost",) else repr(v)
    lines.append(f"{name:<{width}}  {val:<{vwidth}}  {doc or '(undocumented)'}")
  return "\n".join(lines)
