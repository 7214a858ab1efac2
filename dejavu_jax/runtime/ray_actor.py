"""The inside of one Ray actor process: one stage's `LocalWorker` (or, with disaggregation, its
`TokenWorker` / `PromptWorker`, runtime/disagg.py), its transports, its outbox.

`runtime/ray.py` (the driver side) creates one `StageActor` per stage. The actor process imports
JAX itself (its own devices: one CPU device here, `num_gpus` GPUs on a GPU cluster), places its
stage's params, and runs the very `LocalWorker` the threads runtime runs (same step logic,
`CacheStore`, `ReplicationTap`, `Snapshotter`, heartbeat thread), against `_ActorRuntime`: the
runtime a worker sees, whose channels are Ray calls to the neighbouring actors instead of
in-process queues. So the two runtimes share every line of a worker's behaviour, swapping and disaggregation's
host slots and layer-wise prompt streams included: `_ActorRuntime.deliver` is the prompt
side's channel into a token actor's host slot (`send_prompt_packet`, actor to actor: through
the shm segment and `StageActor.put_layer_shm` on one node, else in the call, `put_layer`).

Transports (`TRANSPORTS`), chosen per pipeline; both carry activations (stage s -> s + 1) and
replication writes (stage s -> its successor), actor to actor, never through the driver:
  object_store   the payload (numpy) rides in the Ray call itself: small arguments inline,
                 large ones through the node's shared-memory object store (zero-copy reads on
                 one node).
  shm            the default: replica writes and prompt KV packets to an actor on the same
                 node go through a shared-memory segment the sender reuses per receiver
                 (`SharedMemoryTransport`: one copy in, the replica log's / host slot's write
                 out; measured fastest here, benchmarks/transport.py). On one node the
                 pipeline's hot messages go on lanes (ray_lane.py, `_on_lane`): steps to the
                 next stage, the replica landings' headers, Worker messages from the driver
                 and the events back to it; anything to another node as object_store.
  jax_transfer   `jax.experimental.transfer`: the sender offers device buffers on its transfer
                 server (`await_pull`) and sends only a ticket in the Ray call; the receiver
                 pulls. A pull of an id nobody offers hangs, so every pull runs under a
                 watchdog (`TransportTimeout`). Offers a dead receiver never pulls stay on the
                 sender's server until the sender dies.

Warm spares: a spare actor `prepare`s every stage of its pipeline (programs built, weights
placed) and replays on zeros each step signature the live stages note (`StepLog`: kind, input
shape, positions, cache size; the live actor pushes each new one to the spares, and all of them
to a spare it has not told yet), so the steps are traced and compiled before it takes a stage;
`configure` then only swaps in the stage's warm program and weights.

Why one module over 400 lines: it is the whole inside of an actor process, and its parts (the
actor's methods by concurrency group, the runtime its worker sees in each role, the transports'
receiving ends, the warm spare's preparation) are one unit; its helpers live beside it
(ray_shm.py, ray_warm.py).

A crash is the process dying: an armed failure (`arm`) SIGKILLs the actor's own pid, and the
driver's `kill` SIGKILLs it from outside; nothing is reported either way.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import os
import queue
import random
import signal
import threading
import time

import numpy as np
import ray

from dejavu_jax.runtime.replication import ReplicaWrite
from dejavu_jax.runtime.api import Step, StepError, StepResult, WorkerOptions, ring_holder
from dejavu_jax.runtime.local import LocalWorker, PeerDead
from dejavu_jax.runtime.ray_lane import LaneClient, LaneServer
from dejavu_jax.runtime.ray_shm import SharedMemoryTransport, ShmReader
from dejavu_jax.runtime.ray_warm import StepLog, replay


class TransportTimeout(TimeoutError):
  """A transfer did not complete within the transport's watchdog timeout."""


