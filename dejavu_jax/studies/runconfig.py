"""The serving experiment's config: declared with each field's meaning, checked whole before
anything is built, and described.

A serve config (`configs/serve*.py`) is an ml_collections ConfigDict built by
`experiment_config(...)` from declarations: every ServeConfig field (dejavu_jax/config.py, under
its flat name: `--config.recovery=replica`, `--config.temperature=0.7`) plus the experiment's own
groups below (model, cost, workload, failures, reporting, text), each field declared once with
its meaning. `describe(c)` (`--print_config`, `--help`) prints every field of a config with its
value and meaning, generated from those declarations; `serve_config(c)` builds the ServeConfig.

`validate(c)` checks every field (types, ranges, presets, stage indices against the pipeline,
failure lists, strategy names, device count) and raises a `ConfigError` naming the first bad
field, so a typo fails in milliseconds instead of after a model build and a compile.
`strategies_of(recovery)` reads the `recovery` field: one strategy or fallback chain
("replica,snapshot,reprefill"), or a parenthesized comparison ("(restart,reprefill,replica)").
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

from dejavu_jax import config as serve_cfg


def _f(default, doc: str, kind: type | None = None):
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default),
                             metadata={"doc": doc, "kind": dict})
  return dataclasses.field(default=default, metadata={"doc": doc, "kind": kind})


@dataclasses.dataclass(frozen=True)
class ModelFields:
  """The model with random weights, or a checkpoint."""
  model: str = _f("opt_125m", "preset name of the model (dejavu_jax/config.py PRESETS)")
  model_overrides: dict = _f({}, "ModelConfig fields replaced in the preset (e.g. num_layers)")
  checkpoint: str = _f("", "local Hugging Face directory (config.json + safetensors) whose "
                           "weights replace the preset's; '' = the preset with random weights")


@dataclasses.dataclass(frozen=True)
class NumericsFields:
  """Precision."""
  dtype: str = _f("float32", "parameter and activation dtype: float32 | bfloat16 | float16")


@dataclasses.dataclass(frozen=True)
class CostFields:
  """The cost model that paces steps (pacing=paced)."""
  kind: str = _f("roofline", "roofline | table")
  model: str = _f("opt_66b", "roofline: the model whose step times are replayed (a preset)")
  hardware: str = _f("a100_80gb", "roofline: the hardware (dejavu_jax/costmodel.py HARDWARE)")
  time_scale: float = _f(1.0, "multiplies every paced step time")
  table: str = _f("", "table: a JSON file {'prompt': ..., 'token': ...}")


@dataclasses.dataclass(frozen=True)
class WorkloadFields:
  """The open-loop Poisson client."""
  rates: tuple = _f((2.0,), "request rates (req/s); one run per rate (a sweep when several)")
  num_requests: int = _f(12, "requests per run")
  prompt_len: int = _f(64, "prompt tokens per request")
  output_len: str = _f("lognormal:40,32", "output length distribution: fixed:N | "
                                          "lognormal:MEAN,MEDIAN | lmsys (LMSys-Chat-1M fit)")
  max_output: int = _f(96, "cap on sampled output lengths")


@dataclasses.dataclass(frozen=True)
class FailureFields:
  """Injected failures."""
  fail_stages: tuple = _f((1,), "stages killed (paired with fail_after_steps, or else with "
                                "fail_times); () for none")
  fail_times: tuple = _f((4.0,), "seconds into each run at which the stages above are killed "
                                 "(used when fail_after_steps is ())")
  fail_replica: int = _f(0, "with data_parallel > 1: the replica whose fail_stages fail (the "
                           "other replicas serve on)")
  fail_after_steps: tuple = _f((), "kill fail_stages right after this many steps of their "
                                   "workers: the same point of a run on a quiet or a loaded "
                                   "machine (takes precedence over fail_times)")


@dataclasses.dataclass(frozen=True)
class ReportingFields:
  """Repetitions, objectives and placement of the measured runs."""
  seeds: tuple = _f((), "repeat every run with each of these seeds and report the spread; "
                        "() = (seed,)")
  share_devices: bool = _f(False, "lay every stage on the same `tensor` devices (a whole "
                                  "pipeline on one GPU); False: stage s on its own devices")
  slo_ttft_ms: float | None = _f(None, "goodput objective on time to first token (ms); None = no "
                                       "objective", float)
  baseline: bool = _f(True, "with failures, first serve the same requests failure-free "
                           "(recovery restart): every strategy's row is read against it")
  slo_tpot_ms: float | None = _f(None, "goodput objective on time per output token (ms); None = "
                                       "no objective", float)
  check_tokens: bool = _f(False, "greedy runs: compare every run's tokens with the plain "
                                 "single-device greedy run of the same requests (the fake "
                                 "program's fake_generate, or the model's generate); logged, "
                                 "'identical' in each row, exit code 1 when one differs")


@dataclasses.dataclass(frozen=True)
class TextFields:
  """The real-model text job (configs/serve_text.py, the README main job)."""
  gguf: str = _f("", "a llama .gguf file; '' = the packaged SmolLM2-135M-Instruct")
  text_prompts: str = _f("data/prompts.txt", "text file of prompts (one per line)")
  text_new_tokens: int = _f(48, "tokens generated per text prompt")
  text_gap_s: float = _f(0.05, "seconds between text prompts (open loop)")


@dataclasses.dataclass(frozen=True)
class ServerFields:
  """The OpenAI-compatible server (configs/api_server.py, experiments/api_server.py)."""
  gguf: str = _f("", "a llama .gguf file; '' = the packaged SmolLM2-135M-Instruct")
  model_id: str = _f("smollm2-135m-instruct", "the model name clients ask for (GET /v1/models)")
  host: str = _f("127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes the server)")
  port: int = _f(8000, "TCP port (0: any free port)")
  api_key: str = _f("", "clients must send 'Authorization: Bearer <key>'; '' = no key "
                        "(the environment variable DEJAVU_API_KEY, when set, is the default)")
  default_max_tokens: int = _f(256, "a chat request without max_tokens gets at most this many "
                                    "(and never past the context)")
  retry_after_s: int = _f(1, "Retry-After (seconds) of a 429 when the queue is full")
  warmup: bool = _f(True, "compile every prompt and context bucket before serving (no compile "
                          "stalls a client; ~1-2 min on 2 CPU cores)")


# Experiment groups: name -> declaration; "cost" is a nested entry (`--config.cost.kind=table`).
EXPERIMENT_GROUPS: dict[str, type] = {
    "model": ModelFields, "numerics": NumericsFields, "cost": CostFields,
    "workload": WorkloadFields, "failures": FailureFields, "reporting": ReportingFields,
    "text": TextFields, "server": ServerFields,
}
_NESTED = ("cost",)


def _entries(cls) -> list[tuple[str, object, type | None, str]]:
  out = []
  for f in dataclasses.fields(cls):
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    out.append((f.name, default, f.metadata.get("kind"), f.metadata["doc"]))
  return out


def _docs() -> dict[str, str]:
  docs = {f.name: f.doc for f in serve_cfg.serve_fields()}
  for group, cls in EXPERIMENT_GROUPS.items():
    if group in _NESTED:
      docs[group] = cls.__doc__.splitlines()[0]
      docs.update({f"{group}.{n}": doc for n, _, _, doc in _entries(cls)})
    else:
      docs.update({n: doc for n, _, _, doc in _entries(cls)})
  return docs


def _value(default, kind):
  import ml_collections  # pylint: disable=g-import-not-at-top
  if default is None:   # typed, so that a command-line override is parsed
    return ml_collections.config_dict.placeholder(kind)
  if isinstance(default, dict):
    return ml_collections.ConfigDict(default)
  return default


def experiment_config(groups, serve_exclude=(), **values):
  """A ConfigDict of the experiment `groups` (names in EXPERIMENT_GROUPS) and every ServeConfig
  field not in `serve_exclude`, at their declared defaults, with `values` (field names; "cost"
  takes a dict) replacing them. A name that is not declared is an error."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  values = dict(values)
  for group in groups:
    cls = EXPERIMENT_GROUPS[group]
    if group in _NESTED:
      sub = ml_collections.ConfigDict()
      given = dict(values.pop(group, {}) or {})
      for name, default, kind, _ in _entries(cls):
        sub[name] = _value(given.pop(name, default), kind)
      if given:
        raise ValueError(f"{group} has no field(s) {sorted(given)}")
      c[group] = sub
      continue
    for name, default, kind, _ in _entries(cls):
      c[name] = _value(values.pop(name, default), kind)
  for f in serve_cfg.serve_fields():
    if f.name not in serve_exclude:
      c[f.name] = _value(values.pop(f.name, f.default), f.kind)
  if values:
    raise ValueError(f"experiment_config: undeclared field(s) {sorted(values)}")
  return c


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

  check_known_fields(c)
  try:   # the ServeConfig fields: each group checks its own and names the field
    sc = serve_config(c)
  except serve_cfg.ServeConfigError as e:
    raise ConfigError(e.field, str(e).removeprefix(f"{e.field}: ")) from None
  _check(c.dtype in ("float32", "bfloat16", "float16"), "dtype",
         f"must be float32, bfloat16 or float16, got {c.dtype!r}")
  if c.get("checkpoint"):
    _check(os.path.isdir(c.checkpoint), "checkpoint", f"no such directory {c.checkpoint!r}")
    max_positions = None
  elif "model" in c and not c.get("text_prompts"):   # a preset (the text job, the server: GGUF)
    try:
      cfg = get_model_config(c.model, dtype=c.dtype, **dict(c.model_overrides or {}))
    except (KeyError, ValueError, TypeError) as e:
      raise ConfigError("model", str(e)) from None
    max_positions = cfg.max_positions
  else:
    max_positions = None
  seeds = tuple(c.get("seeds", ()) or ())
  _check(all(isinstance(s, int) and s >= 0 for s in seeds), "seeds",
         f"must be a tuple of integers >= 0, got {seeds!r}")
  d, t, r = sc.topology.num_stages, sc.topology.tensor, sc.topology.data_parallel
  # Data parallelism: every replica takes one replica's devices (the shapes below, times r).
  times_r = f" x data_parallel {r}" if r > 1 else ""
  if r > 1:
    fr = c.get("fail_replica", 0)
    _check(isinstance(fr, int) and not isinstance(fr, bool) and 0 <= fr < r, "fail_replica",
           f"replica {fr!r} is outside the data-parallel replicas 0..{r - 1}")
  dp, dt = sc.disagg.prompt_stages, sc.disagg.token_stages
  if dp or dt:
    _check(isinstance(dp, int) and dp >= 1, "prompt_stages",
           f"disaggregation needs prompt_stages >= 1 (with token_stages {dt!r}), got {dp!r}")
    _check(isinstance(dt, int) and dt >= 1, "token_stages",
           f"disaggregation needs token_stages >= 1 (with prompt_stages {dp!r}), got {dt!r}")
    _check(sc.memory.swapping == "off", "swapping",
           "swapping and disaggregation are not combined; use one of them")
    _check(not c.get("share_devices"), "share_devices",
           "the prompt and token pipelines need disjoint devices")
    if num_devices is not None and sc.cluster.runtime == "local":   # Ray: actors bring theirs
      _check((dp + dt) * t * r <= num_devices, "data_parallel" if r > 1 else "token_stages",
             f"{dp} prompt + {dt} token stages x tensor {t}{times_r} need {(dp + dt) * t * r} "
             f"devices; this process has {num_devices}")
    d = dp + dt   # failures number the prompt stages first, then the token stages
  if sc.cluster.runtime == "ray":
    # Every stage actor brings its own device(s); the driver needs the ray package only.
    import importlib.util  # pylint: disable=g-import-not-at-top
    _check(importlib.util.find_spec("ray") is not None, "runtime",
           "runtime='ray' needs the ray extra: pip install -e '.[ray]'")
  elif dp or dt:
    pass   # checked above
  elif num_devices is not None and c.get("share_devices"):
    _check(t * r <= num_devices, "data_parallel" if r > 1 else "tensor",
           f"tensor {t}{times_r} needs {t * r} devices; this process has {num_devices}")
  elif num_devices is not None:
    _check(d * t * r <= num_devices, "data_parallel" if r > 1 else "num_stages",
           f"{d} stages x tensor {t}{times_r} need {d * t * r} devices; this process has "
           f"{num_devices} "
           "(set share_devices=True to lay every stage on the same device(s), e.g. one GPU; "
           "WORKSPACE.md 'GPU')")
  if c.get("check_tokens"):
    _check(sc.sampling.temperature == 0.0, "check_tokens",
           f"compares greedy tokens: needs temperature 0, got {sc.sampling.temperature}")
  max_len = _int(c, "max_len", 2) if "max_len" in c else None   # the text job derives it
  if max_positions is not None and max_len is not None:
    _check(max_len <= max_positions, "max_len",
           f"{max_len} exceeds the model's {max_positions} positions")
  if c.get("pacing") == "paced":
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
  if "rates" in c and not c.get("text_prompts"):   # an open-loop workload of its own
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
  if not stages:
    pass   # no failing stage: a failure-free run, whatever the triggers' defaults say
  elif steps:
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
  for f in ("slo_ttft_ms", "slo_tpot_ms"):
    v = c.get(f)
    _check(v is None or (isinstance(v, (int, float)) and v > 0), f,
           f"must be None (no objective) or > 0 ms, got {v!r}")


