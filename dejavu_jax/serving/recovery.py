"""The engine's execution of a recovery plan (fault/strategies.py) after token workers died.

`recover(engine, state, dead)` raises the epoch (queued steps of the lost work are dropped),
replaces the dead workers, asks the strategy chain for one plan and executes it: caches are
loaded into the replacements from the plan's sources (heartbeats, acks and snapshots keep being
handled while it waits), microbatches whose load failed are planned again with the failed
strategy excluded, the rest are rewound or requeued in the scheduler, the plan's `resync` stages
re-send their replicas, and the resumed microbatches' next decode steps are submitted. The
prompt path then recovers what it holds. Returns what the failure cost (`RecoveryEvent`).
"""

from __future__ import annotations

import collections
import dataclasses
import time

from dejavu_jax.fault.controller import RecoveryEvent
from dejavu_jax.fault.strategies import FailureView
from dejavu_jax.runtime import api


def recover(engine, st, dead: list[int]) -> RecoveryEvent:
  """Recovers the token pipeline from the death of stages `dead` (module doc)."""
  detected, sched, d = st.now(), st.sched, engine.plan.num_stages
  # A worker that died around this failure but is not yet silent long enough (the runtime
  # already knows: a stopped thread, a dead actor) is recovered now too, not planned around.
  dead = sorted(set(dead) | {s for s in range(d) if not engine.runtime.alive(s)})
  failed_at = st.injector.failed_at("token", dead, engine.runtime, detected)
  engine.epoch += 1
  for s in range(d):
    engine.runtime.worker(s).set_epoch(engine.epoch)
  view = FailureView(tuple(dead), d, {m: mb.step for m, mb in sched.in_flight.items()})
  engine.strategy.forget(view)
  for s in dead:
    w = engine.runtime.replace(s)
    w.set_epoch(engine.epoch)
    engine.controller.watch(s, w.worker_id)
    st.watchdog.replaced(s)
  st.watchdog.clear()   # every in-flight microbatch is resumed or requeued below
  plan = engine.strategy.plan(view)
  resync = set(plan.resync)
  st.injector.on_recovery()   # injected: a failure while this recovery loads caches
  resumed, requeue, handled, load_errors = [], {}, {}, []
  while True:
    requeue.update(plan.requeue)
    handled.update({mb: plan.handled_by[mb] for mb in plan.requeue})
    failed = _load_caches(engine, st, plan.resume, load_errors)
    for r in plan.resume:
      if r.mb_id not in failed:
        resumed.append(r)
        handled[r.mb_id] = r.by
    if not failed:
      break
    exclude = view.exclude | {plan.handled_by[m] for m in failed}
    view = dataclasses.replace(view, completed={m: view.completed[m] for m in failed},
                               exclude=exclude)
    plan = engine.strategy.plan(view)
  lost_requests = sum(int((~mb.done[:len(mb.requests)]).sum())
                      for mb in sched.in_flight.values())
  lost_microbatches, recomputed = len(sched.in_flight), 0
  for mb_id, mode in requeue.items():
    mb = sched.in_flight[mb_id]
    st.slot_free_at[mb.slot] = time.perf_counter()
    recomputed += sched.requeue(mb, mode)
    engine.free_everywhere(mb_id)
  for r in resumed:
    recomputed += sched.rewind(sched.in_flight[r.mb_id], r.step)
  for s in sorted(resync):   # the replicas a dead holder kept are rebuilt by their owner
    engine.runtime.worker(s).resync()
  for r in resumed:
    engine.send_decode(st, sched.in_flight[r.mb_id], time.perf_counter())
  event = RecoveryEvent(
      stage=dead[0], strategy=engine.serve_cfg.fault.recovery, failed_at=failed_at,
      detected_at=detected, recovered_at=0.0, lost_microbatches=lost_microbatches,
      lost_requests=lost_requests, recomputed_tokens=recomputed,
      restored_microbatches=len(resumed), stages=tuple(dead),
      handled_by=dict(collections.Counter(handled.values())), load_errors=load_errors)
  engine.prompt_path.after_token_recovery(engine, st, dead, event)
  event.recovered_at = st.now()
  return event

def _load_caches(engine, st, resumes, errors: list) -> set[int]:
  """Loads every resumed microbatch's caches into the replaced workers and waits for them;
  returns the microbatches whose load failed (or did not finish in time)."""
  waiting = {}
  for r in resumes:
    for s, source in r.sources.items():
      engine.runtime.worker(s).load_cache(r.mb_id, source, engine.epoch)
      waiting[(s, r.mb_id)] = r
  failed = set()
  deadline = time.perf_counter() + engine.serve_cfg.fault.step_timeout_s
  while waiting and time.perf_counter() < deadline:
    for (s, mb), r in list(waiting.items()):   # a holder or a replacement died meanwhile
      src = r.sources[s]
      if not engine.runtime.alive(s) or (isinstance(src, api.ReplicaSource) and
                                       not engine.runtime.alive(src.holder)):
        del waiting[(s, mb)]
        failed.add(mb)
    for ev in api.drain(engine.runtime.events, 0.05):
      if isinstance(ev, api.CacheLoaded):
        r = waiting.pop((ev.stage, ev.mb_id), None)
        if r is not None and ev.error is not None:
          failed.add(ev.mb_id)
          errors.append(f"microbatch {ev.mb_id} on stage {ev.stage}: {ev.error}")
      elif not isinstance(ev, (api.StepResult, api.StepError)):
        engine.on_event(st, ev)   # heartbeats, acks, snapshots keep flowing
  failed |= {mb for _, mb in waiting}
  return failed