@dataclasses.dataclass(frozen=True)
class ActorSpec:
  """Everything an actor needs to build its worker (plain data, shipped to the actor)."""
  cfg: object                    # ModelConfig
  ranges: tuple                  # the pipeline's layer ranges
  tensor: int
  stage: int
  worker_id: int
  program: str                   # "model" | "fake"
  depth: int
  microbatch_size: int
  max_len: int
  heartbeat_s: float
  options: WorkerOptions
  transport: str = "object_store"
  checkpoint: str | None = None  # load this stage's weights from here (else from the ref)
  pace: object = None
  rpc_timeout_s: float = 30.0
  token: str = ""                # the pipeline's id: peer messages of another pipeline are void
  role: str = "pipeline"         # "pipeline" | disaggregation's "token" and "prompt" workers
  swapping: bool = False         # the worker's caches under the swapping policy (swapping.py)
  kv_budget_bytes: int | None = None   # swapping: the device KV budget (staging headroom)
  host_slots: int = 0            # token role: host slots for prompt caches streamed in
  token_splits: tuple = ()       # prompt role: the token pipeline's layer ranges
  layerwise: bool = True         # prompt role: stream each layer group as it is computed
  layer_group: int = 1
  driver_lane: str = ""          # the driver's event lane (ray_lane.py), used on its node only
  driver_node: str = ""          # the driver's Ray node id


class _Outbox(queue.Queue):
  """The worker's event channel: events leave the process as plain host data, on the driver's
  lane when the driver is on this node (`lane`), else queued for the driver's long poll."""

  lane: LaneClient | None = None

  def put(self, item, block=True, timeout=None):
    if isinstance(item, StepResult):
      item = dataclasses.replace(
          item, logits=None if item.logits is None else np.asarray(item.logits),
          tokens=None if item.tokens is None else np.asarray(item.tokens))
    elif isinstance(item, StepError):
      item = dataclasses.replace(item, error=_portable(item.error))
    lane = self.lane
    if lane is not None and lane.send(("events", [item])):
      return
    super().put(item, block, timeout)


def _portable(e: BaseException) -> BaseException:
  try:
    import pickle  # pylint: disable=g-import-not-at-top
    pickle.dumps(e)
    return e
  except Exception:  # pylint: disable=broad-except
    return RuntimeError(f"{type(e).__name__}: {e}")


class ObjectStoreTransport:
  name = "object_store"

  def __init__(self, device=None, timeout_s: float = 30.0):
    del device
    self.timeout_s = timeout_s

  def address(self):
    return None

  def send_step(self, peer, step: Step, token: str) -> None:
    peer.submit.remote(step, token)

  def send_replica(self, peer, write: ReplicaWrite, token: str) -> int:
    return ray.get(peer.receive_replica.remote(write, token), timeout=self.timeout_s)


