"""Greedy decoding speed of this project against Hugging Face transformers (torch, CPU).

  python benchmarks/decode_vs_hf.py [--runs=3] [--batches=1,8] [--threads=both|single|multi]

Method. One process builds an OPT-125M-shaped `transformers.OPTForCausalLM` with random weights
(its own init, float32) and maps its state dict to this project's params
(`params_from_state_dict`), so both sides hold the same weights. Per batch size B, both sides
generate 128 new tokens greedily from the same random 128-token prompts (no EOS stop):

  * ours: `make_steps` prefill, argmax, then `make_decode_n` (127 decode steps in one jitted
    loop), into a cache of 256 positions;
  * torch: `model.generate(do_sample=False)` with its default dynamic cache and attention.

A run of a side is timed from the prompt to the last token on the host; tokens/s = B * 128 / run
time. The two sides alternate run by run (each `--runs` rounds, after a warm-up round that also
compiles), because other jobs share this machine's cores; every figure is a median over rounds.
Thread settings (`--threads=both`, the default): two worker processes (dejavu_jax/studies/
paired.py), one single-threaded (XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1", torch.set_num_threads(1), one thread for the bandwidth probe,
the process pinned to one CPU: XLA:CPU's thread pool ignores the flags)
and one multi-threaded (the defaults: one thread per core), asked for rounds in turn; the JSON
has a `single` and a `multi` section and the load average before each round.

Bandwidth. A decode step must read every weight except the position table, plus the valid keys
and values of every layer (positions <= the step's own; averaged over the 127 steps). Bytes per
step / our step time (decode-loop time / 127) is the achieved bandwidth. The limit it is set
against is measured in each round with the worker's threads on a 256 MiB buffer: memcpy
(bytes read + written per second, the STREAM convention) and a plain read (a sum; bytes read per
second); roofline_fraction = achieved / the larger of the two. (Our
attention reads all 256 cache positions and masks; the useful bytes above do not count the
masked ones, so the fraction is conservative.) torch's step time is its run time minus a
prefill-only forward timed in the same round, over 127.

The last stdout line is one JSON object.
"""

import concurrent.futures
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from dejavu_jax.config import get_model_config  # noqa: E402
from dejavu_jax.kv.cache import init_cache_for  # noqa: E402
from dejavu_jax.models.convert import params_from_state_dict  # noqa: E402
from dejavu_jax.models.generate import make_decode_n, make_steps  # noqa: E402
from dejavu_jax.studies import paired  # noqa: E402
from tests.hf_util import hf_config  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 3, "timed rounds (median reported); each runs both sides")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "prompt tokens per row")
_NEW = flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
_MODEL = flags.DEFINE_string("model", "opt_125m", "model preset (OPT family)")
_THREADS = flags.DEFINE_enum("threads", "both", ["both", *paired.MODES],
                             "single: XLA and torch on one thread; multi: their defaults; both: "
                             "one worker process each, rounds interleaved")
_WORKER = flags.DEFINE_string("worker", "", "internal: run as the paired harness's worker")

_MEMCPY_BYTES = 256 << 20


def _bandwidth(fn, arrays, threads: int, nbytes: int, reps: int) -> float:
  """Median GB/s of fn applied to each array of `arrays` in parallel threads."""
  times = []
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for _ in range(reps):
      t0 = time.perf_counter()
      list(pool.map(fn, *arrays))  # numpy releases the GIL in copies and reductions
      times.append(time.perf_counter() - t0)
  return nbytes / statistics.median(times) / 1e9


def memory_gbps(src: np.ndarray, dst: np.ndarray, threads: int, reps: int = 5):
  """(memcpy, read) bandwidth in GB/s with `threads` threads on disjoint slices.

  memcpy counts the bytes read plus the bytes written (the STREAM "copy" convention: src -> dst
  moves 2 * nbytes through memory); read is a sum over src (bytes read).
  """
  srcs, dsts = np.array_split(src, threads), np.array_split(dst, threads)
  copy = _bandwidth(np.copyto, (dsts, srcs), threads, 2 * src.nbytes, reps)
  read = _bandwidth(np.sum, (srcs,), threads, src.nbytes, reps)
  return copy, read


