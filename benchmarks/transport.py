"""The transports bytes take between DéjàVu's workers, measured, and the cost model calibrated from them.

  python benchmarks/transport.py [--runs=5] [--sizes_mb=1,100] [--out=results/transport]

1. For each path and each transport available here, the median time of one message (of --runs,
   after one warm-up) by size, from the send until the receiver holds the bytes in its own host
   (or device) memory:
     prompt_kv                  between two Ray actor processes on this node, through the Ray
                                runtime's own prompt channel (`ray_actor.send_prompt_packet`, as
                                a prompt actor's `deliver`) under each transport: `shm` through
                                the segment and `put_layer_shm`, the others in the call
                                (`put_layer`; each row names its `channel`), landed by the
                                receiver into a real `HostSlots` slot (its `write`, as a token
                                actor's); the message is one layer's prompt KV block [2, 1, 8,
                                T, 8, 64] float32 (T from the size).
     replica_delta              between the same two actors, through the transports'
                                `send_replica` (runtime/ray_actor.py: `object_store`, `shm`,
                                `jax_transfer`), each landed by a copy into a buffer the receiver
                                owns (what a replica log write is); one contiguous delta.
     swap_in                    host numpy -> the actor's device (`device_put`, blocked on,
                                never aliasing the host array: on CPU it would copy nothing).
     weights                    a stage's weights into a replacement actor: `file` (np.load of
                                a local file, page cache warm, then device_put) and
                                `object_store` (ray.get of the copy the driver put, then
                                device_put: what a spare does now).
   and `memcpy` (np.copyto between two preallocated buffers in one process) as the reference,
   listed under every path (calibrate_links never picks it by default).
   The table goes to <out>/links.json (every row: path, transport, bytes, seconds, GBps), and
   <out>/links_inprocess.json (the in-process rows: what the local runtime's own transfers are).
2. `costmodel.calibrate_links` of that table: latency + size / bandwidth per path.
3. The same small disaggregated serve (tiny OPT, real compute, Dp = Dt = 1, local runtime) run
   real, then paced on a cost model whose stage step times are the real run's measured per-layer
   step times and whose links come from links_inprocess.json (the table the local runtime's
   transfers match), and predicted by the simulator on that same cost model and links:
   `calibrated_vs_real_rel_error` (simulator makespan vs the real one), `paced_vs_real_rel_error`.
The last stdout line is one JSON object; "kind" labels each figure measured or modelled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from dejavu_jax import costmodel as cm  # noqa: E402
from dejavu_jax.runtime.ray_session import actor_env, init_ray  # noqa: E402

MB = 2**20
# A prompt packet's layout: one layer, 8 rows, 8 heads of 64, float32 (32 KiB a position).
PROMPT_ROWS, PROMPT_HEADS, PROMPT_DIM = 8, 8, 64
CROSS = ("object_store", "shm", "jax_transfer")   # between two actor processes


def _payload(nbytes: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 2**15, nbytes // 2, dtype=np.int16).view(
      np.float16)


def _prompt_len(nbytes: int) -> int:
  return max(1, nbytes // (2 * PROMPT_ROWS * PROMPT_HEADS * PROMPT_DIM * 4))


def _packet(nbytes: int):
  """One layer's prompt KV block of about `nbytes` (a `Packed` of host numpy, as a prompt
  actor's sender thread hands to `deliver`)."""
  from dejavu_jax.stream.packing import Packed  # pylint: disable=g-import-not-at-top
  t = _prompt_len(nbytes)
  data = np.random.default_rng(0).standard_normal(
      (2, 1, PROMPT_ROWS, t, PROMPT_HEADS, PROMPT_DIM), np.float32)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (PROMPT_ROWS, t)).copy()
  return Packed(data=data, positions=pos, layers=(0, 1), rows=(0, PROMPT_ROWS))