class JaxTransferTransport:
  """`jax.experimental.transfer` between actors, every pull under a watchdog (module doc)."""
  name = "jax_transfer"

  def __init__(self, device, timeout_s: float = 30.0):
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import transfer  # pylint: disable=g-import-not-at-top
    self._jax, self._device, self.timeout_s = jax, device, timeout_s
    host = ray.util.get_node_ip_address()
    self._server = transfer.start_transfer_server(device.client, f"{host}:0", [f"{host}:0"])
    self._ids = itertools.count(random.getrandbits(40) << 16)
    self._conns: dict[str, object] = {}
    self._lock = threading.Lock()

  def address(self) -> str:
    return self._server.address()

  def offer(self, arrays: list) -> tuple:
    """Puts host arrays on this actor's device and offers them; returns the pull ticket."""
    placed = [self._jax.device_put(np.ascontiguousarray(a), self._device) for a in arrays]
    uid = next(self._ids)
    self._server.await_pull(uid, placed)
    return (self.address(), uid, [(a.shape, str(a.dtype)) for a in placed])

  def pull(self, ticket) -> list:
    addr, uid, specs = ticket
    jax = self._jax
    sharding = jax.sharding.SingleDeviceSharding(self._device)
    like = [jax.ShapeDtypeStruct(s, np.dtype(d), sharding=sharding) for s, d in specs]
    out: list = []

    def run():
      try:
        with self._lock:
          conn = self._conns.get(addr) or self._server.connect(addr)
          self._conns[addr] = conn
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.timeout_s)
        got = conn.pull(uid, like, timeout=deadline) if _pull_takes_timeout(conn) else \
            conn.pull(uid, like)
        out.append([np.asarray(a) for a in got])
      except BaseException as e:  # pylint: disable=broad-except
        out.append(e)

    t = threading.Thread(target=run, daemon=True, name="transfer-pull")
    t.start()
    t.join(self.timeout_s)
    if not out:   # a hung pull (an id nobody offers): the thread is abandoned
      raise TransportTimeout(f"pull {uid} from {addr} did not finish in {self.timeout_s} s")
    if isinstance(out[0], BaseException):
      raise ConnectionError(f"pull {uid} from {addr} failed: {out[0]}") from out[0]
    return out[0]

  def send_step(self, peer, step: Step, token: str) -> None:
    ticket = self.offer([np.asarray(step.x)])
    peer.submit_pulled.remote(dataclasses.replace(step, x=None), ticket, token)

  def send_replica(self, peer, write: ReplicaWrite, token: str) -> int:
    ticket = self.offer([np.asarray(write.packed.data)])
    bare = dataclasses.replace(write, packed=write.packed.replace(data=None))
    return ray.get(peer.receive_replica_pulled.remote(bare, ticket, token),
                   timeout=self.timeout_s)


def _pull_takes_timeout(conn) -> bool:
  return "timeout" in (type(conn).pull.__doc__ or "")


TRANSPORTS = {"object_store": ObjectStoreTransport, "jax_transfer": JaxTransferTransport,
              "shm": SharedMemoryTransport}


