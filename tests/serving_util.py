"""Shared oracle of the serving tests: the plain single-device greedy run."""

from dejavu_jax.models.generate import generate


def greedy_references(cfg, params, reqs, max_len: int = 64) -> dict[int, list[int]]:
  """request_id -> greedy tokens of one single-device batched run. One batched call (mixed
  lengths in a batch equal each alone, tests/test_decoder.py) keeps the compile count low."""
  longest = max(r.max_new_tokens for r in reqs)
  outs = generate(cfg, params, [r.prompt for r in reqs], longest, eos_token_id=-1,
                  max_len=max_len)
  return {r.request_id: o[:r.max_new_tokens] for r, o in zip(reqs, outs)}
