"""The real model under every mechanism and failure: SmolLM2-135M-Instruct's real weights
(float32), six chat prompts, 12 new tokens each, and every run's tokens IDENTICAL to the plain
single-device greedy run (`models.generate.generate`), for

  swapping (3 stages, 3 microbatches, two device buffers: every step swaps in) + a crash
  recovered from the replica; the swap-ins and the restore equal the failure-free caches;
  a stall caught by the progress watchdog, then recovered from the replica (cache oracle);
  a crash whose replica holder dies during the recovery (falls back to restart);
  disaggregation (1 prompt stage, 2 token stages) with a prompt-side and a token-side crash;
  Ray actors (real SIGKILLs) with replica recovery over both replica transports (object store,
  jax.experimental.transfer) and snapshot recovery (both stages killed after a complete
  snapshot: the replica died with its holder).

Each test checks that its failure really fired and which strategy handled it (`handled_by`),
else it would prove nothing. SmolLM2's greedy text is not degenerate (the reference's
sequences differ from each other), unlike a random tiny model's. Compiles dominate: one module
fixture holds the model and the reference, the local engines share the persistent compilation
cache, and the prompts fill one prompt bucket and one decode context.
"""

import os
import tempfile

import pytest

pytest.importorskip("gguf")

from dejavu_jax.config import ServeConfig  # noqa: E402
from dejavu_jax.fault.inject import FailureSpec  # noqa: E402
from dejavu_jax.serving import cache_oracle  # noqa: E402
from dejavu_jax.serving.engine import PipelineEngine  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402
from tests.ray_util import ray_session  # noqa: E402,F401  (a module fixture)

NEW = 12
MAX_LEN = 64
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
  """(cfg, params, requests, reference tokens by request id)."""
  from dejavu_jax.models import gguf  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.tokenizer import encode_prompts, read_prompts  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  # The local engines below compile the same stage programs again: from the disk cache.
  jaxcache.enable_compilation_cache(os.path.join(tempfile.gettempdir(), "dejavu_jax_xla_cache"))
  cfg, params, tok = gguf.load_smollm2("float32")
  ids = encode_prompts(tok, read_prompts("data/prompts.txt"))
  assert all(33 <= len(p) <= MAX_LEN - NEW for p in ids)   # one prompt bucket, one context
  ref = generate(cfg, params, ids, NEW, eos_token_id=-1, max_len=MAX_LEN)
  assert len({tuple(t) for t in ref}) == len(ref)          # not degenerate
  reqs = [Request(i, 0.0, tuple(p), NEW) for i, p in enumerate(ids)]
  yield cfg, params, reqs, {i: list(t) for i, t in enumerate(ref)}
  for n, v in before.items():   # the next test file's JAX config as it was
    jax.config.update(n, v)


def _serve_config(**kw):
  # The progress watchdog waits long: a first serve compiles its stages inside its steps, which
  # takes tens of seconds on a loaded machine and must not count as a stall.
  base = dict(microbatch_size=2, max_len=MAX_LEN, program="model", heartbeat_s=0.1,
              heartbeat_timeout_s=3.0, progress_timeout_s=300.0, recovery="replica")
  return ServeConfig(**(base | kw))


def _handled(res, strategy):
  return sum(ev.handled_by.get(strategy, 0) for ev in res.recoveries)


@pytest.mark.timeout(600)
def test_local_colocated_stall_and_failure_during_recovery(smol):
  """3 stages on threads: a failure-free run (the cache oracle's reference), a stall the
  progress watchdog catches (replica restore, caches equal the reference's), and a crash whose
  replica holder dies during the recovery (restart)."""
  cfg, params, reqs, ref = smol
  with PipelineEngine(cfg, params, _serve_config(num_stages=3, cache_probe=True)) as eng:
    base = eng.serve(reqs)
    assert base.tokens() == ref and not base.recoveries
    # Compiled now: a stage without progress for 5 s is stalled (read by each serve).
    eng.serve_cfg = eng.serve_cfg.replace(progress_timeout_s=5.0)
    stall = eng.serve(reqs, failures=[FailureSpec(after_steps=10, stage=1, kind="stall",
                                                  stall_s=120.0)])
    assert stall.tokens() == ref
    (ev,) = stall.recoveries
    assert ev.stages == (1,) and ev.handled_by.get("replica", 0) >= 1, ev
    verdict = cache_oracle.compare(base, stall)
    assert verdict.identical is True and verdict.by_point.get("replica", 0) >= 1, \
        verdict.describe()
    # Stage 2's replica lives on stage 0 (its ring successor), killed while it is read.
    during = eng.serve(reqs, failures=[FailureSpec(after_steps=10, stage=2),
                                       FailureSpec(stage=0, during_recovery=True)])
    assert during.tokens() == ref
    assert sorted(s for ev in during.recoveries for s in ev.stages) == [0, 2], during.recoveries
    assert _handled(during, "restart") >= 1, during.recoveries


