"""Greedy decoding speed of the real SmolLM2-135M-Instruct: this project against transformers.

  python benchmarks/decode_llama.py [--runs=3] [--batches=1,8] [--new_tokens=128]
      [--threads=both|single|multi]

Method. One process loads the packaged GGUF file once (models/gguf.py: Q4_1/Q8_0 dequantized to
float32, Hugging Face names) and gives the same float32 tensors to both sides: this project's
Flax Llama (`load_llama_gguf`'s path: the llama family converter) and transformers'
`LlamaForCausalLM` (CPU torch). The prompts are the shipped `data/prompts.txt` through the chat
template (cycled to fill a batch of B rows; 35-45 tokens each). Per batch size B both sides
generate `new_tokens` tokens greedily per row with no EOS stop:

  * ours: `make_steps` prefill (rows right-padded to the longest prompt rounded up to 8, padding
    at position -1), argmax, then
    `make_decode_n` (new_tokens - 1 decode steps in one jitted loop), cache of 256 positions;
  * torch: `model.generate(do_sample=False)` (rows left-padded with an attention mask, its default
    dynamic cache and attention).

A run is timed from the prompt to the last token on the host; tokens/s = B * new_tokens / run
time (`speedup_cpu_time_b*`: the same ratio from each side's process CPU time, which a loaded
machine inflates far less than the wall time when each side has one thread). The sides alternate run by run (a warm-up round first, which also compiles), because
other jobs share this machine's cores; every figure is a median over `--runs` rounds. Thread
settings (`--threads=both`, the default): two worker processes (dejavu_jax/studies/paired.py), one
single-threaded (XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
torch.set_num_threads(1), the process pinned to one CPU: XLA:CPU's thread pool ignores the flags)
and one with the defaults (or `--torch_threads`), asked for rounds in
turn; the JSON has a `single` and a `multi` section and the load average before each round.
`greedy_token_match`
is the fraction of positions, up to each row's first end-of-turn token on the torch side, where
the two sides chose the same token (1.0 unless a near-tie flips an argmax).

The last stdout line is one JSON object.
"""

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
from transformers.initialization import no_init_weights  # noqa: E402

from dejavu_jax.kv.cache import init_cache_for  # noqa: E402
from dejavu_jax.models import gguf  # noqa: E402
from dejavu_jax.models.generate import make_decode_n, make_steps, pad_prompts  # noqa: E402
from dejavu_jax.models.tokenizer import encode_prompts, read_prompts  # noqa: E402
from dejavu_jax.studies import paired  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 3, "timed rounds (median reported); each runs both sides")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
_NEW = flags.DEFINE_integer("new_tokens", 128, "tokens generated per row")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch intra-op threads (0: torch's default, one per core). On a loaded "
    "machine 1 can be faster: torch's OpenMP threads wait on each other at every op")
_THREADS = flags.DEFINE_enum("threads", "both", ["both", *paired.MODES],
                             "single: XLA and torch on one thread; multi: their defaults (or "
                             "--torch_threads); both: one worker process each, rounds interleaved")
_WORKER = flags.DEFINE_string("worker", "", "internal: run as the paired harness's worker")
_MAX_LEN = 256


