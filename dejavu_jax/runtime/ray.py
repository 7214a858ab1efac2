"""RayRuntime: a worker set's workers as Ray actor processes; a failure is a real SIGKILL.

Same `Runtime`/`Worker` interfaces as `runtime/local.py`, so the engine, scheduler, strategies
and controller do not change. The processes, threads and what waits on what:

1. The driver (the engine's process) holds one `RayWorker` handle per stage. Every `Worker`
   message returns at once (`submit`, `set_epoch`, `load_cache`, `free`, `resync`, ...; only
   `stats` and disaggregation's slot calls wait for an answer): with the default transport
   (shm) and the actor on the driver's node it goes on the actor's lane (ray_lane.py: a
   Unix-domain socket, ~40 us against ~1 ms for a Ray call here), in order; otherwise it is a
   Ray actor call. A `ReplicaSource` load is sent to the replica's holder, which ships the
   cache to the replacement itself.
2. Each stage is a `StageActor` (runtime/ray_actor.py) in its own process with its own JAX
   runtime and devices (one CPU device per actor here: `XLA_FLAGS`/`JAX_PLATFORMS` are set in
   the actor's environment before it imports JAX; `num_gpus` per actor on GPU nodes). Inside it
   runs the threads runtime's `LocalWorker`, unchanged: the worker thread (blocks on its FIFO
   inbox), the heartbeat thread, the replication tap's streamer thread, the snapshotter thread.
   The actor's default concurrency group (one thread) puts messages into the inbox in arrival
   order; the "io" group lands replicas from the predecessor (so a landing never waits behind
   queued steps); the "control" group answers the driver's long poll and `die`.
3. Activations go from actor s to actor s + 1 and replication writes to the successor directly,
   through the pipeline's transport (by default `shm`: replica writes to an actor on the same
   node through a reused shared-memory segment whose header goes on a lane, steps on the next
   actor's lane, everything to another node in the Ray call / object store; or
   `jax.experimental.transfer` under a watchdog; ray_actor.py). The driver never relays
   data; it only sends a stage-0 step and receives the last stage's tokens (greedy: the last
   stage samples, `Step.greedy`) or logits.
4. Events: an actor on the driver's node sends its events on the driver's lane (one reader
   thread per actor puts them into `events`, the engine's one channel); for the others, one
   driver thread (`_poll_loop`) keeps one `poll` call outstanding per live actor (each returns
   the actor's queued events as soon as there are any, or after a short timeout). Heartbeats
   are stamped with the driver's clock on arrival (hosts' clocks differ), and so are results in
   real mode. `lane_events` counts what came on lanes.
5. Failures: `kill` SIGKILLs the actor's pid (from the driver on the same host, or by the actor
   itself on another host); `arm` makes the actor SIGKILL itself after a number of steps. The
   death is detected by whichever comes first: heartbeat silence (the controller), Ray's
   actor-death notification (the outstanding `poll` fails), or the end of the actor's event
   lane with its process gone (a SIGKILLed process's sockets close when the kernel has torn
   down its memory, ~0.1 s here): `notified_dead`, which the engine merges into its detection,
   woken by a `DeathNotice` event. A stall is caught by the engine's progress watchdog.
6. `replace` configures a spare (an actor process started beside the pipeline, JAX already up:
   the paper's spare machine; `spares` of them, one by default, and a new one starts at once)
   or starts a new actor, and waits until it runs. A spare is kept warm (`_warm_spare`): it
   builds every stage's program and places every stage's weights (from the orbax checkpoint
   when the engine has one, else the copy put in the object store once at start) while it
   waits, and the live stages hand it each new step signature they run, which it traces and
   compiles at once; so taking a stage only loads state. Then every actor gets the new peer
   table; the engine restores caches by its strategy and asks the predecessor to `resync` the
   replica the dead actor held.
7. `close` resets the live actors (worker stopped, params, caches and replicas dropped) into a
   per-session pool that the next pipeline of the session configures instead of starting
   processes (seconds each here). Peer messages carry the pipeline's token, so a late message
   of a closed pipeline is void in a pooled actor. A session this runtime started lives until
   the process exits, so the pool outlives the engine (`set_recovery`). Every actor shares a
   persistent XLA compilation cache (`DEJAVU_RAY_COMPILE_CACHE`, "" to disable), so a
   replacement does not compile its steps again in the middle of a recovery.
8. Multi-host: `address` joins a running cluster (`ray start --head` / `ray start
   --address=...`); `placement` "pack" reserves a bundle per stage (the check that the cluster
   has room) and lets Ray place the actors, unbound, so they can be pooled; "spread" one per
   node (a STRICT_SPREAD placement group whose bundles the stages are bound to: they die with
   it at `close` and never come from the pool; spares and replacements are placed by Ray
   outside the group). A session this runtime starts has no dashboard, keeps Ray's token
   authentication and listens on 127.0.0.1 only: every Ray server (GCS, raylet, workers,
   agents) and the actors' transfer servers (`init_ray`, ray_session.py).
9. Swapping (`swapping=True`): each actor's worker runs `runtime/swapping.py`'s policy in its
   own process (host logs, two device buffers, the prefetch and swap-out threads), as the local
   runtime's does; replication taps and snapshots read its host logs there.
10. Disaggregation (`role`): a token runtime's actors run `runtime/disagg.py`'s `TokenWorker`
    (bounded `HostSlots` in the actor's memory), a prompt runtime's its `PromptWorker`. A prompt
    actor's sender thread puts each layer group's KV straight into the owning token actor
    (`put_layer`, the "slots" group, so never behind queued steps: the packet rides in the call,
    through the prompt node's object store when large), never through the driver; the driver
    tells the prompt actors the token actors' handles at start and after every replacement on
    either side (`_dependents`). With the shm transport and both actors on one node the packet
    goes through a shared-memory segment instead (ray_shm.py), the call carrying its header.
    `reserve_slot` and `load_prompt` wait for the token actor's
    answer: a reservation is in place before the prompt streams, and a load is in the inbox
    before the first decode step reaches a token stage s > 0 from actor s - 1 (no ordering
    between two callers). The prompt runtime's events travel on the token runtime's channel,
    wrapped (`FromPrompt`), as on the local runtime.

Why one module over 400 lines: the driver side of the Ray runtime (placement, spares, the event
poll, kills and reports, for every role) is one walk through its actors (above); the driver's
handle, the life cycle and the event thread share the lock and the dead-stage tables.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import signal
import threading
import time
import uuid

import jax
import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dejavu_jax.runtime.api import (DeathNotice, Heartbeat, ReplicaSource, Step, StepResult,
                                    WorkerOptions, WorkerStats, recovery_lines)
from dejavu_jax.runtime.disagg import TaggedEvents
from dejavu_jax.runtime import ray_shm
from dejavu_jax.runtime.ray_actor import CONCURRENCY_GROUPS, TRANSPORTS, ActorSpec, StageActor
from dejavu_jax.runtime.ray_lane import LaneClient, LaneError, LaneServer, process_gone
from dejavu_jax.runtime.ray_session import (actor_env, pool_put, pool_take,  # noqa: F401
                                            init_ray)

PLACEMENTS = {"pack": "PACK", "spread": "STRICT_SPREAD"}


class RayWorker:
  """The driver's handle on one stage's actor (the `Worker` interface)."""

  def __init__(self, rt: "RayRuntime", stage: int, worker_id: int, actor, info: dict):
    self.stage, self.worker_id, self.actor = stage, worker_id, actor
    self.pid, self.node_id, self.ip = info["pid"], info["node_id"], info["ip"]
    self.lane_address = info.get("lane")
    self._rt = rt
    self._last_stats = WorkerStats(stage, worker_id, True, 0, 0.0, 0, 0, [], 0)
    # The lane to the actor (ray_lane.py) when it runs on the driver's node and lanes are on:
    # every Worker message goes on it then, so they keep their order.
    self.lane = (LaneClient(self.lane_address, rt.rpc_timeout_s)
                 if rt.lanes is not None and self.lane_address and self.node_id == rt.node_id
                 else None)

  def _tell(self, name: str, *args) -> None:
    """A Worker message, on the lane or as a Ray call (lost either way if the actor died)."""
    if self.lane is not None and self.lane.send((name, args)):
      return
    getattr(self.actor, name).remote(*args)

  def submit(self, step: Step) -> None:
    self._tell("submit", step, self._rt.token)

  def set_epoch(self, epoch: int) -> None:
    self._tell("set_epoch", epoch)

  def load_cache(self, mb_id: int, source, epoch: int) -> None:
    if isinstance(source, ReplicaSource):   # the holder ships it to this actor itself
      self._rt.worker(source.holder).export_replica(self.stage, mb_id, source.step, self.stage,
                                                    epoch)
    else:
      self._tell("load_cache", mb_id, source, epoch)

  def export_replica(self, stage: int, mb_id: int, step: int, to: int, epoch: int) -> None:
    self._tell("export_replica", stage, mb_id, step, to, epoch)

  def free(self, mb_id: int) -> None:
    self._tell("free", mb_id)

  def resync(self) -> None:
    self._tell("resync")

  def _token_role(self, what: str) -> None:
    if self._rt.role != "token":
      raise NotImplementedError(f"stage {self.stage}'s worker has no host slots: {what} belong "
                                "to the token workers of a disaggregated deployment")

  def reserve_slot(self, mb_id: int) -> bool:
    """Answered by the actor before this returns, so the reservation is in place before the
    prompt actors stream anything for `mb_id`. A dead actor's slot is granted: the prompt it
    was for is redone after that token worker's recovery, as any prompt waiting there."""
    self._token_role("prompt slots")
    try:
      return ray.get(self.actor.reserve_slot.remote(mb_id, self._rt.token),
                     timeout=self._rt.rpc_timeout_s)
    except ray.exceptions.RayError:
      if self._rt.alive(self.stage) and self._rt.worker(self.stage) is self:
        raise
      return True

  def load_prompt(self, mb_id: int, epoch: int, start_at: float = 0.0,
                  load_s: float = 0.0) -> None:
    """Queued in the actor's inbox before this returns: the first decode step reaches a token
    stage s > 0 from stage s - 1's actor (another caller, no ordering with this one), and must
    find the load ahead of it, as in the local runtime's one inbox."""
    self._token_role("prompt loads")
    args = (mb_id, epoch, start_at, load_s, self._rt.token)
    if self.lane is not None:
      try:
        self.lane.call(("load_prompt", args))
        return
      except LaneError:
        pass   # no answer: the actor died (the Ray call below says so, or is lost)
    try:
      ray.get(self.actor.load_prompt.remote(*args), timeout=self._rt.rpc_timeout_s)
    except ray.exceptions.RayActorError:
      pass   # lost, as any message to a dead peer; the token side's recovery redoes it

  def slots_held(self) -> list[int]:
    """(Token role) the microbatches holding a host slot in the actor now."""
    return ray.get(self.actor.slots_held.remote(), timeout=30)

  def landed_log(self) -> list[tuple]:
    """(Token role) every prompt packet landed here: (mb_id, global layers, (prompt stage,
    prompt actor pid), channel "shm" | "object_store")."""
    return ray.get(self.actor.landed_log.remote(), timeout=30)

  @property
  def swap_events(self) -> list:
    """The swapping policy's event log inside the actor (runtime/swapping.py)."""
    return ray.get(self.actor.swap_events.remote(), timeout=30)

  def stats(self) -> WorkerStats:
    if self._rt.alive(self.stage) or self._rt.worker(self.stage) is not self:
      try:
        self._last_stats = ray.get(self.actor.stats.remote(), timeout=30)
        return self._last_stats
      except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass
    return dataclasses.replace(self._last_stats, alive=False)


