"""Where prompts run: the engine loop's one parameter for the serving shape (`PromptPath`).

The engine (serving/engine.py) calls its prompt path at fixed points of one loop: `layout`,
`build`, `make_runtime`, `start` when it is built; per serve `check_failures`, `locate` (which
runtime a failure's stage numbers), `scheduler_depth`, `begin` (the path's per-serve state),
`inject` (start prefills, move ready microbatches into the token pipeline), `on_event` (its own
events; None for the token pipeline's), `on_finished`, `busy`, `detect_and_recover` (its own
workers' failures), `after_token_recovery`, `abandon`, `summary`, `describe_hang`.

`ColocatedPath` (the paper's baseline): a microbatch's prefill is a step of the token pipeline,
submitted to its stage 0 when the scheduler injects the microbatch; every other hook is empty.
`DisaggregatedPath` (serving/disagg_path.py): a prompt pipeline of its own streaming each
prompt's KV into host slots of the token workers.
"""

from __future__ import annotations

from dejavu_jax.fault.controller import RecoveryEvent
from dejavu_jax.pipeline.plan import plan_stages


def make_prompt_path(serve):
  """Disaggregated when `serve` names prompt or token stages, else colocated."""
  if serve.disagg.prompt_stages or serve.disagg.token_stages:
    from dejavu_jax.serving.disagg_path import DisaggregatedPath  # pylint: disable=g-import-not-at-top
    return DisaggregatedPath(serve)
  return ColocatedPath()


class ColocatedPath:
  """Prefills on the token pipeline's stage 0 (module doc). Every hook is the identity."""
  token_role = "pipeline"
  host_slots = 0

  def layout(self, cfg, serve, devices, in_process):
    """The token pipeline's plan and the devices of its mesh."""
    d = serve.topology.num_stages
    # Out of process (Ray) every stage actor brings its own devices; the driver needs none.
    n = len(devices) if in_process else max(len(devices), d * serve.topology.tensor)
    return plan_stages(cfg, d, serve.topology.stage_ranges, serve.topology.tensor, num_devices=n), devices

  def all_ranges(self, plan):
    return list(plan.ranges)

  def build(self, engine, devices, cost_model, time_scale) -> None:
    pass

  def make_runtime(self, engine) -> None:
    pass

  def start(self, engine) -> None:
    pass

  def close(self) -> None:
    pass

  def runtimes(self) -> list:
    return []

  def worker_stats(self) -> list:
    return []

  def check_failures(self, engine, failures) -> None:
    d = engine.plan.num_stages
    for f in failures:
      if not 0 <= f.stage < d:
        raise ValueError(f"failure at stage {f.stage}, but the pipeline has stages 0..{d - 1}")

  def locate(self, engine):
    return lambda stage: ("token", engine.runtime, stage)

  def scheduler_depth(self, engine) -> int:
    return engine.plan.num_stages

  def begin(self, engine, st):
    return None

  def busy(self, st) -> bool:
    return False

  def inject(self, engine, st) -> None:
    while (mb := st.sched.inject()) is not None:
      engine.send_prefill(st, mb)

  def on_event(self, engine, st, ev) -> int | None:
    return None

  def on_finished(self, st, done_at: float) -> None:
    pass

  def detect_and_recover(self, engine, st) -> RecoveryEvent | None:
    return None

  def after_token_recovery(self, engine, st, dead, event) -> None:
    pass

  def abandon(self, engine, st) -> None:
    pass

  def summary(self, engine) -> dict:
    return {}

  def describe_hang(self, engine, st) -> str:
    return ""

  def slots_free(self, st) -> list[int]:
    return []
