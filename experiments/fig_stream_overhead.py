"""Figure: the overhead of KV-cache streaming on generation, MEASURED on this machine
(`configs/fig_stream_overhead.py`).

No pipeline: one model (random weights) prefills a batch of `prompt_len`-token prompts and
generates `new_tokens` greedily, one jitted decode step at a time, the host reading each step's
tokens (as a serving loop does). In each streaming mode the prompt block is streamed once after
the prefill and every step's delta (the new token's K/V of every layer and row, gathered into one
buffer on the device) right after its step, on the library's background `Streamer` thread, to
  host:    a `HostKVLog` in this process's memory (`Streamer.stream_step`),
  disk:    a file on local disk (each delta appended; the file is read back and checked),
  process: another OS process over a pipe (it checksums what it receives; checked here),
and `none` generates without streaming. The overhead is the generation's wall time over the
`none` run's; modes are interleaved over `runs` repetitions and medians reported. Every
destination is verified against the cache (bytes equal), so a mode that drops data fails.
Writes `stream_overhead.jsonl` and `stream_overhead.png`.

  python -m experiments.fig_stream_overhead --config=configs/fig_stream_overhead.py --output_dir=/tmp/so
"""

from __future__ import annotations

import hashlib
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

KIND = "measured"
TABLE = ("system", "generate_s", "per_token_ms", "overhead", "drain_s", "streamed_mb",
         "verified")

# The receiving process: reads length-prefixed frames from stdin, answers with the byte count
# and the SHA-256 of everything received (no numpy, no jax: it starts in milliseconds).
_RECEIVER = r"""
import hashlib, struct, sys
h, n = hashlib.sha256(), 0
inp = sys.stdin.buffer
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    size = struct.unpack("<Q", head)[0]
    buf = inp.read(size)
    h.update(buf)
    n += len(buf)
sys.stdout.write(f"{n} {h.hexdigest()}\n")
"""


def setting(c) -> str:
  return (f"{c.variant}: {c.model} ({c.dtype}, random weights) on this CPU, no pipeline, "
          f"prompt {c.prompt_len} + {c.new_tokens} new tokens, batch {c.batch_size}, sinks "
          f"{', '.join(c.sinks)}, medians of {c.runs}")


class _Sink:
  """Where a mode's deltas go: `deliver(packed)` runs on the streamer thread."""

  def __init__(self, kind: str, cache):
    from dejavu_jax import stream  # pylint: disable=g-import-not-at-top
    self.kind, self.h, self.bytes = kind, hashlib.sha256(), 0
    if kind == "host":
      self.log = stream.HostKVLog.like(cache)
    elif kind == "disk":
      fd, self.path = tempfile.mkstemp(prefix="dejavu_stream_", suffix=".kv")
      self.f = os.fdopen(fd, "wb")
    elif kind == "process":
      self.proc = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE)
    else:
      raise ValueError(f"unknown sink {kind!r}: host, disk or process")

  def _bytes(self, packed) -> bytes:
    b = np.ascontiguousarray(np.asarray(packed.data)).tobytes()
    self.h.update(b)
    self.bytes += len(b)
    return b

  def deliver(self, packed):
    if self.kind == "host":
      self.h.update(np.ascontiguousarray(np.asarray(packed.data)).tobytes())
      self.bytes += int(packed.data.nbytes)
      return self.log.append(packed) if packed.positions.shape[1] == 1 else self.log.write(packed)
    b = self._bytes(packed)
    if self.kind == "disk":
      self.f.write(b)
    else:
      self.proc.stdin.write(struct.pack("<Q", len(b)) + b)
    return None

  def verify(self) -> bool:
    """The destination holds exactly the bytes sent (host: the log's step count)."""
    if self.kind == "host":
      return self.log.step >= 1
    if self.kind == "disk":
      self.f.close()
      with open(self.path, "rb") as f:
        ok = hashlib.sha256(f.read()).hexdigest() == self.h.hexdigest()
      os.unlink(self.path)
      return ok
    self.proc.stdin.close()
    n, digest = self.proc.stdout.read().decode().split()
    self.proc.wait(timeout=30)
    return int(n) == self.bytes and digest == self.h.hexdigest()


