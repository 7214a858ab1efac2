"""What a serve returns: `ServeResult` (records, rejections, summary, recoveries), the
`EngineError` / `EngineTimeout` that carry it when serving failed, and `finish_serve`, which
turns a serve's per-request states and the workers' counters into them."""

from __future__ import annotations

import dataclasses

import numpy as np

from dejavu_jax import metrics as metrics_lib


@dataclasses.dataclass
class ServeResult:
  records: list                    # metrics.RequestRecord per served request, by request id
  rejected: dict                   # request_id -> reason
  summary: dict
  wall_s: float
  stage_busy_s: list
  recoveries: list = dataclasses.field(default_factory=list)   # RecoveryEvent per failure
  error: str | None = None         # why serving stopped early (None: everything was served)
  cache_probes: list = dataclasses.field(default_factory=list)  # cache_oracle.ProbeRecord
                                   # per used row of each probed cache (ServeConfig.cache_probe)

  def tokens(self) -> dict[int, list[int]]:
    return {r.request_id: list(r.tokens) for r in self.records}


class EngineError(RuntimeError):
  """Serving failed; `.result` is the `ServeResult` of everything served until then."""

  def __init__(self, message: str, result: ServeResult):
    super().__init__(message)
    self.result = result


class EngineTimeout(EngineError, TimeoutError):
  """Serving failed on a hang (no step finished within `step_timeout_s`)."""


def _delta(stats, stats0: dict, field: str):
  return sum(getattr(st, field) - getattr(stats0.get(st.worker_id), field, 0) for st in stats)


def finish_serve(recs, rejected, summary: dict, wall: float, stats, stats0: dict, paced: bool,
                 events, error, cause, raise_on_error: bool, cache_probes=()) -> ServeResult:
  """The end of a serve: this serve's share of the workers' counters (`stats` minus `stats0`,
  the same workers' stats when it began) into the summary, then the result, or the
  `EngineError` / `EngineTimeout` carrying it."""
  if paced:  # steps whose real compute outlasted the modeled time
    summary["paced_overruns"] = _delta(stats, stats0, "overruns")
  summary["snapshot_errors"] = _delta(stats, stats0, "snapshot_errors")
  if events:
    summary["failures"] = len(events)
    summary["mean_recovery_s"] = float(np.mean([e.recovery_s for e in events]))
  if error is not None:
    summary["error"] = error
  busy = [st.busy_s - getattr(stats0.get(st.worker_id), "busy_s", 0.0) for st in stats]
  result = ServeResult(recs, rejected, summary, wall, busy, events, error, list(cache_probes))
  if error is not None and raise_on_error:
    done = sum(r.done for r in recs)
    kind = EngineTimeout if isinstance(cause, TimeoutError) else EngineError
    raise kind(f"serving failed with {done} of {len(recs)} admitted requests finished "
               f"(see .result): {error}", result) from cause
  return result


def record(state) -> metrics_lib.RequestRecord:
  """The metrics record of one request's `RequestState`."""
  req = state.request
  return metrics_lib.RequestRecord(
      request_id=req.request_id, arrival=req.arrival, prompt_len=len(req.prompt),
      first_token=state.token_times[0] if state.token_times else None, finish=state.finish,
      output_len=len(state.tokens) if state.done else 0, tokens=list(state.tokens),
      token_times=list(state.token_times), recomputed_tokens=state.recomputed)
