"""Llama (grouped-query, RoPE, RMSNorm, SwiGLU) and BLOOM (ALiBi, fused qkv) logits equal
transformers' LlamaForCausalLM / BloomForCausalLM on the same random weights, loaded through a
`save_pretrained` directory: prefill with mixed prompt lengths, 16 decode steps, 2- and 4-stage
composition, and tensor-parallel stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.models.decoder import stage_apply, stage_params
from dejavu_jax.models.generate import make_steps, pad_prompts
from dejavu_jax.pipeline import plan as plan_lib
from dejavu_jax.pipeline.stage import StageProgram
from tests import hf_util

CONFIGS = {
    "llama_kv4": tiny_config("llama", num_kv_heads=4),                    # multi-head
    "llama_kv2": tiny_config("llama"),                                    # 2 queries per KV head
    "llama_kv1": tiny_config("llama", num_kv_heads=1),                    # multi-query
    "llama_tied": tiny_config("llama", tie_word_embeddings=True, rope_theta=1e5),  # SmolLM2-like
    # Llama-3.1's RoPE scaling; with K = 16 and an original context of 32 positions the
    # frequencies fall in all three bands (kept, interpolated, divided by the factor).
    "llama3_rope": tiny_config("llama", rope_scaling=(
        ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 32.0), ("rope_type", "llama3"))),
    "bloom": tiny_config("bloom"),
    # 6 heads: ALiBi's slopes for a head count that is not a power of two.
    "bloom_6heads": tiny_config("bloom", hidden_size=48, num_heads=6, ffn_dim=192),
}
LENGTHS = (11, 6)   # mixed prompt lengths: row 1 is padded in the prefill
DECODE = 16
TOL = 1e-4


# Every config gets the logits parity; each feature below runs on the configs where it can differ
# (not the whole cross product: the HF models and our compiles dominate this file's time).
ALL = list(CONFIGS)
# Both depths for each family: 2 stages (a stage of two layers past layer 0), 4 (middle stages
# with neither embedding nor head; the tied head three stages from the embedding).
COMPOSITION = [("llama_kv4", 2), ("llama_kv1", 2), ("llama3_rope", 2), ("bloom", 2),
               ("llama_kv2", 4), ("llama_tied", 4), ("bloom_6heads", 4)]
# Tensor split: grouped-query heads split across devices, the tied head sharded, ALiBi slopes of
# a non-power-of-two head count sliced per device, and the refusal for one KV head.
TENSOR = ["llama_kv2", "llama_tied", "bloom_6heads", "llama_kv1"]
# generate()'s greedy loop against HF generate: multi-query, the SmolLM2-like model, ALiBi.
GREEDY = ["llama_kv1", "llama_tied", "bloom_6heads"]
_BUILT = {}


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
  """Built once per config for the module (tests of one config need not run together)."""
  name = request.param
  if name not in _BUILT:
    cfg = CONFIGS[name]
    model, loaded_cfg, params = hf_util.saved_and_loaded(cfg, tmp_path_factory.mktemp(name))
    seq = np.random.default_rng(1).integers(0, cfg.vocab_size,
                                            (2, max(LENGTHS) + DECODE)).astype(np.int32)
    _BUILT[name] = (cfg, loaded_cfg, params, model, seq, hf_util.hf_logits(model, seq))
  return _BUILT[name]


@pytest.mark.parametrize("reference", ALL, indirect=True)
def test_config_roundtrip(reference):
  cfg, loaded_cfg, params, *_ = reference
  assert loaded_cfg.replace(name=cfg.name) == cfg
  assert ("lm_head" in params) == (not cfg.tie_word_embeddings)


def _prompts(seq):
  return [seq[i, :n] for i, n in enumerate(LENGTHS)]


def _decode_positions(step):
  return np.array([n + step for n in LENGTHS], np.int32)


def _check_prefill(got, want):
  """got [B, bucket, V] full prefill logits; each row compared on its own prompt positions."""
  for i, n in enumerate(LENGTHS):
    np.testing.assert_allclose(np.asarray(got)[i, :n], want[i, :n], atol=TOL, rtol=0)


@pytest.mark.parametrize("reference", ALL, indirect=True)
def test_prefill_and_decode_logits_match_hf(reference):
  _, cfg, params, _, seq, want = reference
  tokens, positions = pad_prompts(_prompts(seq), 16, cfg.pad_token_id)
  cache = init_cache_for(cfg, cfg.num_layers, 2, 64)
  cache, logits = jax.jit(lambda p, c, x, pos: stage_apply(cfg, 0, cfg.num_layers, p, c, x, pos))(
      params, cache, tokens, positions)
  _check_prefill(logits, want)
  _, decode = make_steps(cfg)
  for s in range(DECODE):
    pos = _decode_positions(s)
    cache, step_logits = decode(params, cache, jnp.asarray(seq[[0, 1], pos]), jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(step_logits), want[[0, 1], pos], atol=TOL, rtol=0,
                               err_msg=f"decode step {s}")


@pytest.mark.parametrize("reference,num_stages", COMPOSITION, indirect=["reference"])
def test_stage_composition_equals_whole_model(reference, num_stages):
  """stage_apply chained over the stage ranges (each stage its own params subset and cache)."""
  _, cfg, params, _, seq, want = reference
  ranges = plan_lib.balanced_ranges(cfg.num_layers, num_stages)
  subs = [stage_params(cfg, params, a, b) for a, b in ranges]
  caches = [init_cache_for(cfg, b - a, 2, 64) for a, b in ranges]
  tokens, positions = pad_prompts(_prompts(seq), 16, cfg.pad_token_id)

  def run(x, pos):
    for s, (a, b) in enumerate(ranges):
      caches[s], x = stage_apply(cfg, a, b, subs[s], caches[s], x, pos)
    return x

  _check_prefill(run(tokens, positions), want)
  for s in range(DECODE):
    pos = _decode_positions(s)
    out = run(seq[[0, 1], pos][:, None], pos[:, None])                          # [B, 1, V]
    np.testing.assert_allclose(np.asarray(out)[:, 0], want[[0, 1], pos], atol=TOL, rtol=0,
                               err_msg=f"decode step {s}")


@pytest.mark.parametrize("reference", TENSOR, indirect=True)
def test_tensor_parallel_stages_match_hf(reference):
  """2 stages x tensor 2 through the serving machinery (plan, mesh, StageProgram)."""
  _, cfg, params, _, seq, want = reference
  if cfg.num_kv_heads % 2:
    with pytest.raises(ValueError, match="divide the 4 attention heads and the 1 KV heads"):
      plan_lib.plan_stages(cfg, 2, tensor=2)
    return
  plan = plan_lib.plan_stages(cfg, 2, tensor=2)
  mesh = plan_lib.make_mesh(plan)
  progs = [StageProgram(cfg, plan, mesh, s) for s in range(2)]
  subs = [p.place_params(params) for p in progs]
  # The weights really are split: each tensor device holds half of a q projection.
  q = subs[0]["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (cfg.hidden_size, cfg.hidden_size // 2)
  caches = [p.new_cache(2, 64) for p in progs]
  tokens, positions = pad_prompts(_prompts(seq), 16, cfg.pad_token_id)

  def run(step, x, pos):
    for s, p in enumerate(progs):
      caches[s], x = getattr(p, step)(subs[s], caches[s], x, pos)
    return x

  logits = run("prefill", tokens, positions)                                    # [B, V]
  last = [n - 1 for n in LENGTHS]
  np.testing.assert_allclose(np.asarray(logits), want[[0, 1], last], atol=TOL, rtol=0)
  for s in range(DECODE):
    pos = _decode_positions(s)
    logits = run("decode", seq[[0, 1], pos], pos)
    np.testing.assert_allclose(np.asarray(logits), want[[0, 1], pos], atol=TOL, rtol=0,
                               err_msg=f"decode step {s}")


@pytest.mark.parametrize("reference", GREEDY, indirect=True)
def test_greedy_tokens_match_hf_generate(reference):
  _, cfg, params, model, _, _ = reference
  import torch  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
  prompt = [5, 17, 33, 40, 9]
  with torch.no_grad():
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=cfg.pad_token_id)[0, len(prompt):]
  assert generate(cfg, params, [prompt], 12, eos_token_id=-1)[0] == ref.tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family,stages,tensor", [("llama", 2, 2), ("bloom", 4, 1)])
def test_engine_tokens_identical_to_single_device(family, stages, tensor):
  """The serving engine over a pipeline (and tensor split) gives the single-device greedy tokens."""
  from dejavu_jax.models import init_params  # pylint: disable=g-import-not-at-top
  from dejavu_jax.serving.engine import PipelineEngine  # pylint: disable=g-import-not-at-top
  from dejavu_jax.workload import Request  # pylint: disable=g-import-not-at-top
  from tests.serving_util import greedy_references  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(family)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(stages)
  reqs = [Request(i, 0.002 * i, tuple(int(t) for t in rng.integers(3, cfg.vocab_size,
                                                                    int(rng.integers(1, 20)))),
                  int(rng.integers(1, 12))) for i in range(8)]
  serve = ServeConfig(num_stages=stages, tensor=tensor, microbatch_size=3, max_len=64)
  with PipelineEngine(cfg, params, serve) as eng:
    result = eng.serve(reqs)
  assert result.tokens() == greedy_references(cfg, params, reqs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replica_recovery_of_a_grouped_query_model():
  """Stage 1 of a GQA Llama dies mid-serving; ring replication of its [.., Hkv, K] caches restores
  it and every request still returns the failure-free greedy tokens."""
  from dejavu_jax.costmodel import TableCostModel  # pylint: disable=g-import-not-at-top
  from dejavu_jax.fault.controller import FailureSpec  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import init_params  # pylint: disable=g-import-not-at-top
  from dejavu_jax.serving.engine import PipelineEngine  # pylint: disable=g-import-not-at-top
  from dejavu_jax.workload import Request  # pylint: disable=g-import-not-at-top
  from tests.serving_util import greedy_references  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("llama", num_kv_heads=1)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  reqs = [Request(i, 0.01 * i, tuple(int(t) for t in rng.integers(3, 128, int(rng.integers(2, 12)))),
                  int(rng.integers(10, 30))) for i in range(8)]
  serve = ServeConfig(num_stages=2, microbatch_size=3, max_len=64, heartbeat_s=0.02,
                      heartbeat_timeout_s=0.1, recovery="replica", pacing="paced")
  cost = TableCostModel(cfg, prompt=0.01, token=0.004)
  with PipelineEngine(cfg, params, serve, cost_model=cost) as eng:
    eng.warmup()
    res = eng.serve(reqs, failures=[FailureSpec(0.3, 1)])
  assert res.tokens() == greedy_references(cfg, params, reqs)
  (ev,) = res.recoveries
  assert ev.strategy == "replica" and ev.restored_microbatches >= 1