@pytest.mark.timeout(600)
def test_swapping_with_replica_recovery(smol):
  """3 stages, two device buffers each, 3 microbatches: every step swaps in; stage 1 crashes
  and is restored from its replica (fed by the swap-outs). Tokens equal the reference's; every
  swap-in and the restore equal the caches a non-swapping run computed."""
  cfg, params, reqs, ref = smol
  with PipelineEngine(cfg, params, _serve_config(num_stages=3, cache_probe=True)) as plain:
    base = plain.serve(reqs)
  with PipelineEngine(cfg, params, _serve_config(num_stages=3, swapping="on",
                                                 cache_probe=True)) as eng:
    assert eng.swap_choice.swapping
    res = eng.serve(reqs, failures=[FailureSpec(after_steps=12, stage=1)])
    swap_ins = sum(st.swap.get("swap_ins", 0) for st in eng.worker_stats())
  assert res.tokens() == ref
  assert _handled(res, "replica") >= 1 and swap_ins > 0, res.recoveries
  verdict = cache_oracle.compare(base, res)
  assert verdict.identical is True, verdict.describe()
  assert verdict.by_point.get("swap_in", 0) > 0 and verdict.by_point.get("replica", 0) > 0


@pytest.mark.timeout(600)
def test_disaggregated_prompt_and_token_side_failures(smol):
  """1 prompt stage, 2 token stages: the prompt worker dies after its first prefill (its
  prompts are redone); then a token worker dies mid-decode (replica)."""
  cfg, params, reqs, ref = smol
  sc = _serve_config(prompt_stages=1, token_stages=2, layerwise_stream=False)
  with PipelineEngine(cfg, params, sc) as eng:
    prompt = eng.serve(reqs, failures=[FailureSpec(after_steps=1, stage=0)])
    assert prompt.tokens() == ref
    (ev,) = prompt.recoveries
    assert ev.stages == (0,) and ev.handled_by.get("redo prompts", 0) >= 1, ev
    token = eng.serve(reqs, failures=[FailureSpec(after_steps=8, stage=2)])
    assert token.tokens() == ref
    assert _handled(token, "replica") >= 1, token.recoveries


@pytest.mark.timeout(900)
def test_ray_replica_over_both_transports_and_snapshot(smol, ray_session):
  """Two stage actors: both killed right after the first complete snapshot (restored from it:
  the replica died with its holder), then stage 1 SIGKILLed mid-decode (its replica); over the
  object store and over jax.experimental.transfer."""
  del ray_session
  cfg, params, reqs, ref = smol
  for transport in ("object_store", "jax_transfer"):
    sc = _serve_config(num_stages=2, runtime="ray", ray_transport=transport,
                       recovery="replica,snapshot", snapshot_every=3,
                       heartbeat_timeout_s=30.0, progress_timeout_s=30.0)
    with PipelineEngine(cfg, params, sc) as eng:
      if transport == "object_store":
        snap = eng.serve(reqs, failures=[FailureSpec(stage=s, after_snapshots=1)
                                         for s in (0, 1)])
        assert snap.tokens() == ref, transport
        assert _handled(snap, "snapshot") >= 1, snap.recoveries
      rep = eng.serve(reqs, failures=[FailureSpec(after_steps=8, stage=1)])
      assert rep.tokens() == ref, transport
      assert _handled(rep, "replica") >= 1, (transport, rep.recoveries)