def serve_config(c, **overrides) -> serve_cfg.ServeConfig:
  """The ServeConfig of a serve config: every ServeConfig field `c` has (its flat name), then
  `overrides`."""
  fields = {f.name: c[f.name] for f in serve_cfg.serve_fields() if f.name in c}
  for name, v in fields.items():
    if isinstance(v, list):
      fields[name] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
  return serve_cfg.ServeConfig(**{**fields, **overrides})


def check_known_fields(c) -> None:
  """Every field of `c` is declared (a ServeConfig field or an experiment group's)."""
  docs = _docs()
  for name, _ in _flatten(c):
    if name not in docs and name.split(".")[0] != "model_overrides":
      import difflib  # pylint: disable=g-import-not-at-top
      close = difflib.get_close_matches(name, list(docs), n=1)
      raise ConfigError(name, "is not a declared field" +
                        (f"; did you mean {close[0]!r}?" if close else ""))


def _flatten(c, prefix=""):
  for key in c.keys():
    v = c[key]
    name = f"{prefix}{key}"
    if hasattr(v, "keys") and key != "model_overrides":
      yield name, ""
      yield from _flatten(v, name + ".")
    else:
      yield name, dict(v) if hasattr(v, "keys") else v


def describe(c) -> str:
  """Every field of `c` with its value (the config file's default, or the override) and its
  declared meaning, ServeConfig's grouped by concern."""
  docs = _docs()
  rows = list(_flatten(c))
  width = max(len(r[0]) for r in rows)
  vwidth = min(34, max(len(repr(r[1])) for r in rows))
  group_of = {f.name: f.group for f in serve_cfg.serve_fields()}
  heads = {g: cls.__doc__.splitlines()[0] for g, cls in serve_cfg.SERVE_GROUPS.items()}
  lines = [f"{'field':<{width}}  {'value':<{vwidth}}  meaning", "-" * (width + vwidth + 40)]
  exp = [r for r in rows if r[0].split(".")[0] not in group_of]
  lines += ["[experiment]"] + [_row(n, v, docs, width, vwidth) for n, v in exp]
  for group in serve_cfg.SERVE_GROUPS:
    mine = [r for r in rows if group_of.get(r[0]) == group]
    if mine:
      lines += [f"[ServeConfig.{group}] {heads[group]}"]
      lines += [_row(n, v, docs, width, vwidth) for n, v in mine]
  return "\n".join(lines)


def _row(name, v, docs, width, vwidth) -> str:
  val = "" if v == "" and name in _NESTED else repr(v)
  return f"{name:<{width}}  {val:<{vwidth}}  {docs.get(name, '(undocumented)')}"