class RayRuntime:
  """The workers of one pipeline as Ray actors (see module doc).

  Args:
    cfg, ranges, tensor, program: the model, the stages' layer ranges, devices per stage, and
      "model" | "fake" (each actor builds its stage program from these).
    params: the whole model's params (host), or None for the fake program.
    depth, microbatch_size, max_len, pace, heartbeat_s: as `LocalRuntime`.
    checkpoint: an orbax params checkpoint; replacement actors load their stage's subset from it.
    address, placement, transport, gpus_per_stage: where and how the actors run.
  """

  def __init__(self, cfg, ranges, tensor: int, program: str, params, depth: int,
               microbatch_size: int, max_len: int, pace=None, heartbeat_s: float = 1.0,
               checkpoint: str | None = None, address: str | None = None,
               placement: str = "pack", transport: str = "shm",
               gpus_per_stage: float = 0.0, rpc_timeout_s: float = 30.0, spares: int = 1,
               role: str = "pipeline", swapping: bool = False,
               kv_budget_bytes: int | None = None, host_slots: int = 0,
               token_runtime: "RayRuntime | None" = None, layerwise: bool = True):
    if placement not in PLACEMENTS:
      raise ValueError(f"unknown ray placement {placement!r}; expected one of {list(PLACEMENTS)}")
    if transport not in TRANSPORTS:
      raise ValueError(f"unknown ray transport {transport!r}; expected one of "
                       f"{list(TRANSPORTS)}")
    if heartbeat_s <= 0:
      raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
    self.cfg, self.ranges, self.tensor, self.program = cfg, tuple(ranges), tensor, program
    self.num_stages = len(self.ranges)
    self.depth, self.microbatch_size, self.max_len = depth, microbatch_size, max_len
    self.pace, self.heartbeat_s, self.checkpoint = pace, heartbeat_s, checkpoint
    self.placement, self.transport, self.gpus = placement, transport, gpus_per_stage
    self.rpc_timeout_s, self.num_spares = rpc_timeout_s, spares
    self.role, self.swapping, self.kv_budget_bytes = role, swapping, kv_budget_bytes
    self.host_slots, self.layerwise = host_slots, layerwise
    self._spares: list = []
    self.events: queue.Queue = queue.Queue()
    # Disaggregation: a prompt runtime's events travel on its token runtime's channel (wrapped,
    # as the local runtime's), and its actors stream into the token runtime's actors, whose
    # handles it is told of at start and whenever a token actor is replaced (`_dependents`).
    self._token_rt = token_runtime
    self._dependents: list[RayRuntime] = []
    if role == "prompt":
      if token_runtime is None:
        raise ValueError("a prompt runtime needs the token runtime its streams land in")
      self.events = TaggedEvents(token_runtime.events)
      token_runtime._dependents.append(self)  # pylint: disable=protected-access
    self.options = WorkerOptions()
    self.kills: list[dict] = []          # one record per SIGKILL (stage, pid, when, how)
    self._reported = 0
    self._landed_seen: dict[int, int] = {}   # token role: worker id -> packets reported
    self.dropped_events = 0
    self.lane_events = 0
    self._owns_ray = init_ray(address)
    self.node_id = None   # the driver's Ray node (at `start`)
    # Lanes (ray_lane.py) with the default transport: the workers' events come on this server,
    # and Worker messages / steps go on lanes, between processes of the driver's node.
    self.lanes = (LaneServer(self._on_lane_events, self._on_lane_closed, name="driver")
                  if transport == "shm" else None)
    self._params = params
    self._param_refs: dict[int, object] = {}
    self._workers: list[RayWorker | None] = [None] * self.num_stages
    self._dead: dict[int, float] = {}    # stage -> perf_counter when its current actor died
    self._notified: dict[int, float] = {}   # ... when Ray told us (the poll failed)
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._closed = threading.Event()
    self._pg = None
    self._bound: set = set()   # actors living in the placement group's bundles (never pooled)
    self._poller: threading.Thread | None = None
    self._actor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(StageActor)
    self.token = uuid.uuid4().hex
    self._pool_key = (self.tensor, self.gpus)

  # ---- life cycle ----
  def start(self, options: WorkerOptions) -> None:
    self.options = options
    self.node_id = ray.get_runtime_context().get_node_id()
    if self.placement == "spread":
      nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
      if nodes < self.num_stages:
        raise ValueError(f"placement 'spread' puts each of the {self.num_stages} stages on its "
                         f"own node, but the Ray cluster has {nodes} live node(s)")
    bundle = {"CPU": 1.0, **({"GPU": float(self.gpus)} if self.gpus else {})}
    self._pg = placement_group([bundle] * self.num_stages,
                               strategy=PLACEMENTS[self.placement])
    try:
      ray.get(self._pg.ready(), timeout=120)
    except ray.exceptions.GetTimeoutError:
      raise ValueError(f"the Ray cluster cannot place {self.num_stages} stage actors "
                       f"({bundle} each, placement {self.placement!r})") from None
    for s in range(self.num_stages):
      if self._params is not None and self.program != "fake":
        from dejavu_jax.models.decoder import stage_params  # pylint: disable=g-import-not-at-top
        sub = stage_params(self.cfg, self._params, *self.ranges[s])
        self._param_refs[s] = ray.put(jax.tree.map(np.asarray, sub))
      else:
        self._param_refs[s] = None
    self._params = None   # each stage's subset lives in the object store from here on
    pending = [self._create(s, checkpoint=None) for s in range(self.num_stages)]
    self._spares = [self._warm_spare() for _ in range(self.num_spares)]
    for s, (actor, ref, wid) in enumerate(pending):
      self._workers[s] = RayWorker(self, s, wid, actor, ray.get(ref))
    self._broadcast_peers()
    self._poller = threading.Thread(target=self._poll_loop, daemon=True, name="ray-events")
    self._poller.start()

  def _spec(self, s: int, checkpoint: str | None) -> ActorSpec:
    return ActorSpec(cfg=self.cfg, ranges=self.ranges, tensor=self.tensor, stage=s,
                     worker_id=next(self._ids), program=self.program, depth=self.depth,
                     microbatch_size=self.microbatch_size, max_len=self.max_len,
                     heartbeat_s=self.heartbeat_s, options=self.options,
                     transport=self.transport, checkpoint=checkpoint, pace=self.pace,
                     rpc_timeout_s=self.rpc_timeout_s, token=self.token, role=self.role,
                     swapping=self.swapping, kv_budget_bytes=self.kv_budget_bytes,
                     host_slots=self.host_slots, layerwise=self.layerwise,
                     token_splits=self._token_rt.ranges if self._token_rt else (),
                     driver_lane=self.lanes.address if self.lanes is not None else "",
                     driver_node=self.node_id)

  def _options(self, bundle: int | None) -> dict:
    opts = dict(num_cpus=0, num_gpus=self.gpus or 0, max_restarts=0, max_task_retries=0,
                runtime_env={"env_vars": actor_env(self.tensor, self.gpus)})
    if bundle is not None:
      opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
          self._pg, placement_group_bundle_index=bundle)
    return opts

  def _create(self, s: int, checkpoint: str | None):
    spec = self._spec(s, checkpoint)
    params = self._param_refs[s] if checkpoint is None else None
    pooled = pool_take(self._pool_key) if self.placement == "pack" else None
    if pooled is not None:   # a started process of an earlier pipeline, reset to no stage
      return pooled, pooled.configure.remote(spec, params), spec.worker_id
    # "spread" binds each stage to its own bundle (its node); "pack" only reserves the bundles
    # (the check that the cluster has room) and leaves the actor unbound: Ray destroys a bound
    # actor with its placement group at `close`, and an unbound one can be pooled.
    bound = self.placement != "pack"
    actor = self._actor_cls.options(**self._options(s if bound else None)).remote(spec, params)
    if bound:
      self._bound.add(actor)
    return actor, actor.info.remote(), spec.worker_id

  def _spare(self):
    """A started actor with no stage yet (JAX up), configured when a worker must be replaced:
    the spare machine of the paper. Spares sit outside the placement group."""
    return pool_take(self._pool_key) or self._actor_cls.options(**self._options(None)).remote()

  def _live_workers(self) -> dict:
    with self._lock:
      return {s: w for s, w in enumerate(self._workers) if w is not None and s not in self._dead}

  def _live_peers(self) -> dict:
    return {s: w.actor for s, w in self._live_workers().items()}

  def _warm_spare(self):
    """A spare made warm for every stage of this pipeline (runtime/ray_actor.py `prepare`): the
    stages' programs built and weights placed now, their steps traced as the live stages note
    them, so a replacement only loads state."""
    actor = self._spare()
    specs = {s: self._spec(s, self.checkpoint) for s in range(self.num_stages)}
    refs = {s: [r] for s, r in self._param_refs.items() if r is not None}
    actor.prepare.remote(self.token, specs, refs)
    return actor

  def wait_spares(self, timeout_s: float = 120.0) -> float:
    """Waits until every spare has run what it was sent so far (its stages built, weights
    placed, the step signatures noted by then traced): a failure after this finds a warm
    spare. Returns the seconds waited (benchmarks/runtime.py times recovery with a warm
    spare, as the paper's spare machines are)."""
    t0 = time.perf_counter()
    refs = [sp.warm_state.remote() for sp in self._spares]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    return time.perf_counter() - t0

  def _broadcast_peers(self) -> None:
    live = self._live_workers()
    peers = {s: w.actor for s, w in live.items()}
    nodes = {s: w.node_id for s, w in live.items()}   # shm's and the lanes' same-node check
    lanes = {s: w.lane_address for s, w in live.items()}
    refs = [a.set_peers.remote(peers, nodes, list(self._spares), lanes) for a in peers.values()]
    # Known before anything else is sent: the Worker messages after this go on lanes, which
    # do not queue behind this Ray call (an export to the replacement must find its handle).
    ray.wait(refs, num_returns=len(refs), timeout=self.rpc_timeout_s)
    for dep in self._dependents:   # a token runtime: its prompt runtimes' streams follow it
      dep.set_token_peers(peers, self.token, nodes)
    if self._token_rt is not None:   # a prompt runtime: its (new) actors learn the token actors
      tok = self._token_rt._live_workers()  # pylint: disable=protected-access
      self.set_token_peers({s: w.actor for s, w in tok.items()}, self._token_rt.token,
                           {s: w.node_id for s, w in tok.items()})

  def set_token_peers(self, peers: dict, token: str, nodes: dict | None = None) -> None:
    """(Prompt role) tells every live prompt actor the token actors its streams land in (and
    their nodes: on its own node a stream goes through shm), and waits until they know (a
    prefill streams only to the actors named here)."""
    refs = [a.set_token_peers.remote(peers, token, nodes) for a in self._live_peers().values()]
    try:
      ray.get(refs, timeout=self.rpc_timeout_s)
    except ray.exceptions.RayActorError:
      pass   # a prompt actor died meanwhile: its replacement is told when it starts

  def worker(self, stage: int) -> RayWorker:
    return self._workers[stage]

  def alive(self, stage: int) -> bool:
    return stage not in self._dead

  def notified_dead(self) -> list[int]:
    """Stages whose current actor Ray reported dead (detection without waiting for silence)."""
    with self._lock:
      return sorted(self._notified)

  def died_at(self, stage: int) -> float | None:
    return self._dead.get(stage)

  def pid(self, stage: int) -> int:
    return self._workers[stage].pid

  # ---- failures ----
  def kill(self, stage: int) -> None:
    """SIGKILLs the stage's actor process (a machine failure: nothing is said or flushed)."""
    w = self._workers[stage]
    with self._lock:
      if stage in self._dead:
        return
      self._dead[stage] = time.perf_counter()
    if w.ip == ray.util.get_node_ip_address():
      try:
        os.kill(w.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      how = "SIGKILL from the driver"
    else:
      w.actor.die.remote()
      how = "SIGKILL by the actor itself (another host)"
    self.kills.append({"stage": stage, "pid": w.pid, "worker_id": w.worker_id,
                       "node": w.node_id, "at": self._dead[stage], "how": how})

  def stall(self, stage: int, seconds: float) -> None:
    self._workers[stage]._tell("stall", seconds)  # pylint: disable=protected-access

  def arm(self, stage: int, after_steps: int, kind: str = "crash", stall_s: float = 0.0) -> None:
    self._workers[stage]._tell("arm", after_steps, kind, stall_s)  # pylint: disable=protected-access

  def disarm(self) -> None:
    for s, w in enumerate(self._workers):
      if self.alive(s):
        w._tell("disarm")  # pylint: disable=protected-access

  def inject_link_fault(self, stage: int, fails) -> None:
    """Makes stage `stage`'s replication transfers fail where `fails(write)` (None: heal);
    `fails` is shipped to the actor (it must pickle)."""
    self._workers[stage]._tell("set_link_fault", fails)  # pylint: disable=protected-access

  def replace(self, stage: int) -> RayWorker:
    """A fresh actor for `stage` in its placement bundle, running when this returns."""
    old = self._workers[stage]
    try:
      ray.kill(old.actor, no_restart=True)   # a stalled one still lives: make sure it is gone
    except Exception:  # pylint: disable=broad-except
      pass
    if self._spares:   # a started spare takes the stage; a new spare starts meanwhile
      actor = self._spares.pop(0)
      spec = self._spec(stage, self.checkpoint)
      ref, wid = actor.configure.remote(
          spec, [self._param_refs[stage]] if not self.checkpoint else None), spec.worker_id
      self._spares.append(self._warm_spare())
    else:
      actor, ref, wid = self._create(stage, checkpoint=self.checkpoint)
    info = ray.get(ref, timeout=300)
    w = RayWorker(self, stage, wid, actor, info)
    with self._lock:
      self._workers[stage] = w
      self._dead.pop(stage, None)
      self._notified.pop(stage, None)
    self._broadcast_peers()
    return w

  def close(self) -> None:
    if self._closed.is_set():
      return
    self._closed.set()
    if self._poller is not None:
      self._poller.join(timeout=5)
    if self.lanes is not None:
      self.lanes.close()
      for w in self._workers:
        if w is not None and w.lane is not None:
          w.lane.close()
    # Live actors are reset (worker stopped, state dropped) and pooled for the next pipeline of
    # this Ray session: a process start costs seconds here. Anything that does not reset dies.
    live = [w.actor for s, w in enumerate(self._workers)
            if w is not None and s not in self._dead] + self._spares
    resets = {a: a.reset.remote() for a in live if a not in self._bound}
    for actor in live:
      if actor in self._bound:   # it dies with the placement group below
        try:
          ray.kill(actor, no_restart=True)
        except Exception:  # pylint: disable=broad-except
          pass
    for actor, ref in resets.items():
      try:
        ray.get(ref, timeout=15)
        pool_put(self._pool_key, actor)
      except Exception:  # pylint: disable=broad-except
        try:
          ray.kill(actor, no_restart=True)
        except Exception:  # pylint: disable=broad-except
          pass
    if self._pg is not None:
      try:
        remove_placement_group(self._pg)
      except Exception:  # pylint: disable=broad-except
        pass
    # A sender SIGKILLed before its receiver's first landing leaves its shm segment's name.
    ray_shm.sweep([k["pid"] for k in self.kills])
    # A session this runtime started stays up until the process exits (Ray's exit hook shuts
    # it down): the next pipeline of this process (`set_recovery`, a strategy comparison)
    # configures the pooled actors instead of starting a session and its processes again.

  def report(self, result=None) -> list[str]:
    """The processes killed since the last report (pid, how), and with a `ServeResult` each
    recovery's timeline, for experiment logs."""
    kills, self._reported = self.kills[self._reported:], len(self.kills)
    side = "" if self.role == "pipeline" else f"{self.role} "   # disaggregation's two sides
    lines = [f"{side}stage {k['stage']}: pid {k['pid']} (worker {k['worker_id']}) killed by "
             f"{k['how']}" for k in kills]
    return lines + self._landed_lines() + recovery_lines(result)

  def _landed_lines(self) -> list[str]:
    """(Token role) the prompt packets each live token actor landed since the last report, by
    channel (shm: through the segment, on one node; object_store: in the call)."""
    if self.role != "token":
      return []
    lines = []
    for s, w in self._live_workers().items():
      try:
        log = w.landed_log()
      except ray.exceptions.RayError:
        continue
      seen = self._landed_seen.get(w.worker_id, 0)
      self._landed_seen[w.worker_id] = len(log)
      new = log[seen:] if len(log) >= seen else log
      by = {}
      for *_, channel in new:
        by[channel] = by.get(channel, 0) + 1
      if by:
        lines.append(f"token stage {s}: {len(new)} prompt packets landed (" + ", ".join(
            f"{n} over {c}" for c, n in sorted(by.items())) + ")")
    return lines

  def counters(self) -> dict:
    """Event batches lost to a failed poll that was not an actor's death (logged each time)."""
    return {"dropped_events": self.dropped_events}

  def vouches_alive(self, stage: int) -> bool:
    """Never: a silent actor may sit on a lost host; heartbeat silence decides."""
    del stage
    return False

  # ---- the event channel ----
  def _poll_loop(self) -> None:
    pending: dict = {}   # ObjectRef -> (stage, worker)
    while not self._closed.is_set():
      with self._lock:
        current = [(s, w) for s, w in enumerate(self._workers) if w is not None]
      polled = {id(w) for _, w in pending.values()}
      for s, w in current:
        if id(w) not in polled and s not in self._notified:
          pending[w.actor.poll.remote(0.2)] = (s, w)
      if not pending:
        time.sleep(0.01)
        continue
      ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.05)
      if ready:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
      for ref in ready:
        s, w = pending.pop(ref)
        try:
          evs = ray.get(ref)
        except ray.exceptions.RayActorError:
          self._notify_dead(s, w)   # Ray says so
          continue
        except Exception as e:  # pylint: disable=broad-except
          self.dropped_events += 1   # the actor lives, but this batch of its events is lost
          logging.warning("ray runtime: a poll of stage %d failed (%s: %s); its events are "
                          "lost", s, type(e).__name__, e)
          continue
        for ev in evs:
          self.events.put(self._stamp(ev))

  def _notify_dead(self, s: int, w: RayWorker) -> None:
    """Stage `s`'s actor `w` is known dead (Ray's notice, or its lane ended with its process):
    the engine's detection sees it at once (`notified_dead`), if `w` is still the stage's."""
    with self._lock:
      if self._workers[s] is w:
        now = time.perf_counter()
        if s not in self._dead:   # it died by itself (an armed failure)
          self._dead[s] = now
          self.kills.append({"stage": s, "pid": w.pid, "worker_id": w.worker_id,
                             "node": w.node_id, "at": now,
                             "how": "SIGKILL by the actor itself (armed failure)"})
        if s not in self._notified:
          self._notified[s] = now
          self.events.put(DeathNotice(s))   # the engine's loop may be waiting for an event

  def _on_lane_events(self, msg) -> None:
    kind, evs = msg
    if kind != "events":
      raise ValueError(f"the driver's lane carries events, not {kind!r}")
    with self._lock:   # one reader thread per actor
      self.lane_events += len(evs)
    for ev in evs:
      self.events.put(self._stamp(ev))

  def _on_lane_closed(self, pid: int) -> None:
    """An actor's event lane ended: if that actor is a current stage's and its process is
    gone, that is its death notice (its sockets close once the kernel has freed its memory,
    ~0.1 s after a SIGKILL here, without waiting for Ray's notice or the engine's next event)."""
    if self._closed.is_set():
      return
    with self._lock:
      hit = [(s, w) for s, w in enumerate(self._workers) if w is not None and w.pid == pid]
    for s, w in hit:
      if process_gone(pid):
        self._notify_dead(s, w)

  def _stamp(self, ev):
    if isinstance(ev, Heartbeat):
      return dataclasses.replace(ev, t=time.monotonic())
    if isinstance(ev, StepResult) and self.pace is None:
      return dataclasses.replace(ev, done_at=time.perf_counter())
    return ev