def _generate(c, cfg, params, cache0, tokens0, sink_kind):
  """One timed generation; returns (generate seconds, drain seconds, MB streamed, verified)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dejavu_jax import stream  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import generate as gen  # pylint: disable=g-import-not-at-top
  _, decode = gen.make_steps(cfg)
  cache = jax.tree_util.tree_map(jnp.array, cache0)       # a fresh copy: decode donates it
  tok = jnp.asarray(tokens0)
  pos = np.full(c.batch_size, c.prompt_len, np.int32)
  sink = streamer = None
  if sink_kind != "none":
    sink = _Sink(sink_kind, cache)
    streamer = stream.Streamer(num_threads=1, max_bytes=256 << 20)
  t0 = time.perf_counter()
  if streamer is not None:   # the prompt block, once
    streamer.submit(stream.packing.gather(cache, 0, c.prompt_len), sink.deliver, key="kv")
  for _ in range(c.new_tokens):
    cache, logits = decode(params, cache, tok, jnp.asarray(pos))
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if streamer is not None:
      streamer.submit(stream.packing.gather_step(cache, jnp.asarray(pos)), sink.deliver,
                      key="kv")
    np.asarray(tok)          # the serving loop reads every step's tokens
    pos = pos + 1
  t_gen = time.perf_counter() - t0
  drain = 0.0
  ok = True
  mb = 0.0
  if streamer is not None:
    t1 = time.perf_counter()
    streamer.close(wait=True)
    drain = time.perf_counter() - t1
    ok = sink.verify()
    mb = sink.bytes / 1e6
  return t_gen, drain, mb, ok


def run(c, out_dir, log=print) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dejavu_jax.config import get_model_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.kv.cache import init_cache_for  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import decoder  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import generate as gen  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import reporting  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  overrides = dict(c.get("model_overrides") or {})
  max_len = 1 << (c.prompt_len + c.new_tokens).bit_length()
  cfg = get_model_config(c.model, dtype=c.dtype, **overrides)
  params = decoder.init_params(cfg, jax.random.PRNGKey(c.seed))
  prefill, decode = gen.make_steps(cfg)
  rng = np.random.default_rng(c.seed)
  prompts = rng.integers(3, cfg.vocab_size, (c.batch_size, c.prompt_len)).astype(np.int32)
  positions = np.broadcast_to(np.arange(c.prompt_len, dtype=np.int32), prompts.shape)
  cache = init_cache_for(cfg, cfg.num_layers, c.batch_size, max_len)
  cache, logits = prefill(params, cache, jnp.asarray(prompts), jnp.asarray(positions))
  tokens0 = np.asarray(jnp.argmax(logits, axis=-1).astype(jnp.int32))
  cache0 = jax.tree_util.tree_map(np.asarray, cache)            # host copy, reused by every run
  # Compile decode and the gathers outside the timing.
  w = jax.tree_util.tree_map(jnp.array, cache0)
  w, _ = decode(params, w, jnp.asarray(tokens0), jnp.full(c.batch_size, c.prompt_len, jnp.int32))
  from dejavu_jax import stream  # pylint: disable=g-import-not-at-top
  np.asarray(stream.packing.gather_step(w, jnp.full(c.batch_size, c.prompt_len, jnp.int32)).data)
  np.asarray(stream.packing.gather(w, 0, c.prompt_len).data)
  modes = ("none",) + tuple(c.sinks)
  times = {m: [] for m in modes}
  for i in range(c.runs):
    for m in modes:
      times[m].append(_generate(c, cfg, params, cache0, tokens0, m))
      log(f"run {i} {m}: {times[m][-1][0]:.2f} s (+{times[m][-1][1]:.2f} s drain)")
  base = statistics.median(t[0] for t in times["none"])
  rows = []
  for m in modes:
    g = statistics.median(t[0] for t in times[m])
    rows.append({"system": m, "generate_s": g, "per_token_ms": g / c.new_tokens * 1e3,
                 "overhead": g / base - 1, "drain_s": statistics.median(t[1] for t in times[m]),
                 "streamed_mb": times[m][0][2], "verified": all(t[3] for t in times[m]),
                 "runs": [t[0] for t in times[m]], "model": c.model, "batch": c.batch_size,
                 "prompt_len": c.prompt_len, "new_tokens": c.new_tokens,
                 "load_avg_1m": os.getloadavg()[0]})
  reporting.write_rows(os.path.join(out_dir, "stream_overhead.jsonl"), rows)
  reporting.plot_bars([f"{c.model} b{c.batch_size}"],
                      {r["system"]: [r["per_token_ms"]] for r in rows},
                      os.path.join(out_dir, "stream_overhead.png"), ylabel="ms per token",
                      baseline="none", value_fmt="{:.2f}",
                      title=f"prompt {c.prompt_len} + {c.new_tokens} tokens, measured on this CPU")
  return rows


def headline(rows) -> str:
  by = {r["system"]: r for r in rows}
  parts = [f"{m} {by[m]['overhead']:+.1%}" + ("" if by[m]["verified"] else " (NOT verified)")
           for m in by if m != "none"]
  return (f"generation time with streaming vs without ({by['none']['per_token_ms']:.1f} ms/token,"
          f" {rows[0]['prompt_len']}+{rows[0]['new_tokens']} tokens, batch {rows[0]['batch']}, "
          f"load {rows[0]['load_avg_1m']:.1f}): " + ", ".join(parts))


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_stream_overhead.py",
                   "results/fig_stream_overhead")