class Ours:
  """This project's side: prefill, then one jitted loop of decode steps."""

  def __init__(self, cfg, params, prompts: list[list[int]], new_tokens: int):
    self.cfg, self.params = cfg, params
    # The batch's longest prompt rounded up to 8 positions: torch also pads only to the longest
    # prompt, so both sides prefill the same positions (a power-of-two bucket, the engine's
    # compile-cache choice, prefilled 64 positions for a 37-token prompt: ~75 ms more per run).
    bucket = -(-max(len(p) for p in prompts) // 8) * 8
    tokens, positions = pad_prompts(prompts, bucket, cfg.pad_token_id)
    self.tokens, self.positions = jnp.asarray(tokens), jnp.asarray(positions)    # [B, T]
    self.next_pos = jnp.asarray([len(p) for p in prompts], jnp.int32)            # [B]
    self.prefill, _ = make_steps(cfg)
    self.decode_n = make_decode_n(cfg, new_tokens - 1)
    self.key = jax.random.key(0)

  def run(self):
    """-> (new tokens [B, N], seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cache = init_cache_for(self.cfg, self.cfg.num_layers, self.tokens.shape[0], _MAX_LEN)
    cache, logits = self.prefill(self.params, cache, self.tokens, self.positions)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)                        # [B]
    _, new = self.decode_n(self.params, cache, first, self.next_pos, self.key)
    new = np.asarray(new)
    t1, c1 = time.perf_counter(), time.process_time()
    return np.concatenate([np.asarray(first)[:, None], new], axis=1), t1 - t0, c1 - c0


class Torch:
  """transformers' side: `generate` (greedy) on left-padded rows."""

  def __init__(self, model, prompts: list[list[int]], new_tokens: int, pad_id: int):
    self.model, self.new_tokens = model, new_tokens
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
      ids[i, width - len(p):] = p
      mask[i, width - len(p):] = 1
    self.ids, self.mask = torch.as_tensor(ids), torch.as_tensor(mask)

  def run(self):
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
      out = self.model.generate(self.ids, attention_mask=self.mask, do_sample=False,
                                max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens)
    t1, c1 = time.perf_counter(), time.process_time()
    return out[:, self.ids.shape[1]:].numpy(), t1 - t0, c1 - c0


def token_match(ours: np.ndarray, hf: np.ndarray, stop: int) -> float:
  """Fraction of equal tokens, per row up to (and including) torch's first `stop` token."""
  same = total = 0
  for a, b in zip(ours, hf):
    n = int(np.argmax(b == stop)) + 1 if (b == stop).any() else len(b)
    same += int((a[:n] == b[:n]).sum())
    total += n
  return same / total


def torch_model(hf_cfg: dict, tensors: dict):
  cfg = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if not k.startswith("_")})
  with no_init_weights():  # every weight is assigned below: skip the random init
    model = transformers.LlamaForCausalLM(cfg).eval()
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False, assign=True)
  if unexpected or set(missing) - {"lm_head.weight"}:
    raise RuntimeError(f"torch model: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  if model.lm_head.weight is not model.model.embed_tokens.weight:
    raise RuntimeError("torch model: LM head not tied to the embeddings")
  model.generation_config.eos_token_id = None  # both sides generate all new_tokens
  model.generation_config.pad_token_id = hf_cfg["pad_token_id"]
  return model


def setup():
  """Both sides of every batch size from the one GGUF file."""
  new_tokens = _NEW.value
  batches = [int(b) for b in _BATCHES.value]
  hf_cfg, tensors, tok = gguf.load_gguf()
  cfg, params, _ = gguf.load_smollm2("float32")
  model = torch_model(hf_cfg, tensors)
  texts = read_prompts()
  sides = {}
  for b in batches:
    prompts = encode_prompts(tok, [texts[i % len(texts)] for i in range(b)])
    if max(len(p) for p in prompts) + new_tokens > _MAX_LEN:
      raise ValueError(f"prompts + {new_tokens} new tokens exceed the {_MAX_LEN}-position cache")
    sides[b] = (Ours(cfg, params, prompts, new_tokens),
                Torch(model, prompts, new_tokens, cfg.pad_token_id), prompts)
  return dict(cfg=cfg, tok=tok, sides=sides, batches=batches)


def one_round(st: dict) -> dict:
  """One round: per batch size, ours then torch, back to back."""
  rec = {}
  for b in st["batches"]:
    ours, hf, prompts = st["sides"][b]
    toks, total, cpu = ours.run()
    hf_toks, hf_total, hf_cpu = hf.run()
    rec[str(b)] = dict(ours=total, hf=hf_total, ours_cpu=cpu, hf_cpu=hf_cpu,
                       match=token_match(toks, hf_toks, st["tok"].eos_token_id),
                       prompt_tokens=[len(p) for p in prompts])
  return rec


def summarize(records: list[dict], batches, new_tokens: int) -> dict:
  """Medians over rounds of one thread mode."""
  med = statistics.median
  out = {}
  for b in batches:
    rs = [r[str(b)] for r in records]
    ours_tps = med(b * new_tokens / r["ours"] for r in rs)
    hf_tps = med(b * new_tokens / r["hf"] for r in rs)
    out.update({
        f"speedup_b{b}": round(ours_tps / hf_tps, 3),
        # CPU seconds of each side's process per run: with one thread per side this is the
        # work done, which other jobs on the cores inflate far less than the wall time.
        f"speedup_cpu_time_b{b}": round(med(r["hf_cpu"] / r["ours_cpu"] for r in rs), 3),
        f"ours_tok_s_b{b}": round(ours_tps, 2),
        f"hf_tok_s_b{b}": round(hf_tps, 2),
        f"prompt_tokens_b{b}": rs[0]["prompt_tokens"],
        f"greedy_token_match_b{b}": round(med(r["match"] for r in rs), 4),
    })
  return out


def main(argv):
  del argv
  if _WORKER.value:   # one thread mode's process, driven by the paired harness
    if _WORKER.value == "single":
      torch.set_num_threads(1)
    elif _TORCH_THREADS.value:
      torch.set_num_threads(_TORCH_THREADS.value)
    st = setup()
    paired.serve_rounds(lambda: one_round(st))
    return
  modes = paired.MODES if _THREADS.value == "both" else (_THREADS.value,)
  args = [a for a in sys.argv[1:] if not a.startswith("--threads")]
  records, loads = paired.run_paired(os.path.abspath(__file__), args, _RUNS.value, modes)
  batches = [int(b) for b in _BATCHES.value]
  result = {"model": "smollm2_135m", "weights": "GGUF Q4_1 dequantized to float32 (both sides)",
            "new_tokens": _NEW.value, "runs": _RUNS.value, "max_len": _MAX_LEN,
            "cores": os.cpu_count(),
            # Other jobs share this machine's cores: the 1-minute load average before each round.
            "load_avg_per_round": loads, "load_avg_median": statistics.median(loads)}
  for mode in modes:
    result[mode] = summarize(records[mode], batches, _NEW.value)
  # Real decoding, both sides timed on this machine: every figure is measured.
  result["kind"] = {m: "measured" for m in modes}
  print(json.dumps(result))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  app.run(main)