class Ours:
  """This project's side: prefill, then one jitted loop of decode steps."""

  def __init__(self, cfg, params, prompts: np.ndarray, new_tokens: int, max_len: int):
    self.cfg, self.params, self.max_len = cfg, params, max_len
    self.tokens = jnp.asarray(prompts, jnp.int32)                                # [B, P]
    b, p = prompts.shape
    self.positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    self.next_pos = jnp.full((b,), p, jnp.int32)
    self.prefill, _ = make_steps(cfg)
    self.decode_n = make_decode_n(cfg, new_tokens - 1)
    self.key = jax.random.key(0)

  def run(self):
    """-> (new tokens [B, N], seconds total, seconds of the decode loop)."""
    t0 = time.perf_counter()
    cache = init_cache_for(self.cfg, self.cfg.num_layers, self.tokens.shape[0], self.max_len)
    cache, logits = self.prefill(self.params, cache, self.tokens, self.positions)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)                        # [B]
    first.block_until_ready()
    t1 = time.perf_counter()
    _, new = self.decode_n(self.params, cache, first, self.next_pos, self.key)
    new = np.asarray(new)
    t2 = time.perf_counter()
    return np.concatenate([np.asarray(first)[:, None], new], axis=1), t2 - t0, t2 - t1


class Torch:
  """transformers' side: `generate` (greedy), and a prefill-only forward for its step time."""

  def __init__(self, model, prompts: np.ndarray, new_tokens: int):
    self.model, self.new_tokens = model, new_tokens
    self.ids = torch.as_tensor(prompts, dtype=torch.long)
    self.mask = torch.ones_like(self.ids)

  def run(self):
    t0 = time.perf_counter()
    with torch.no_grad():
      out = self.model.generate(self.ids, attention_mask=self.mask, do_sample=False,
                                max_new_tokens=self.new_tokens)
    t1 = time.perf_counter()
    return out[:, self.ids.shape[1]:].numpy(), t1 - t0

  def prefill_seconds(self) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
      self.model(self.ids, attention_mask=self.mask, use_cache=True)
    return time.perf_counter() - t0


def step_bytes(cfg, params, batch: int, prompt_len: int, new_tokens: int) -> tuple[int, float]:
  """(weight bytes, mean valid KV bytes) a decode step reads; see the module docstring."""
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  weights -= params["embed_positions"]["embedding"].nbytes
  # The step at position p reads keys and values 0..p of every layer (p written by itself).
  valid = np.mean([p + 1 for p in range(prompt_len, prompt_len + new_tokens - 1)])
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cfg.dtype_bytes
  return weights, float(batch * valid * per_token)