def _write(x):
  from dejavu_jax.runtime.replication import ReplicaWrite  # pylint: disable=g-import-not-at-top
  from dejavu_jax.stream.packing import Packed  # pylint: disable=g-import-not-at-top
  packed = Packed(data=x, positions=np.zeros((1, 1), np.int32), layers=(0, 1), rows=(0, 1))
  return ReplicaWrite(stage=0, mb_id=0, gen=0, step=0, block=True, packed=packed,
                      shape=x.shape, dtype=x.dtype, layer_base=0)


class Peer:
  """One actor process owning one transport: it sends messages, or lands them (the receiving
  methods have the names the transports call: receive_replica*, put_layer*, as a stage
  actor's)."""

  def __init__(self, transport: str):
    import jax  # pylint: disable=g-import-not-at-top
    from dejavu_jax.runtime import ray_actor, ray_shm  # pylint: disable=g-import-not-at-top
    self.jax, self.dev = jax, jax.devices()[0]
    self.name = transport
    self.t = ray_actor.TRANSPORTS[transport](self.dev, 120.0) if transport else None
    self.reader = ray_shm.ShmReader()
    self.dst = np.empty(0, np.uint8)
    self.slots = None

  def node(self) -> str:
    return ray.get_runtime_context().get_node_id()

  def prepare(self, nbytes: int) -> None:
    from dejavu_jax.stream.slots import HostSlots  # pylint: disable=g-import-not-at-top
    self.dst = np.zeros(nbytes, np.uint8)   # faulted in, as a long-lived replica log is
    # A token actor's host slot for one layer (preallocated at start, as the worker's are).
    self.slots = HostSlots(1, (0, 1), PROMPT_ROWS, _prompt_len(nbytes), PROMPT_HEADS,
                           PROMPT_DIM, np.float32)
    self.slots.reserve(0)
    self.slots.write(0, _packet(nbytes), np.zeros(PROMPT_ROWS, np.int32))   # faulted in

  def _land(self, data) -> int:
    flat = np.asarray(data).reshape(-1).view(np.uint8)
    np.copyto(self.dst[:flat.nbytes], flat)
    return int(flat.nbytes)

  def receive_replica(self, write, token):
    del token
    return self._land(write.packed.data)

  def receive_replica_pulled(self, write, ticket, token):
    del write, token
    (x,) = self.t.pull(ticket)
    return self._land(x)

  def receive_replica_shm(self, write, ticket, token):
    del write, token
    return self._land(self.reader.view(ticket))

  def put_layer(self, mb_id, packet, lengths, token, sender):
    del token, sender
    self.slots.write(mb_id, packet, lengths)

  def put_layer_shm(self, mb_id, packet, ticket, lengths, token, sender):
    del token, sender
    self.slots.write(mb_id, packet.replace(data=self.reader.view(ticket)), lengths)

  def send_prompt(self, peer, peer_node: str, nbytes: int, runs: int) -> tuple[list, str, int]:
    """Times the runtime's prompt channel (module doc); returns (times, channel, bytes)."""
    from dejavu_jax.runtime.ray_actor import send_prompt_packet  # pylint: disable=g-import-not-at-top
    packet, lengths = _packet(nbytes), np.full(PROMPT_ROWS, 1, np.int32)
    out, channel = [], None
    for _ in range(runs + 1):   # the first warms the connection and the segment up
      t0 = time.perf_counter()
      channel = send_prompt_packet(self.t, peer, peer_node, 0, packet, lengths, "",
                                   (0, os.getpid()))
      out.append(time.perf_counter() - t0)
    return out[1:], channel, int(packet.data.nbytes)

  def send(self, peer, peer_node: str, nbytes: int, runs: int) -> list[float]:
    write = _write(_payload(nbytes))
    out = []
    for _ in range(runs + 1):   # the first warms the connection and the segment up
      t0 = time.perf_counter()
      if self.name == "shm":
        self.t.send_replica(peer, write, "", peer_node)
      else:
        self.t.send_replica(peer, write, "")
      out.append(time.perf_counter() - t0)
    return out[1:]

  def swap_in(self, nbytes: int, runs: int) -> tuple[list[float], bool]:
    """Times host -> device; returns (times, whether a host copy had to be forced: on CPU a
    device_put may alias an aligned host array, even with may_alias=False, and copy nothing,
    where a swap-in from a host log that keeps being written must copy)."""
    x, out, forced = _payload(nbytes), [], False
    for _ in range(runs + 1):
      t0 = time.perf_counter()
      y = self.jax.device_put(np.copy(x) if forced else x, self.dev, may_alias=False)
      y.block_until_ready()
      t = time.perf_counter() - t0
      if not forced and np.shares_memory(np.asarray(y), x):
        forced = True   # this run copied nothing: measured again, with the copy
        t0 = time.perf_counter()
        y = self.jax.device_put(np.copy(x), self.dev, may_alias=False)
        y.block_until_ready()
        t = time.perf_counter() - t0
      out.append(t)
      del y
    return out[1:], forced

  def load_weights(self, source, runs: int) -> tuple[list[float], bool]:
    """`source` a .npy path (file) or an object ref in a list (object_store); returns (times,
    whether a copy had to be forced: a device_put that aliases the host buffer, e.g. the object
    store's shared memory, copies nothing, and the weights must outlive it)."""
    out, forced = [], False
    for _ in range(runs + 1):
      t0 = time.perf_counter()
      a = np.load(source) if isinstance(source, str) else ray.get(source[0])
      y = self.jax.device_put(np.copy(a) if forced else a, self.dev, may_alias=False)
      y.block_until_ready()
      if not forced and np.shares_memory(np.asarray(y), a):
        forced = True   # measured again, with the copy
        del y
        t0 = time.perf_counter()
        a = np.load(source) if isinstance(source, str) else ray.get(source[0])
        y = self.jax.device_put(np.copy(a), self.dev, may_alias=False)
        y.block_until_ready()
      out.append(time.perf_counter() - t0)
      del a, y
    return out[1:], forced

  def memcpy(self, nbytes: int, runs: int) -> list[float]:
    src, dst, out = _payload(nbytes), np.zeros(nbytes // 2, np.float16), []
    for _ in range(runs + 1):
      t0 = time.perf_counter()
      np.copyto(dst, src)
      out.append(time.perf_counter() - t0)
    return out[1:]


def _row(path, transport, nbytes, times, **extra) -> dict:
  med = statistics.median(times)
  return {"path": path, "transport": transport, "bytes": nbytes, "seconds": med,
          "GBps": nbytes / med / 1e9, "runs": len(times), **extra}


def measure(sizes: list[int], runs: int, log=print) -> list[dict]:
  """Every (path, transport, size) row of the table (module doc)."""
  env = {"env_vars": actor_env(1, 0)}
  cls = ray.remote(num_cpus=0, runtime_env=env)(Peer)
  rows = []
  solo = cls.remote(None)
  for n in sizes:
    t = ray.get(solo.memcpy.remote(n, runs))
    rows += [_row(p, "memcpy", n, t, reference=True) for p in cm.LINK_PATHS]
    t, forced = ray.get(solo.swap_in.remote(n, runs))
    rows.append(_row("swap_in", "device_put", n, t, forced_host_copy=forced))
    with tempfile.TemporaryDirectory() as d:
      f = os.path.join(d, "w.npy")
      np.save(f, _payload(n))
      t, forced = ray.get(solo.load_weights.remote(f, runs))
      rows.append(_row("weights", "file", n, t, forced_host_copy=forced))
    ref = ray.put(_payload(n))
    t, forced = ray.get(solo.load_weights.remote([ref], runs))
    rows.append(_row("weights", "object_store", n, t, forced_host_copy=forced))
    del ref
    log(f"in-process {n / MB:.0f} MB done")
  for name in CROSS:
    a, b = cls.remote(name), cls.remote(name)
    node = ray.get(b.node.remote())
    for n in sizes:
      ray.get(b.prepare.remote(n))
      try:
        t, channel, nb = ray.get(a.send_prompt.remote(b, node, n, runs))
        rows.append(_row("prompt_kv", name, nb, t, channel=channel))
      except Exception as e:  # pylint: disable=broad-except
        log(f"{name} prompt_kv {n} B failed: {type(e).__name__}: {e}")
      try:
        rows.append(_row("replica_delta", name, n, ray.get(a.send.remote(b, node, n, runs))))
      except Exception as e:  # pylint: disable=broad-except
        log(f"{name} replica_delta {n} B failed: {type(e).__name__}: {e}")
    log(f"{name} done")
    for h in (a, b):
      ray.kill(h)
  ray.kill(solo)
  return rows


def serve_comparison(links_path: str, log=print) -> dict:
  """Part 3 of the module doc."""
  import jax  # pylint: disable=g-import-not-at-top
  from dejavu_jax import sim  # pylint: disable=g-import-not-at-top
  from dejavu_jax.config import ServeConfig, tiny_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import init_params  # pylint: disable=g-import-not-at-top
  from dejavu_jax.serving.engine import PipelineEngine  # pylint: disable=g-import-not-at-top
  from dejavu_jax.workload import Request  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("opt", num_layers=4, max_positions=128)
  params = init_params(cfg, jax.random.key(0))
  batch, prompt_len, new = 4, 32, 16
  reqs = [Request(i, 0.0, tuple((7 * i + j) % 50 + 3 for j in range(prompt_len)), new)
          for i in range(4 * batch)]
  base = dict(prompt_stages=1, token_stages=1, microbatch_size=batch, max_len=64,
              mode="paper", heartbeat_s=0.2, heartbeat_timeout_s=30.0)
  with PipelineEngine(cfg, params, ServeConfig(**base)) as eng:
    eng.warmup()
    path = eng.prompt_path
    before = eng.worker_stats() + path.worker_stats()
    real = eng.serve(reqs)
    after = eng.worker_stats() + path.worker_stats()
  tok = [(a.busy_s - b.busy_s, a.steps_done - b.steps_done) for a, b in zip(after, before)]
  (t_busy, t_steps), (p_busy, p_steps) = tok[0], tok[-1]
  # The real run's own per-layer step times (prompt worker: prefills; token worker: decodes).
  cost = cm.TableCostModel(cfg, prompt=p_busy / p_steps / cfg.num_layers,
                           token=t_busy / t_steps / cfg.num_layers)
  links = cm.calibrate_links(cm.load_link_table(links_path))
  with PipelineEngine(cfg, params, ServeConfig(**base, pacing="paced", links_table=links_path),
                      cost_model=cost) as eng:
    eng.warmup()
    paced = eng.serve(reqs)
  recs = [sim.RequestRecord(r.request_id, 0.0, prompt_len, new) for r in reqs]
  pred = sim.simulate_disaggregated(cost, recs, 1, 1, batch_size=batch,
                                    stream_link=links["prompt_kv"], host_link=links["swap_in"],
                                    include_head=False, microbatching="paper")
  makespan = lambda rs: max(r.finish for r in rs)  # noqa: E731
  m_real, m_paced, m_pred = makespan(real.records), makespan(paced.records), \
      makespan(pred.records)
  out = {"real_makespan_s": m_real, "paced_makespan_s": m_paced,
         "predicted_makespan_s": m_pred,
         "calibrated_vs_real_rel_error": abs(m_pred - m_real) / m_real,
         "paced_vs_real_rel_error": abs(m_paced - m_real) / m_real,
         "tokens_identical": real.tokens() == paced.tokens(),
         "paced_links_table": paced.summary.get("links_table"),
         "per_layer_prompt_s": p_busy / p_steps / cfg.num_layers,
         "per_layer_token_s": t_busy / t_steps / cfg.num_layers}
  log(json.dumps(out))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--sizes_mb", default="1,100")
  parser.add_argument("--out", default=os.path.dirname(cm.DEFAULT_LINK_TABLE))
  parser.add_argument("--no_serve", action="store_true", help="skip part 3")
  args = parser.parse_args()
  sizes = [int(float(s) * MB) for s in args.sizes_mb.split(",")]
  if len(sizes) < 2:
    parser.error("--sizes_mb needs two sizes or more (a link is latency + size / bandwidth)")
  t0 = time.perf_counter()
  load0 = os.getloadavg()
  init_ray(num_cpus=8)
  try:
    rows = measure(sizes, args.runs, log=lambda m: print(m, file=sys.stderr))
  finally:
    ray.shutdown()
  os.makedirs(args.out, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  head = {"kind": "measured", "device": jax.devices()[0].device_kind, "runs": args.runs,
          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "load_avg": [round(x, 2) for x in load0]}
  links_path = os.path.join(args.out, "links.json")
  local_path = os.path.join(args.out, "links_inprocess.json")
  with open(links_path, "w") as f:
    json.dump({**head, "rows": rows}, f, indent=1)
  # The local runtime's transfers stay in one process: its prompt KV and replica writes are
  # copies between host buffers, its loads device_puts.
  local = {"prompt_kv": "memcpy", "replica_delta": "memcpy", "swap_in": "device_put",
           "weights": "file"}
  with open(local_path, "w") as f:
    json.dump({**head, "rows": [dict(r, reference=False) for r in rows
                                if local[r["path"]] == r["transport"]]}, f, indent=1)
  links = cm.calibrate_links({"rows": rows})
  table: dict = {}
  for r in rows:
    table.setdefault(r["path"], {}).setdefault(r["transport"], {})[
        f"{r['bytes'] / MB:g}MB"] = {"GBps": r["GBps"], "ms": r["seconds"] * 1e3}
  big = max(sizes)
  memcpy = {r["path"]: r["GBps"] for r in rows if r["transport"] == "memcpy" and
            r["bytes"] == big}["prompt_kv"]
  cross = lambda path: {r["transport"]: r["GBps"] for r in rows  # noqa: E731
                        if r["transport"] in CROSS and r["path"] == path and r["bytes"] == big}
  best_cross = cross("replica_delta")
  out = {"table": links_path, "links": table,
         "calibrated": {p: {"link": l.name, "GBps": l.bandwidth / 1e9, "latency_ms": l.latency * 1e3}
                        for p, l in links.items()},
         f"memcpy_fraction_{big // MB}MB": {t: v / memcpy for t, v in best_cross.items()},
         f"prompt_kv_memcpy_fraction_{big // MB}MB": {t: v / memcpy for t, v in
                                                     cross("prompt_kv").items()}}
  if not args.no_serve:
    out.update(serve_comparison(local_path, log=lambda m: print(m, file=sys.stderr)))
  out.update(wall_s=time.perf_counter() - t0, load_avg_start=list(load0),
             load_avg_end=list(os.getloadavg()))
  # Which figures are measured on this machine and which are modelled (the paced run sleeps to
  # the cost model; the simulator replays it).
  out["kind"] = {**{k: "measured" for k in out if k not in (
      "paced_makespan_s", "predicted_makespan_s", "calibrated_vs_real_rel_error",
      "paced_vs_real_rel_error", "calibrated", "table", "paced_links_table")}}
  out["kind"].update({k: "modelled" for k in (
      "paced_makespan_s", "predicted_makespan_s", "calibrated_vs_real_rel_error",
      "paced_vs_real_rel_error", "calibrated") if k in out})
  print(json.dumps(out))


if __name__ == "__main__":
  main()
