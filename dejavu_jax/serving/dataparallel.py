"""Data-parallel pipelines: R replicas of one serving shape behind one router.

`DataParallelEngine` owns R `PipelineEngine`s (serving/engine.py, unchanged), each a whole
replica of the configured shape (a D-stage colocated pipeline, or a prompt + token pipeline
pair) on its own devices: on the local runtime replica r takes devices [r*n, (r+1)*n) of this
process, n = one replica's stages x tensor; on Ray every replica is its own set of actor
processes. This is the planner's "colocated D x R" baseline (dejavu_jax/planner.py) served for
real, e.g. `ServeConfig(num_stages=2, data_parallel=2)` on 4 devices.

How it serves: every replica runs its own engine loop in online mode (serving/online.py), on its
own thread, with its own scheduler, controller, watchdog and recovery strategy; the router
submits each request, when it arrives, to the replica its policy picks among the replicas whose
loop is running (`ROUTERS`: `least_loaded`, fewest outstanding requests then fewest outstanding
tokens, the default; `round_robin`; or any object with `name` and `choose(loads)`). So a failure
in one replica (a killed stage, its detection and recovery) is handled inside that replica's
loop while the others keep serving: nothing is shared between replicas but the router. A
replica whose loop stops for good (an unrecoverable error, a hang past `step_timeout_s`) leaves
routing, and `serve` resubmits its unfinished requests to the live replicas (from scratch: the
tokens it had generated count as recomputed; under greedy decoding they come out the same).

`serve(requests, failures)` replays a workload (each request submitted at its arrival time);
`failures` is a list of `FailureSpec` for replica 0, or {replica: [FailureSpec, ...]}.
`start(failures)` / `submit(prompt_ids, max_new_tokens)` / `kill(replica, stage)` / `stop()` are
the online mode. `submit` returns a `RoutedHandle`: the caller's one stream of the request across
its attempts. When the replica serving it stops for good, a router thread resubmits the request
(from scratch) to a live replica and the handle follows the new attempt: the tokens it regenerates
over what was already streamed are checked equal to them and not streamed again (under greedy
decoding they are the same; a mismatch ends the request in "error" saying where it differs, never
a changed stream), the rest streams on. Only when no replica is left does the request end in
"error", naming the replicas' errors. The started run (`engine.online`) is what the OpenAI server
serves (server/app.py): it submits, kills a replica's stage, and reads the replicas' counts. The
result (`DataParallelResult`) merges the replicas' records on one
clock (the router's), with `replica_of` (request id -> the replica that served it), every
recovery tagged with its `replica`, the merged vLLM-named summary, and per replica its counts
(`summary["replicas"]`) and its own `ServeResult` (`replica_results`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import types
from typing import Callable, Mapping, Sequence

import jax

from dejavu_jax import metrics as metrics_lib
from dejavu_jax import runtime as runtime_lib
from dejavu_jax.config import ROUTING_POLICIES, ModelConfig, ServeConfig, ServeConfigError
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.serving import admission
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.serving.online import RequestHandle
from dejavu_jax.serving.result import EngineError, EngineTimeout, ServeResult
from dejavu_jax.workload import Request

log = logging.getLogger("dejavu_jax.dataparallel")

# ---- routing ----
@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
  """What a router sees of one live replica when a request arrives."""
  replica: int
  requests: int     # requests routed there and not finished
  tokens: int       # their work left: tokens still to generate, + prompts not yet prefilled


class LeastLoaded:
  """Fewest outstanding requests, then fewest outstanding tokens, then the lowest index."""
  name = "least_loaded"

  def choose(self, loads: Sequence[ReplicaLoad]) -> int:
    return min(loads, key=lambda x: (x.requests, x.tokens, x.replica)).replica


class RoundRobin:
  """The live replicas in turn (a replica that left routing is skipped)."""
  name = "round_robin"

  def __init__(self):
    self._last = -1

  def choose(self, loads: Sequence[ReplicaLoad]) -> int:
    live = sorted(x.replica for x in loads)
    nxt = next((r for r in live if r > self._last), live[0])
    self._last = nxt
    return nxt


ROUTERS: dict[str, Callable[[], object]] = {"least_loaded": LeastLoaded,
                                            "round_robin": RoundRobin}
assert tuple(ROUTERS) == ROUTING_POLICIES, "config.ROUTING_POLICIES names the routers"


def make_router(policy):
  """A router from its name (`ROUTERS`), or `policy` itself when it has `choose`."""
  if hasattr(policy, "choose"):
    return policy
  if policy not in ROUTERS:
    raise ServeConfigError("routing", f"unknown routing policy {policy!r}; expected one of "
                                      f"{list(ROUTERS)} or an object with choose(loads)")
  return ROUTERS[policy]()


def devices_per_replica(serve: ServeConfig) -> int:
  """Devices one replica takes on the local runtime: its stages (prompt + token when
  disaggregated) times `tensor`."""
  d = serve.disagg
  stages = (d.prompt_stages + d.token_stages) if (d.prompt_stages or d.token_stages) else \
      serve.topology.num_stages
  return stages * serve.topology.tensor


def check_devices(serve: ServeConfig, num_devices: int) -> None:
  """Raises a `ServeConfigError` on `data_parallel` naming the numbers when R replicas do not
  fit `num_devices` (local runtime; Ray actors bring their own devices)."""
  r, per = serve.topology.data_parallel, devices_per_replica(serve)
  if r * per > num_devices:
    d = serve.disagg
    shape = (f"{d.prompt_stages} prompt + {d.token_stages} token stages"
             if d.prompt_stages or d.token_stages else f"{serve.topology.num_stages} stages")
    raise ServeConfigError("data_parallel", f"{r} replicas x {per} devices ({shape} x tensor "
                                            f"{serve.topology.tensor}) need {r * per} devices; "
                                            f"this process has {num_devices}")


# ---- one data-parallel serve ----
@dataclasses.dataclass
class _Entry:
  request: Request        # the request as the caller numbered it (global id, router clock)
  replica: int
  handle: object          # the replica's online RequestHandle (the current attempt)
  attempts: list = dataclasses.field(default_factory=list)   # (replica, local id) per submit
  outer: "RoutedHandle | None" = None   # online mode: the caller's handle across attempts


class RoutedHandle(RequestHandle):
  """An online request of the data-parallel engine: one token stream across its attempts (module
  doc). Iterate it, `wait`, `cancel` as a replica's `RequestHandle`; `request_id` is the router's
  number, `replica` the replica of the current attempt, `attempts` how many were made."""

  def __init__(self, run: "_Run", request_id: int, prompt_len: int, max_new_tokens: int):
    super().__init__(None, request_id, prompt_len, max_new_tokens)
    self._run = run
    self.inner: RequestHandle | None = None
    self.replica: int | None = None
    self.attempts = 0
    self.replayed = 0     # regenerated tokens checked equal to ones already streamed
    self._seen = 0        # tokens of the current attempt seen

  def cancel(self) -> None:
    inner = self.inner
    if self.done:
      return
    if inner is not None and not inner.done:
      inner.cancel()
    else:   # between two attempts: the router will not resubmit it
      self._set("cancelled", "cancelled by the client")

  def _attach(self, inner: RequestHandle, replica: int) -> None:
    with self._cv:
      self.inner, self.replica, self._seen = inner, replica, 0
      self.attempts += 1
    inner.subscribe(lambda kind, v: self._on(inner, kind, v))

  def _on(self, inner: RequestHandle, kind: str, v) -> None:
    """An event of an attempt (on its replica's loop thread; must not block)."""
    if inner is not self.inner or self.done:
      return   # an attempt that was replaced
    if kind == "tokens":
      new = []
      with self._cv:
        for t in v:
          i, self._seen = self._seen, self._seen + 1
          if i >= len(self.tokens):
            new.append(t)
          elif self.tokens[i] != t:
            self._diverged(inner, i, t)
            return
          else:
            self.replayed += 1
      if new:
        self._emit(new)
    elif v == "running":
      if self.status == "queued":
        self._set("running")
    elif v in ("finished", "cancelled") or (
        v == "rejected" and "not serving" not in (inner.reason or "")):
      self._set(v, inner.reason)
    else:   # its replica stopped for good: the router resubmits it
      self._run.wake.set()

  def _diverged(self, inner: RequestHandle, i: int, t: int) -> None:
    msg = (f"request {self.request_id}: rerouted to replica {self.replica}, it regenerated "
           f"token {t} at position {i} where {self.tokens[i]} was already streamed (a rerouted "
           "request is generated again from scratch: only greedy decoding reproduces it)")
    log.error(msg)
    self._run.divergences += 1
    self._set("error", msg)
    inner.cancel()


class _Run:
  """One serve (or one online run) across the replicas: their online loops, the router's clock
  and the request table. Thread-safe: submissions come from any thread. Online (`online=True`) a
  router thread resubmits the requests of a replica that stopped for good; `running`, `error`,
  `submit`, `kill`, `call_each` and `counts` are what the OpenAI server uses of it."""

  def __init__(self, engine: "DataParallelEngine", failures: Mapping[int, Sequence[FailureSpec]],
               online: bool = False):
    self.engine, self.router = engine, engine.router
    self.wake = threading.Event()
    self.lock = threading.RLock()
    self.entries: dict[int, _Entry] = {}
    self.active: list[set] = [set() for _ in engine.replicas]   # request ids not yet done
    self.local: list[dict] = [{} for _ in engine.replicas]      # local id -> request id
    self.rejected: dict = {}
    self.rerouted = 0
    self.divergences = 0
    self.next_id = 0
    self.closing = False
    self.t0 = time.perf_counter()
    self.loops = []
    try:
      for r, eng in enumerate(engine.replicas):
        self.loops.append(eng.start(failures.get(r, ())))
    except Exception:
      for loop in self.loops:
        loop.stop(drain=False, timeout=60)
      raise
    self._router_thread = None
    if online:
      self._router_thread = threading.Thread(target=self._route_loop, name="dejavu-dp-router",
                                             daemon=True)
      self._router_thread.start()

  def now(self) -> float:
    return time.perf_counter() - self.t0

  def live(self) -> list[int]:
    return [r for r, loop in enumerate(self.loops) if loop.running]

  # ---- what a server reads of one engine's online loop ----
  @property
  def running(self) -> bool:
    return not self.closing and bool(self.live())

  @property
  def error(self) -> str | None:
    if self.running:
      return None
    return "; ".join(self.errors()) or "stopped"

  def submit(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RequestHandle:
    return self.engine.submit(prompt_ids, max_new_tokens)

  def kill(self, stage: int, replica: int = 0) -> None:
    """Crashes `stage` of `replica` now (its online loop's kill: a SIGKILL on Ray)."""
    if isinstance(replica, bool) or not isinstance(replica, int) or \
        not 0 <= replica < len(self.loops):
      raise ValueError(f"replica must be an integer in 0..{len(self.loops) - 1}, got {replica!r}")
    self.loops[replica].kill(stage)

  def call_each(self, fn: Callable, timeout: float | None = 30.0) -> list:
    """fn(engine, state) on every replica's loop thread (online.py `call`); the results."""
    return [loop.call(fn, timeout) for loop in self.loops]

  def where(self, request_id: int) -> tuple[int, int] | None:
    """(replica, local id) of the request's current attempt, or None when it is not known."""
    with self.lock:
      e = self.entries.get(request_id)
      return None if e is None or not e.attempts else e.attempts[-1]

  # ---- routing ----
  def loads(self) -> list[ReplicaLoad]:
    out = []
    for r in self.live():
      tokens = 0
      for rid in list(self.active[r]):
        h = self.entries[rid].handle
        if h.done:
          self.active[r].discard(rid)
          continue
        made = len(h.tokens)
        tokens += h.max_new_tokens - made + (h.prompt_len if made == 0 else 0)
      out.append(ReplicaLoad(r, len(self.active[r]), tokens))
    return out

  def route(self, req: Request, exclude: int | None = None,
            outer: RoutedHandle | None = None) -> _Entry:
    """Submits `req` to the replica the router picks (never `exclude`); its entry. `outer` (a
    new online request) follows each of its attempts."""
    with self.lock:
      loads = [x for x in self.loads() if x.replica != exclude]
      if not loads:
        raise RuntimeError(f"no replica is serving (every replica's loop stopped: "
                           f"{'; '.join(self.errors()) or 'stopped'}); request "
                           f"{req.request_id} is not served")
      r = self.router.choose(loads)
      if r not in {x.replica for x in loads}:
        raise ValueError(f"router {self.router.name!r} chose replica {r!r}, not one of the live "
                         f"replicas {[x.replica for x in loads]}")
      h = self.loops[r].submit(req.prompt, req.max_new_tokens)
      h.subscribe(lambda kind, _v: self.wake.set() if kind == "status" else None)
      entry = self.entries.get(req.request_id)
      if entry is None:
        entry = self.entries[req.request_id] = _Entry(req, r, h, outer=outer)
      else:
        entry.replica, entry.handle = r, h
      entry.attempts.append((r, h.request_id))
      self.local[r][h.request_id] = req.request_id
      self.active[r].add(req.request_id)
      if entry.outer is not None:
        entry.outer._attach(h, r)   # pylint: disable=protected-access
      return entry

  def service(self) -> None:
    """Requests whose replica stopped for good go to a live replica; refusals are recorded.
    Replay: no live replica left raises (the serve's error). Online: such a request ends in
    "error" naming the replicas' errors."""
    with self.lock:
      for rid, e in list(self.entries.items()):
        h = e.handle
        if rid in self.rejected or h.status not in ("error", "rejected"):
          continue
        if e.outer is not None and e.outer.done:
          continue   # cancelled, or ended on a divergence
        if h.status == "rejected" and "not serving" not in (h.reason or ""):
          self.rejected[rid] = f"request {rid}: {h.reason} (replica {e.replica})"
          continue
        self.active[e.replica].discard(rid)
        if e.outer is not None and not [r for r in self.live() if r != e.replica]:
          why = (f"request {rid}: no replica is left to serve it (replica {e.replica} stopped: "
                 f"{h.reason}; {'; '.join(self.errors()) or 'every loop stopped'})")
          e.outer._set("error", why)   # pylint: disable=protected-access
          continue
        self.rerouted += 1
        log.warning("request %d: replica %d stopped (%s); resubmitted from scratch", rid,
                    e.replica, h.reason)
        self.route(e.request, exclude=e.replica)

  def _route_loop(self) -> None:
    while not self.closing:
      self.wake.wait(0.05)
      self.wake.clear()
      try:
        self.service()
      except Exception:  # pylint: disable=broad-except
        log.exception("the data-parallel router failed")

  def close_router(self) -> None:
    self.closing = True
    self.wake.set()
    if self._router_thread is not None:
      self._router_thread.join(30)

  def unfinished(self) -> int:
    """Requests neither finished, cancelled nor refused (one whose replica stopped counts until
    `service` routes it again; online, one that ended in "error" counts)."""
    with self.lock:
      return sum(1 for rid, e in self.entries.items() if rid not in self.rejected and
                 (e.outer or e.handle).status not in ("finished", "cancelled"))

  def pending(self) -> int:
    """Online: requests whose handle has not ended yet."""
    with self.lock:
      return sum(1 for e in self.entries.values() if e.outer is not None and not e.outer.done)

  def finished(self) -> int:
    with self.lock:
      return sum(1 for e in self.entries.values() if e.handle.status == "finished")

  def errors(self) -> list[str]:
    return [f"replica {r}: {loop.error}" for r, loop in enumerate(self.loops) if loop.error]


class DataParallelResult(ServeResult):
  """A `ServeResult` of R replicas: records on the router's clock, and per replica its part."""

  def __init__(self, *args, replica_of: dict | None = None,
               replica_results: list | None = None, **kw):
    super().__init__(*args, **kw)
    self.replica_of = replica_of or {}             # request id -> the replica that served it
    self.replica_results = replica_results or []   # each replica's own ServeResult


# Summary entries of a replica that add up across replicas (the rest: equal, or listed).
_SUMMED = ("rejected_queue_full", "dropped_events", "paced_overruns", "snapshot_errors",
           "failures")


class DataParallelEngine:
  """R replicas of a serving shape behind one router (module doc); a context manager."""

  def __init__(self, cfg: ModelConfig, params, serve: ServeConfig, cost_model=None,
               devices: Sequence | None = None, router=None, **engine_kw):
    self.cfg, self.serve_cfg = cfg, serve
    self.router = make_router(serve.topology.routing if router is None else router)
    r = serve.topology.data_parallel
    one = serve.replace(data_parallel=1)
    if runtime_lib.in_process(serve):
      devices = jax.devices() if devices is None else list(devices)
      check_devices(serve, len(devices))
      per = devices_per_replica(serve)
      slices = [devices[i * per:(i + 1) * per] for i in range(r)]
    else:   # Ray: every replica's actors bring their own devices
      slices = [devices] * r
    self.replicas: list[PipelineEngine] = []
    self._run: _Run | None = None   # before the replicas: close() after a failed build reads it
    try:
      for i in range(r):
        self.replicas.append(PipelineEngine(cfg, params, one, cost_model=cost_model,
                                            devices=slices[i], **engine_kw))
    except BaseException:
      self.close()
      raise

  # What a caller of one engine reads (every replica has the same shape).
  @property
  def plan(self):
    return self.replicas[0].plan

  @property
  def prompt_path(self):
    return self.replicas[0].prompt_path

  @property
  def microbatch_size(self) -> int:
    return self.replicas[0].microbatch_size

  @property
  def swap_choice(self):
    return self.replicas[0].swap_choice

  @property
  def online(self):
    return self._run

  def validate(self, request) -> str | None:
    return self.replicas[0].validate(request)

  def close(self) -> None:
    if self._run is not None:
      self.stop(drain=False, timeout=60)
    for eng in self.replicas:
      eng.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def set_recovery(self, recovery: str) -> None:
    """Every replica's strategy (serving/engine.py `set_recovery`: no recompile)."""
    for eng in self.replicas:
      eng.set_recovery(recovery)
    self.serve_cfg = self.serve_cfg.replace(recovery=recovery)

  def warmup(self, progress=None) -> None:
    """Compiles every replica's buckets (each replica has its own devices and programs)."""
    for eng in self.replicas:
      eng.warmup(progress)

  def worker_stats(self) -> list:
    return [w for eng in self.replicas for w in eng.worker_stats()]

  def report(self, result=None) -> list[str]:
    """Each replica's runtime report (killed processes, recovery timelines), prefixed with it."""
    lines = []
    for r, eng in enumerate(self.replicas):
      part = None
      if result is not None:
        of = getattr(result, "replica_of", {})
        part = types.SimpleNamespace(
            recoveries=[e for e in result.recoveries if e.replica == r],
            records=[x for x in result.records if of.get(x.request_id) == r])
      lines += [f"replica {r}: {x}" for x in eng.report(part)]
    return lines

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """All prompts arrive at once (routed across the replicas); tokens per prompt, in order."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
      raise ValueError(f"prompts must be a sequence of prompts, got {type(prompts).__name__}")
    result = self.serve([Request(i, 0.0, p, max_new_tokens) for i, p in enumerate(prompts)])
    if result.rejected:
      raise ValueError("; ".join(result.rejected.values()))
    toks = result.tokens()
    return [toks[i] for i in range(len(prompts))]

  def _failures(self, failures) -> dict[int, list[FailureSpec]]:
    """{replica: specs}; a plain sequence is replica 0's. Checked against each replica's stages."""
    if isinstance(failures, Mapping):
      out = {}
      for r, specs in failures.items():
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(self.replicas):
          raise ValueError(f"failure in replica {r!r}, but there are replicas "
                           f"0..{len(self.replicas) - 1}")
        out[r] = list(specs)
    else:
      out = {0: list(failures)} if failures else {}
    for r, specs in out.items():
      self.replicas[r].prompt_path.check_failures(self.replicas[r], specs)
    return out

  # ---- online mode ----
  def start(self, failures=()) -> _Run:
    """Every replica's online loop (serving/online.py) behind the router; the run (also
    `engine.online`)."""
    if self._run is not None:
      raise RuntimeError("the engine is already serving online")
    self._run = _Run(self, self._failures(failures), online=True)
    return self._run

  def submit(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RequestHandle:
    """Routes a request to a live replica; its `RoutedHandle` (module doc: it outlives the
    replica's failure). Its `request_id` numbers the requests in the order they were submitted
    here, as `stop()`'s result does (`replica_of` saying where each was served)."""
    run = self._run
    if run is None:
      raise RuntimeError("the engine is not serving online; call engine.start() first")
    with run.lock:
      rid = run.next_id
      run.next_id += 1
    req = Request(rid, run.now(), prompt_ids, max_new_tokens)
    n = len(prompt_ids) if hasattr(prompt_ids, "__len__") else 0
    reason = self.validate(req)
    if reason is None and not run.running:
      reason = (f"request {rid}: the engine is not serving "
                f"({'; '.join(run.errors()) or 'stopped'})")
    if reason is not None:   # the replica would refuse it too: refuse it here, by its id
      h = RequestHandle(None, rid, n, max_new_tokens)
      h._set("rejected", reason)   # pylint: disable=protected-access
      with run.lock:
        run.rejected[rid] = reason
      return h
    outer = RoutedHandle(run, rid, n, int(max_new_tokens))
    req = dataclasses.replace(req, prompt=tuple(int(t) for t in prompt_ids),
                              max_new_tokens=int(max_new_tokens))
    try:
      run.route(req, outer=outer)
    except RuntimeError as e:   # every replica stopped meanwhile
      outer._set("rejected", f"request {rid}: the engine is not serving ({e})")   # pylint: disable=protected-access
      with run.lock:
        run.rejected[rid] = outer.reason
    return outer

  def kill(self, replica: int, stage: int) -> None:
    """Crashes `stage` of `replica` now (its online loop's kill: a SIGKILL on Ray)."""
    if self._run is None:
      raise RuntimeError("the engine is not serving online; call engine.start() first")
    self._run.kill(stage, replica)

  def stop(self, drain: bool = True, timeout: float | None = None) -> DataParallelResult | None:
    """Stops serving: with `drain`, first waits (up to `timeout`) until every request submitted
    ended, rerouting those of a replica that stops meanwhile; then every replica's loop. The
    merged result of the run."""
    run = self._run
    if run is None:
      return None
    if drain:
      deadline = None if timeout is None else time.monotonic() + timeout
      while run.pending() and run.live() and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.02)
    run.close_router()
    self._run = None
    results = [loop.stop(drain, timeout) for loop in run.loops]
    with run.lock:   # attempts that ended under a stopped router end their handles
      for e in run.entries.values():
        if e.outer is not None and not e.outer.done:
          h = e.handle
          e.outer._set(h.status if h.done and h.status != "error" else "error",   # pylint: disable=protected-access
                       h.reason if h.done else "the engine stopped")
    # As in replay, a replica that stopped is an error of the run only if a request was not served.
    return self._merge(run, results, [])

  # ---- replay ----
  def serve(self, requests: Sequence[Request], progress: Callable[[int, int], None] | None = None,
            failures=(), raise_on_error: bool | None = None) -> DataParallelResult:
    """Serves an open-loop workload: each request is routed when it arrives (module doc).
    `failures`: FailureSpecs for replica 0, or {replica: [FailureSpec]}."""
    if self._run is not None:
      raise RuntimeError("the engine is serving online (engine.start()); stop() it before serve()")
    rejected: dict = {}
    per_replica = self._failures(failures)
    reqs = admission.admissible(self.validate, requests, rejected)
    run = self._run = _Run(self, per_replica)
    run.rejected.update(rejected)
    error = cause = None
    try:
      i = 0
      while i < len(reqs) or run.unfinished():
        now = run.now()
        while i < len(reqs) and reqs[i].arrival <= now:
          run.route(reqs[i])
          i += 1
        run.service()
        if progress:
          progress(run.finished(), len(reqs))
        wait = 0.05 if i >= len(reqs) else max(0.0, min(0.05, reqs[i].arrival - run.now()))
        run.wake.wait(wait)
        run.wake.clear()
    except Exception as e:  # pylint: disable=broad-except
      error, cause = f"{type(e).__name__}: {e}", e
    self._run = None
    results = [loop.stop(drain=error is None, timeout=120) for loop in run.loops]
    result = self._merge(run, results, [error] if error else [])
    raise_on_error = (self.serve_cfg.admission.raise_on_error if raise_on_error is None
                      else raise_on_error)
    if result.error is not None and raise_on_error:
      kind = EngineTimeout if isinstance(cause, TimeoutError) else EngineError
      done = sum(r.done for r in result.records)
      raise kind(f"serving failed with {done} of {len(result.records)} admitted requests "
                 f"finished (see .result): {result.error}", result) from cause
    return result

  # ---- the merged result ----
  def _merge(self, run: _Run, results: list, errors: list) -> DataParallelResult:
    """The replicas' results on the router's clock (module doc)."""
    wall = run.now()
    records, replica_of, recoveries, probes, busy = [], {}, [], [], []
    served = {rid: e.replica for rid, e in run.entries.items()}
    rows = []
    for r, res in enumerate(results):
      if res is None:
        rows.append({"replica": r, "requests": 0, "error": "no result (the loop did not stop)"})
        continue
      off = run.loops[r].st.t0 - run.t0
      shift = lambda t, o=off: None if t is None else t + o  # noqa: E731
      mine = []
      for rec in res.records:
        rid = run.local[r].get(rec.request_id)
        if rid is None:
          continue
        if served[rid] != r:   # an attempt on a replica that stopped: redone elsewhere
          continue
        redone = sum(len(_tokens_of(results, run, a)) for a in run.entries[rid].attempts[:-1])
        mine.append(dataclasses.replace(
            rec, request_id=rid, arrival=run.entries[rid].request.arrival,
            first_token=shift(rec.first_token), finish=shift(rec.finish),
            token_times=[t + off for t in rec.token_times],
            recomputed_tokens=rec.recomputed_tokens + redone))
        replica_of[rid] = r
      records += mine
      recoveries += [dataclasses.replace(ev, replica=r, failed_at=ev.failed_at + off,
                                         detected_at=ev.detected_at + off,
                                         recovered_at=ev.recovered_at + off)
                     for ev in res.recoveries]
      probes += [dataclasses.replace(p, request_id=run.local[r][p.request_id])
                 for p in res.cache_probes if served.get(run.local[r].get(p.request_id)) == r]
      busy += list(res.stage_busy_s)
      done = [x for x in mine if x.done]
      rows.append({"replica": r, "requests": len(mine), "completed": len(done),
                   "output_tokens": sum(x.output_len for x in done),
                   "failures": len(res.recoveries), "error": res.error})
    records.sort(key=lambda x: x.request_id)
    summary = metrics_lib.summarize(records, duration=wall)
    summary.update(_merged_extras([res.summary for res in results if res is not None],
                                  skip=set(summary)))
    summary.update(data_parallel=len(self.replicas), routing=self.router.name,
                   rejected=len(run.rejected), rerouted=run.rerouted, replicas=rows)
    if recoveries:
      summary["failures"] = len(recoveries)
      summary["mean_recovery_s"] = sum(e.recovery_s for e in recoveries) / len(recoveries)
    # A replica that stopped is an error of the run only if what it held was not served.
    unserved = run.unfinished()
    if errors:
      error = "; ".join(errors)
    elif unserved:
      error = "; ".join(run.errors()) or f"{unserved} request(s) not served"
    else:
      error = None
    if error is not None:
      summary["error"] = error
    if run.errors():
      summary["replica_errors"] = run.errors()
    return DataParallelResult(records, dict(run.rejected), summary, wall, busy, recoveries,
                              error, probes, replica_of=replica_of, replica_results=results)


def _tokens_of(results, run: _Run, attempt) -> list:
  r, local = attempt
  res = results[r]
  if res is None:
    return []
  return next((x.tokens for x in res.records if x.request_id == local), [])


def _merged_extras(summaries: list[dict], skip: set) -> dict:
  """The replicas' engine entries beyond the metrics (`skip`: the merged records' own): counts
  summed, the queue's depth its maximum, entries equal across replicas once, others listed per
  replica."""
  out = {}
  keys = [k for s in summaries for k in s if k not in skip]
  for k in dict.fromkeys(keys):
    vals = [s.get(k) for s in summaries]
    if k in _SUMMED:
      out[k] = sum(v or 0 for v in vals)
    elif k == "max_queue_depth":
      out[k] = max(v or 0 for v in vals)
    elif k in ("error", "rejected", "mean_recovery_s"):
      continue   # the router's own, below
    elif all(v == vals[0] for v in vals):
      out[k] = vals[0]
    else:
      out[k] = vals
  return out