def setup():
  """Both sides of every batch size, with the same weights and prompts."""
  cfg = get_model_config(_MODEL.value)
  prompt_len, new_tokens = _PROMPT.value, _NEW.value
  max_len = 1 << (prompt_len + new_tokens - 1).bit_length()
  batches = [int(b) for b in _BATCHES.value]
  torch.manual_seed(0)
  model = transformers.OPTForCausalLM(hf_config(cfg)).eval()
  model.generation_config.eos_token_id = None  # both sides generate all new_tokens
  model.generation_config.pad_token_id = cfg.pad_token_id
  params = params_from_state_dict(
      cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()})
  rng = np.random.default_rng(0)
  sides = {}
  for b in batches:
    prompts = rng.integers(3, cfg.vocab_size, size=(b, prompt_len))
    sides[b] = Ours(cfg, params, prompts, new_tokens, max_len), Torch(model, prompts, new_tokens)
  src = np.ones(_MEMCPY_BYTES // 4, np.float32)
  return dict(cfg=cfg, params=params, sides=sides, batches=batches, src=src,
              dst=np.zeros_like(src))


def one_round(st: dict, threads: int) -> dict:
  """One round: the memory bandwidth, then per batch size ours and torch back to back."""
  mc, rd = memory_gbps(st["src"], st["dst"], threads)
  rec = {"memcpy": mc, "read": rd}
  for b in st["batches"]:
    ours, hf = st["sides"][b]
    toks, total, decode = ours.run()
    hf_toks, hf_total = hf.run()
    weights, kv = step_bytes(st["cfg"], st["params"], b, _PROMPT.value, _NEW.value)
    rec[str(b)] = dict(ours=total, ours_decode=decode, hf=hf_total,
                       hf_prefill=hf.prefill_seconds(), match=float(np.mean(toks == hf_toks)),
                       weights=weights, kv=kv)
  return rec


def summarize(records: list[dict], batches, new_tokens: int) -> dict:
  """Medians over rounds of one thread mode."""
  med = statistics.median
  limit = max(med(r["memcpy"] for r in records), med(r["read"] for r in records))
  out = {"memcpy_GBps": round(med(r["memcpy"] for r in records), 2),
         "read_GBps": round(med(r["read"] for r in records), 2)}
  steps = new_tokens - 1
  for b in batches:
    rs = [r[str(b)] for r in records]
    ours_tps = med(b * new_tokens / r["ours"] for r in rs)
    hf_tps = med(b * new_tokens / r["hf"] for r in rs)
    step_s = med(r["ours_decode"] for r in rs) / steps
    hf_step_s = med((r["hf"] - r["hf_prefill"]) / steps for r in rs)
    nbytes = rs[0]["weights"] + rs[0]["kv"]
    achieved = nbytes / step_s / 1e9
    out.update({
        f"speedup_b{b}": round(ours_tps / hf_tps, 3),
        f"roofline_fraction_b{b}": round(achieved / limit, 3),
        f"ours_tok_s_b{b}": round(ours_tps, 2),
        f"hf_tok_s_b{b}": round(hf_tps, 2),
        f"step_ms_b{b}": round(step_s * 1e3, 2),
        f"hf_step_ms_b{b}": round(hf_step_s * 1e3, 2),
        f"bytes_per_step_b{b}": int(nbytes),
        f"kv_bytes_per_step_b{b}": int(rs[0]["kv"]),
        f"achieved_GBps_b{b}": round(achieved, 2),
        f"hf_achieved_GBps_b{b}": round(nbytes / hf_step_s / 1e9, 2),
        f"greedy_token_match_b{b}": round(med(r["match"] for r in rs), 4),
    })
  return out


def main(argv):
  if _WORKER.value:   # one thread mode's process, driven by the paired harness
    threads = 1 if _WORKER.value == "single" else (os.cpu_count() or 1)
    if _WORKER.value == "single":
      torch.set_num_threads(1)
    st = setup()
    paired.serve_rounds(lambda: one_round(st, threads))
    return
  modes = paired.MODES if _THREADS.value == "both" else (_THREADS.value,)
  del argv
  args = [a for a in sys.argv[1:] if not a.startswith("--threads")]
  records, loads = paired.run_paired(os.path.abspath(__file__), args, _RUNS.value, modes)
  batches = [int(b) for b in _BATCHES.value]
  result = {"model": _MODEL.value, "prompt_len": _PROMPT.value, "new_tokens": _NEW.value,
            "runs": _RUNS.value, "cores": os.cpu_count(),
            # Other jobs share this machine's cores: the 1-minute load average before each round.
            "load_avg_per_round": loads, "load_avg_median": statistics.median(loads)}
  for mode in modes:
    result[mode] = summarize(records[mode], batches, _NEW.value)
  # Real decoding, both sides timed on this machine (the roofline limit is this machine's
  # measured copy bandwidth): every figure is measured.
  result["kind"] = {m: "measured" for m in modes}
  print(json.dumps(result))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  app.run(main)
