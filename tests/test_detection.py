"""Failure detection and injection as small objects, without JAX: a silent worker the runtime
vouches for (a starved thread) is not dead, the progress watchdog names a stage that holds work
and finishes nothing, and the injector fires each spec once, at its trigger."""

import time

from dejavu_jax.fault.controller import Controller, ProgressWatchdog
from dejavu_jax.fault.inject import FailureSpec, Injector


def test_silence_is_death_only_without_the_runtimes_word():
  c = Controller(timeout_s=0.05)
  c.watch(0, worker_id=7)
  c.watch(1, worker_id=8)
  time.sleep(0.1)
  assert c.dead_stages() == [0, 1]                       # silence alone (a remote runtime)
  assert c.dead_stages(lambda s: s == 0) == [1]          # stage 0's thread lives: starved
  c.beat(1, 8, time.monotonic())
  assert c.dead_stages(lambda s: False) == [0]


def test_watchdog_names_the_stage_a_step_waits_on():
  w = ProgressWatchdog(num_stages=3, timeout_s=0.05)
  w.expect(mb_id=4)
  w.progress(0, 4)                                       # now waits on stage 1
  time.sleep(0.1)
  assert w.stalled() == [1]
  w.replaced(1)
  assert w.stalled() == []
  w.progress(1, 4)
  w.progress(2, 4)                                       # left the pipeline: nobody waits
  time.sleep(0.1)
  assert w.stalled() == []


class _FakeRuntime:
  def __init__(self):
    self.log = []

  def kill(self, s):
    self.log.append(("kill", s))

  def stall(self, s, seconds):
    self.log.append(("stall", s, seconds))

  def arm(self, s, after, kind, stall_s):
    self.log.append(("arm", s, after, kind))

  def died_at(self, s):
    return None


def test_injector_fires_each_trigger_once():
  rt, clock = _FakeRuntime(), [0.0]
  failures = [FailureSpec(0.5, 1), FailureSpec(stage=2, after_steps=3),
              FailureSpec(stage=0, after_steps=0), FailureSpec(stage=1, during_recovery=True),
              FailureSpec(stage=2, after_snapshots=1, kind="stall", stall_s=1.0)]
  inj = Injector(failures, lambda s: ("token", rt, s), lambda: clock[0], t0=0.0)
  inj.watch_snapshots(3)
  assert rt.log == [("arm", 2, 3, "crash")]
  inj.fire_due()
  assert rt.log[-1] == ("kill", 0) and inj.next_time() == 0.5
  clock[0] = 0.6
  inj.fire_due()
  assert rt.log[-1] == ("kill", 1) and inj.next_time() is None
  for s in (0, 1):
    inj.on_snapshot(s)
  assert rt.log[-1] == ("kill", 1)                       # stage 2 has no snapshot yet
  inj.on_snapshot(2)
  assert rt.log[-1] == ("stall", 2, 1.0)
  inj.on_recovery()
  inj.on_recovery()
  assert rt.log.count(("kill", 1)) == 2                  # the timed one and the during-recovery one
  assert inj.failed_at("token", [1], rt, detected=9.0) == 0.6
  assert inj.failed_at("token", [1], rt, detected=9.0) == 9.0   # taken by the first recovery
