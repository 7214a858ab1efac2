"""Which requests a serve admits: `validate` names what is wrong with one request (the request
and the field), `admissible` normalizes the valid ones into arrival order and rejects duplicate
ids (the first to arrive is served)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

from dejavu_jax.models.generate import validate_prompts
from dejavu_jax.workload import Request


def validate(cfg, max_len: int, request) -> str | None:
  """The reason `request` cannot be served (naming it and the field), or None."""
  rid = getattr(request, "request_id", None)
  if not isinstance(rid, numbers.Integral) or isinstance(rid, bool):
    return f"request {rid!r}: request_id must be an integer"
  arrival = getattr(request, "arrival", None)
  # NaN compares false with every clock reading: such a request would never arrive.
  if (not isinstance(arrival, numbers.Real) or isinstance(arrival, bool) or
      not 0 <= arrival < math.inf):
    return f"request {rid}: arrival must be a finite time >= 0 (seconds), got {arrival!r}"
  try:
    validate_prompts(cfg, [getattr(request, "prompt", None)],
                     getattr(request, "max_new_tokens", None), max_len)
  except ValueError as e:
    return f"request {rid}: " + str(e).replace("prompt 0", "prompt")
  return None


def admissible(check: Callable, requests, rejected: dict) -> list[Request]:
  """The requests `check` finds no reason against, normalized (plain ints and floats) and in
  arrival order; the others go to `rejected`. Of several requests with one id, the first to
  arrive is served."""
  ok = []
  for req in requests:
    reason = check(req)
    if reason:
      rejected[getattr(req, "request_id", None)] = reason
    else:
      fields = dict(request_id=int(req.request_id), arrival=float(req.arrival),
                    prompt=tuple(int(t) for t in req.prompt),
                    max_new_tokens=int(req.max_new_tokens))
      ok.append(dataclasses.replace(req, **fields) if dataclasses.is_dataclass(req)
                else Request(**fields))
  ok.sort(key=lambda r: r.arrival)   # stable: equal arrivals keep the caller's order
  first, out = {}, []
  for req in ok:
    if req.request_id in first:
      rejected[req.request_id] = (
          f"request {req.request_id}: request_id {req.request_id} is already used by the "
          f"request arriving at {first[req.request_id]:g} s; this one (arrival "
          f"{req.arrival:g} s) is rejected and the first is served")
      continue
    first[req.request_id] = req.arrival
    out.append(req)
  out.sort(key=lambda r: (r.arrival, r.request_id))
  return out
