"""The KV-cache streaming library (the paper's DéjàVuLib, in JAX).

This package owns every movement of KV-cache bytes: between a device cache and one contiguous
buffer (packing.py), between device and host memory or two devices (transport.py), into and out
of host KV logs (hostlog.py), between pipelines split differently (route.py), on background
threads (streamer.py), and the mode switch of the paper's streaming ablation (ablation.py).

The unit that moves is a `Packed` slice: data [2, Ls, Bs, T, H, K] (keys, values) and positions
[Bs, T] (where each column lands in its row; -1 = unused), named by global layers and batch rows.

Typical calls (each one line at the call site):

    # Replication, after every decode step (cache about to be donated by the next step: the
    # gather copies the delta first, so that is safe). The ticket's result is the log step.
    ticket = streamer.stream_step(cache, positions, replica_log, key=(dst_worker, mb),
                                  layer_base=stage_start, on_done=ack)

    # The prompt block, once, into a host log (replication or swapping).
    streamer.stream_tokens(cache, 0, prompt_len, log, key=(dst_worker, mb), layer_base=start)

    # Disaggregation: prompt stage s of pipeline `src` into the token workers' host logs.
    tickets = stream_out_to_logs(streamer, cache, s, src_splits, dst_splits, logs, size=prompt_len)

    # Receiver side: host log (any acknowledged step) -> device cache; or packets -> cache.
    cache = log.read(step, device=dev)
    cache = stream_in(cache, packets, stage, dst_splits)          # cache is donated

    # One contiguous buffer, and back (cache donated by scatter).
    packed = gather(cache, start, size, layers=(a, b), rows=(r0, r1))
    cache = scatter(cache, packed)

Public API:
  gather(cache, start, size, layers=None, rows=None, *, layer_base=0) -> Packed
  gather_step(cache, positions, layers=None, rows=None, *, layer_base=0) -> Packed
  scatter(cache, packed, *, layer_base=0) -> KVCache                      (cache donated)
  flush(x, out=None, method="auto") -> np.ndarray; start_flush(x, method) -> handle
  fetch(host, device) -> jax.Array; copy_to(x, device) -> jax.Array
  flush_packed / fetch_packed / copy_packed(packed, ...) -> Packed
  host_memory_kind(device) -> "pinned_host" | "unpinned_host" | None
  HostKVLog(L, B, S, H, K, dtype, *, layer_base=0) / HostKVLog.like(cache)
    .write(packed), .append(packed) -> step, .read(step=None, layers, rows, device) -> KVCache,
    .read_host(...) -> (kv, lengths), .reset(), .step, .lengths
  plan_routes(src, dst) -> [Route]   (even splits: dejavu_jax.partition.balanced_ranges)
  stream_out(cache, stage, src, dst, *, start=0, size=None, positions=None, rows=None)
    -> [(dst_stage, Packed)]
  stream_in(cache, packets, stage, dst) -> KVCache                         (cache donated)
  stream_out_to_logs(streamer, cache, stage, src, dst, logs, ...) -> [Ticket]
  reroute(caches, src, dst, empties, *, start=0, size=None, devices=None) -> [KVCache]
  Streamer(num_threads=2, max_bytes=1 GiB, max_items=1024, flush_method="auto")
    .submit(payload, deliver, key, *, donated=False, on_done=None, timeout=None) -> Ticket
    .stream_step(...), .stream_tokens(...), .drain(), .pending(), .clear_error(key),
    .close(wait=True, timeout=None, raise_on_error=True) -> ShutdownReport
  Ticket.wait(timeout=None) -> result (raises the transfer's error), .done(), .exception()
  ablation.MODES = ("naive", "buffered", "layerwise", "background"); prefill_and_stream,
    stream_prompt, stream_token_step
"""

from dejavu_jax.stream import ablation
from dejavu_jax.stream.packing import Packed, gather, gather_step, scatter, to_host
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.route import (Route, plan_routes, reroute, stream_in, stream_out,
                                     stream_out_to_logs)
from dejavu_jax.stream.streamer import (ShutdownReport, StreamClosed, StreamError, Streamer,
                                        Ticket)
from dejavu_jax.stream.transport import (copy_packed, copy_to, fetch, fetch_packed, flush,
                                         flush_packed, host_memory_kind, start_flush)

__all__ = ["Packed", "gather", "gather_step", "scatter", "to_host", "HostKVLog",
           "Route", "plan_routes", "reroute", "stream_in", "stream_out",
           "stream_out_to_logs", "ShutdownReport", "StreamClosed", "StreamError", "Streamer",
           "Ticket", "copy_packed", "copy_to", "fetch", "fetch_packed", "flush", "flush_packed",
           "host_memory_kind", "start_flush", "ablation"]