class _ActorRuntime:
  """What the `LocalWorker` inside an actor sees as its runtime (see module doc)."""

  def __init__(self, spec: ActorSpec, transport):
    self.num_stages = len(spec.ranges)
    self.depth, self.microbatch_size, self.max_len = (spec.depth, spec.microbatch_size,
                                                      spec.max_len)
    self.pace, self.heartbeat_s = spec.pace, spec.heartbeat_s
    self.events = _Outbox()
    self.transport = transport
    self.peers: dict[int, object] = {}     # stage -> actor handle (set by the driver)
    self.peer_nodes: dict[int, str] = {}   # stage -> its actor's Ray node id
    self.peer_lanes: dict[int, str] = {}   # stage -> its actor's lane address (ray_lane.py)
    self._lanes: dict[str, LaneClient] = {}
    self.node_id = ray.get_runtime_context().get_node_id()
    self.link_fault = None
    self.token = spec.token
    self.swapping, self.kv_budget_bytes = spec.swapping, spec.kv_budget_bytes
    # Disaggregation (runtime/disagg.py's workers read these): a token worker's host slots; a
    # prompt worker's splits, layer groups and the token actors its streams land in.
    self.host_slots = spec.host_slots
    self.splits, self.token_splits = tuple(spec.ranges), tuple(spec.token_splits)
    self.layerwise, self.layer_group = spec.layerwise, spec.layer_group
    self.token_peers: dict[int, object] = {}   # token stage -> actor handle (set by the driver)
    self.token_peer_token = ""                 # the token pipeline's id
    self.token_peer_nodes: dict[int, str] = {}  # token stage -> its actor's Ray node id
    self.sender = (spec.stage, os.getpid())

  def trace(self, event: str, stage: int, mb_id: int, layers, token_stage=None) -> None:
    """The local prompt runtime's test hook; here the token actors log what landed instead."""

  def deliver(self, token_stage: int, mb_id: int, packet, lengths) -> None:
    """A prompt layer group's KV (host numpy) into the owning token actor's host slot, actor to
    actor (`send_prompt_packet`), returning once it is written there. Any failure of the token
    actor is `PeerDead` (the engine redoes the prompt after the token side's recovery)."""
    peer = self.token_peers.get(token_stage)
    if peer is None:
      raise PeerDead(f"token stage {token_stage} has no live actor")
    try:
      send_prompt_packet(self.transport, peer, self.token_peer_nodes.get(token_stage), mb_id,
                         packet, lengths, self.token_peer_token, self.sender)
    except (ray.exceptions.RayError, TimeoutError) as e:
      raise PeerDead(f"token stage {token_stage}: {type(e).__name__}: {e}") from e

  def _peer(self, stage: int):
    peer = self.peers.get(stage)
    if peer is None:
      raise PeerDead(f"stage {stage} has no live actor")
    return peer

  def lane_to(self, stage: int, purpose: str = "steps") -> LaneClient | None:
    """The lane to `stage`'s actor when it runs on this node and lanes are on (ray_lane.py);
    one connection per purpose, so a replica landing never holds up a step behind it."""
    addr = self.peer_lanes.get(stage)
    if not addr or self.peer_nodes.get(stage) != self.node_id:
      return None
    lane = self._lanes.get((addr, purpose))
    if lane is None:
      lane = self._lanes[(addr, purpose)] = LaneClient(addr, self.transport.timeout_s)
    return lane

  def forward(self, stage: int, step: Step) -> None:
    peer = self._peer(stage + 1)
    step = dataclasses.replace(step, x=np.asarray(step.x))
    lane = self.lane_to(stage + 1)
    if lane is not None and lane.send(("submit", (step, self.token))):
      return
    self.transport.send_step(peer, step, self.token)   # lost there too if the peer is dead

  def close_lanes(self) -> None:
    for lane in self._lanes.values():
      lane.close()
    self._lanes.clear()
    if self.events.lane is not None:
      self.events.lane.close()
      self.events.lane = None

  def send(self, stage: int, msg) -> None:
    self._peer(stage).deliver.remote(msg, self.token)

  def channel_to_successor(self, sender: LocalWorker):
    def send(write: ReplicaWrite) -> int:
      fault = self.link_fault
      if fault is not None and fault(write):
        raise ConnectionError(f"injected transport failure: stage {write.stage} -> successor, "
                              f"microbatch {write.mb_id} step {write.step}")
      to = ring_holder(sender.stage, self.num_stages)
      if isinstance(self.transport, SharedMemoryTransport):
        return self.transport.send_replica(self._peer(to), write, self.token,
                                           self.peer_nodes.get(to), self.lane_to(to, "replica"))
      return self.transport.send_replica(self._peer(to), write, self.token)
    return send


def send_prompt_packet(transport, peer, node: str | None, mb_id: int, packet, lengths,
                       token: str, sender: tuple) -> str:
  """A prompt packet (host numpy) into token actor `peer`'s host slot, waiting until it is
  written there; returns the channel it took. With the shm transport and `peer` on this node
  (`node`, its Ray node id), through the segment this process keeps for `peer` (one copy in,
  the header in the call, `put_layer_shm`); otherwise the payload rides in the call
  (`put_layer`: large arrays through this node's object store, put by this process)."""
  if isinstance(transport, SharedMemoryTransport) and transport.same_node(node):
    transport.send_prompt(peer, mb_id, packet, lengths, token, sender)
    return "shm"
  ray.get(peer.put_layer.remote(mb_id, packet, lengths, token, sender),
          timeout=transport.timeout_s)
  return "object_store"


class _SelfKill:
  def kill(self) -> None:
    """An armed crash: the whole process dies at once, as a machine failure would."""
    os.kill(os.getpid(), signal.SIGKILL)


class _ProcessWorker(_SelfKill, LocalWorker):
  pass


def _worker_class(role: str):
  if role == "pipeline":
    return _ProcessWorker
  from dejavu_jax.runtime import disagg  # pylint: disable=g-import-not-at-top
  base = {"token": disagg.TokenWorker, "prompt": disagg.PromptWorker}[role]
  return type(f"_Process{base.__name__}", (_SelfKill, base), {})


def _build_program(spec: ActorSpec):
  import jax  # pylint: disable=g-import-not-at-top
  from dejavu_jax.pipeline.fake import FakeProgram  # pylint: disable=g-import-not-at-top
  from dejavu_jax.pipeline.plan import StagePlan, make_mesh  # pylint: disable=g-import-not-at-top
  from dejavu_jax.pipeline.stage import StageProgram  # pylint: disable=g-import-not-at-top
  # A one-stage view of the pipeline on this process's own devices; the program keeps the
  # stage's global index (the worker's identity) and its global layer range.
  local = StagePlan(ranges=(tuple(spec.ranges[spec.stage]),), tensor=spec.tensor)
  mesh = make_mesh(local, jax.devices()[:spec.tensor])
  cls = FakeProgram if spec.program == "fake" else StageProgram
  program = cls(spec.cfg, local, mesh, 0)
  program.index = spec.stage
  return program


class StageActor:
  """One stage's worker in its own process (decorated with `ray.remote` by runtime/ray.py)."""

  def __init__(self, spec: ActorSpec | None = None, params=None):
    import jax  # pylint: disable=g-import-not-at-top
    from dejavu_jax.pipeline import fake, stage  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    jax.devices()   # a spare (spec None) has its JAX runtime up before it is needed
    self.spec = self.rt = self.worker = None
    # Token role: (mb_id, global layers, (prompt stage, pid) that sent them, channel: "shm" |
    # "object_store") per packet landed in a host slot, in arrival order (tests read it: layer
    # by layer, from the prompt actors, through the segment on one node).
    self.landed: collections.deque = collections.deque(maxlen=100_000)
    self._shm = ShmReader()
    # Worker messages from the driver and steps from the previous stage, when on this node.
    self._lane = LaneServer(self._on_lane, name="stage")
    # A spare's warm stages: stage -> (program, placed params), for the pipeline `_warm_token`;
    # step signatures that came before their stage was warm wait in `_warm_pending`.
    self._warm: dict[int, tuple] = {}
    self._warm_token = None
    self._warm_pending: list[tuple] = []
    self.spares: list = []
    self._pushed: set = set()
    if spec is not None:
      self.configure(spec, params)

  def configure(self, spec: ActorSpec, params) -> dict:
    """Becomes stage `spec.stage`'s worker (a spare actor is configured on a failure)."""
    import jax  # pylint: disable=g-import-not-at-top
    if self.worker is not None:
      raise RuntimeError(f"this actor already serves stage {self.spec.stage}")
    self.spec = spec
    warm = self._warm.pop(spec.stage, None) if self._warm_token == spec.token else None
    self._warm, self._warm_pending = {}, []   # a stage taken: the other warm stages go
    self.took_warm = warm is not None
    if warm is not None:   # weights placed and steps traced while it waited
      program, params = warm
    else:
      program = _build_program(spec)
      if isinstance(params, list):   # a spare's weights by reference: fetched only when cold
        params = ray.get(params[0]) if params[0] is not None else None
    if warm is None and spec.checkpoint and spec.program != "fake":
      # Only this stage's weights are read (a partial orbax restore).
      from dejavu_jax.models.checkpoint import restore_params  # pylint: disable=g-import-not-at-top
      from dejavu_jax.models.decoder import param_shapes  # pylint: disable=g-import-not-at-top
      start, stop = spec.ranges[spec.stage]
      params = restore_params(spec.checkpoint, like=param_shapes(spec.cfg, start, stop))
    transport = TRANSPORTS[spec.transport](jax.devices()[0], spec.rpc_timeout_s)
    self.rt = _ActorRuntime(spec, transport)
    if spec.driver_lane and spec.driver_node == self.rt.node_id:
      self.rt.events.lane = LaneClient(spec.driver_lane, spec.rpc_timeout_s)
    self._pushed = set()
    program = StepLog(program, self._push_calls)
    self.worker = _worker_class(spec.role)(self.rt, program, params, spec.options,
                                           worker_id=spec.worker_id)
    self.landed.clear()
    self.worker.start()
    return self.info()

  def info(self) -> dict:
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "transport": self.rt.transport.address() if self.rt else None,
            "lane": self._lane.address,
            "warm": getattr(self, "took_warm", False),
            "warm_calls": {s: len(c) for s, c in getattr(self, "_replayed", {}).items()}}

  # ---- the Worker messages (default concurrency group: one thread, arrival order) ----
  def set_peers(self, peers: dict, nodes: dict | None = None, spares: list | None = None,
                lanes: dict | None = None) -> None:
    self.rt.peers = dict(peers)
    self.rt.peer_nodes = dict(nodes or {})
    self.rt.peer_lanes = dict(lanes or {})
    self.spares = list(spares or [])
    self._push_calls(None)   # a new spare hears every signature noted so far

  def _push_calls(self, calls) -> None:
    """Hands step signatures to the spares: `calls` (new ones) to every spare, and all noted so
    far to a spare that has heard none."""
    if self.worker is None:
      return
    log = self.worker._program  # pylint: disable=protected-access
    for sp in self.spares:
      key = sp._actor_id.hex()  # pylint: disable=protected-access
      if key not in self._pushed:
        self._pushed.add(key)
        sp.warm_calls.remote(self.spec.token, self.spec.stage, list(log.calls))
      elif calls:
        sp.warm_calls.remote(self.spec.token, self.spec.stage, calls)

  def prepare(self, token: str, specs: dict, params: dict) -> bool:
    """Makes this spare warm for every stage of pipeline `token` (module doc): each stage's
    program built and its weights placed (from `params[s]`, an object ref in a list, or the
    spec's checkpoint), so that taking a stage loads only its state."""
    if self.worker is not None:
      raise RuntimeError(f"this actor already serves stage {self.spec.stage}")
    self._warm, self._warm_token, self._replayed = {}, token, {}
    for s, spec in specs.items():
      program = _build_program(spec)
      if spec.checkpoint and spec.program != "fake":
        from dejavu_jax.models.checkpoint import restore_params  # pylint: disable=g-import-not-at-top
        from dejavu_jax.models.decoder import param_shapes  # pylint: disable=g-import-not-at-top
        host = restore_params(spec.checkpoint, like=param_shapes(spec.cfg, *spec.ranges[s]))
      else:
        host = ray.get(params[s][0]) if params.get(s) else None
      self._warm[s] = (program, program.place_params(host))
    pending, self._warm_pending = self._warm_pending, []
    for t, s, call in pending:
      self.warm_calls(t, s, [call])
    return True

  def warm_state(self) -> dict:
    """Stage -> step signatures replayed here, once everything queued before this call ran
    (default group: after `prepare` and the `warm_calls` that came before it)."""
    return {s: len(c) for s, c in getattr(self, "_replayed", {}).items()}

  def warm_calls(self, token: str, stage: int, calls: list) -> None:
    """Traces and compiles step signatures a live stage noted, on this spare's warm copy."""
    if token != self._warm_token or self.worker is not None:
      if self.worker is None and self._warm_token is None:
        self._warm_pending += [(token, stage, c) for c in calls]
      return
    got = self._warm.get(stage)
    if got is None:
      return
    for call in calls:
      try:
        replay(got[0], got[1], call)
        self._replayed.setdefault(stage, []).append(call[0])
      except Exception:  # pylint: disable=broad-except
        pass   # a signature that does not replay is only traced later, when it runs

  # Worker messages a lane may carry (ray_lane.py): the default group's, run on the lane's
  # reader thread in the order the sender sent them.
  LANE_METHODS = frozenset({"submit", "set_epoch", "load_cache", "export_replica", "free",
                            "resync", "arm", "disarm", "stall", "set_link_fault",
                            "load_prompt"})
  # ... and the landings a lane carries the header of (the data in shared memory: ray_shm.py);
  # answered, on their own connection.
  LANE_LANDINGS = frozenset({"receive_replica_shm"})

  def _on_lane(self, msg):
    name, args = msg
    if name in self.LANE_LANDINGS:
      return getattr(self, name)(*args)   # raises PeerDead when not this pipeline's
    if name not in self.LANE_METHODS:
      raise ValueError(f"{name!r} is not a message a lane carries")
    if self.worker is None:   # reset, or a spare: a late message of a closed pipeline
      return None
    return getattr(self, name)(*args)

  def _mine(self, token: str) -> bool:
    """A message for this actor's current pipeline (not a late one for a pipeline it served
    before it was reset and pooled)."""
    return self.worker is not None and token == self.spec.token

  def reset(self) -> bool:
    """Stops the worker and drops its state: the process goes back to the spare pool."""
    if self.worker is not None:
      self.worker.stop(timeout=5.0)
    if self.rt is not None and hasattr(self.rt.transport, "close"):
      self.rt.transport.close()
    if self.rt is not None:
      self.rt.close_lanes()
    self._shm.close()
    self.spec = self.rt = self.worker = None
    self._warm, self._warm_token, self._warm_pending, self.spares = {}, None, [], []
    return True

  def submit(self, step: Step, token: str) -> None:
    if self._mine(token):
      self.worker.submit(step)

  def submit_pulled(self, step: Step, ticket, token: str) -> None:
    if self._mine(token):
      (x,) = self.rt.transport.pull(ticket)
      self.worker.submit(dataclasses.replace(step, x=x))

  def set_epoch(self, epoch: int) -> None:
    self.worker.set_epoch(epoch)

  def load_cache(self, mb_id: int, source, epoch: int) -> None:
    self.worker.load_cache(mb_id, source, epoch)

  def export_replica(self, stage: int, mb_id: int, step: int, to: int, epoch: int) -> None:
    self.worker.export_replica(stage, mb_id, step, to, epoch)

  def deliver(self, msg, token: str) -> None:
    if self._mine(token):
      self.worker._inbox.put(msg)  # pylint: disable=protected-access

  def free(self, mb_id: int) -> None:
    self.worker.free(mb_id)

  def resync(self) -> None:
    self.worker.resync()

  def arm(self, after_steps: int, kind: str, stall_s: float) -> None:
    self.worker.arm(after_steps, kind, stall_s)

  def disarm(self) -> None:
    self.worker._armed = None  # pylint: disable=protected-access

  def stall(self, seconds: float) -> None:
    self.worker.stall(seconds)

  def set_link_fault(self, fails) -> None:
    self.rt.link_fault = fails

  def load_prompt(self, mb_id: int, epoch: int, start_at: float, load_s: float,
                  token: str) -> None:
    """(Token role) queued in the inbox now, so before any step the driver sends after it."""
    if self._mine(token):
      self.worker.load_prompt(mb_id, epoch, start_at, load_s)

  # ---- disaggregation's flow control and prompt streams ("slots": never behind the inbox) ----
  @ray.method(concurrency_group="slots")
  def reserve_slot(self, mb_id: int, token: str) -> bool:
    if not self._mine(token):
      raise PeerDead(f"token stage actor {os.getpid()} is not in this pipeline any more")
    return self.worker.reserve_slot(mb_id)

  @ray.method(concurrency_group="slots")
  def set_token_peers(self, peers: dict, token: str, nodes: dict | None = None) -> None:
    """(Prompt role) the token pipeline's live actors, its id, and each actor's Ray node (the
    shm transport's same-node check)."""
    if self.rt is not None:
      self.rt.token_peers, self.rt.token_peer_token = dict(peers), token
      self.rt.token_peer_nodes = dict(nodes or {})

  @ray.method(concurrency_group="slots")
  def put_layer(self, mb_id: int, packet, lengths, token: str, sender: tuple) -> None:
    """(Token role) a prompt actor's packet of global layers lands in `mb_id`'s host slot
    (dropped when the microbatch holds none: it was requeued meanwhile)."""
    self._land_prompt(mb_id, packet, lengths, token, sender, "object_store")

  @ray.method(concurrency_group="slots")
  def put_layer_shm(self, mb_id: int, packet, ticket, lengths, token: str,
                    sender: tuple) -> None:
    """(Token role) `put_layer` of a packet whose data lies in the sender's shm segment
    (`ticket`): the host slot's write is the one copy out of the mapping."""
    if not self._mine(token):
      raise PeerDead(f"token stage actor {os.getpid()} is not in this pipeline any more")
    packet = packet.replace(data=self._shm.view(ticket))
    self._land_prompt(mb_id, packet, lengths, token, sender, "shm")

  def _land_prompt(self, mb_id, packet, lengths, token, sender, channel: str) -> None:
    if not self._mine(token):
      raise PeerDead(f"token stage actor {os.getpid()} is not in this pipeline any more")
    self.worker.receive_prompt(mb_id, packet, lengths)
    self.landed.append((mb_id, tuple(packet.layers), tuple(sender), channel))

  @ray.method(concurrency_group="slots")
  def slots_held(self) -> list:
    return self.worker.slots.held()

  @ray.method(concurrency_group="slots")
  def landed_log(self) -> list:
    return list(self.landed)

  @ray.method(concurrency_group="io")
  def swap_events(self) -> list:
    return self.worker.swap_events

  # ---- out of band ("io" group: never queued behind the messages above) ----
  @ray.method(concurrency_group="io")
  def receive_replica(self, write: ReplicaWrite, token: str) -> int:
    if not self._mine(token):
      raise PeerDead(f"stage {write.stage}'s successor is not in this pipeline any more")
    return self.worker.receive_replica(write)

  @ray.method(concurrency_group="io")
  def receive_replica_pulled(self, write: ReplicaWrite, ticket, token: str) -> int:
    if not self._mine(token):
      raise PeerDead(f"stage {write.stage}'s successor is not in this pipeline any more")
    (data,) = self.rt.transport.pull(ticket)
    return self.worker.receive_replica(
        dataclasses.replace(write, packed=write.packed.replace(data=data)))

  @ray.method(concurrency_group="io")
  def receive_replica_shm(self, write: ReplicaWrite, ticket, token: str) -> int:
    if not self._mine(token):
      raise PeerDead(f"stage {write.stage}'s successor is not in this pipeline any more")
    data = self._shm.view(ticket)   # the log's write is the one copy out of the segment
    return self.worker.receive_replica(
        dataclasses.replace(write, packed=write.packed.replace(data=data)))

  @ray.method(concurrency_group="control")
  def poll(self, timeout_s: float) -> list:
    """The events queued now, waiting up to `timeout_s` for the first (the driver long-polls)."""
    out, rt = [], self.rt
    if rt is None:   # a spare, or reset
      time.sleep(timeout_s)
      return out
    try:
      out.append(rt.events.get(timeout=timeout_s))
      while True:
        out.append(rt.events.get_nowait())
    except queue.Empty:
      pass
    return out

  @ray.method(concurrency_group="io")
  def stats(self):
    return self.worker.stats()

  @ray.method(concurrency_group="control")
  def die(self) -> None:
    """SIGKILL this process (the driver's kill when the actor runs on another host)."""
    os.kill(os.getpid(), signal.SIGKILL)

  def stop(self) -> None:
    self.worker.stop(timeout=5.0)


# The default group runs the Worker messages one at a time in arrival order (a worker's inbox is
# FIFO); "io" lands replicas and answers stats meanwhile; "control" long-polls and dies; "slots"
# reserves host slots and lands prompt streams (disaggregation) beside both.
CONCURRENCY_GROUPS = {"io": 2, "control": 2, "slots": 2}
