"""The CPU custom call for packed decode matmuls (models/cpu_kernels.py) and its use by decode."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import tiny_config
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.models import cpu_kernels
from dejavu_jax.models.decoder import PackedParams, init_params
from dejavu_jax.models.generate import decode_params, make_steps

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="needs a C++ compiler: " + str(cpu_kernels.status()))


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (8, 768, 768), (3, 100, 70), (17, 33, 129),
                                   (9, 576, 1536)])
def test_packed_matmul_equals_the_product(m, k, n):
  rng = np.random.default_rng(m * n)
  x = rng.standard_normal((m, k), np.float32)
  w = rng.standard_normal((k, n), np.float32)
  fn = jax.jit(cpu_kernels.packed_matmul, static_argnums=2)
  packed = cpu_kernels.pack(w)
  assert packed.shape == (-(-n // 32), k, 32)
  got = np.asarray(fn(x, packed, n))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(got, want, atol=2e-5 * k, rtol=0)
  # A row's result does not depend on the rows beside it (microbatches decode as the batch).
  for r in (0, m - 1):
    np.testing.assert_array_equal(np.asarray(fn(x[r:r + 1], packed, n))[0], got[r])
  # Leading dims are kept.
  np.testing.assert_array_equal(np.asarray(fn(x[:, None], packed, n))[:, 0], got)


def _greedy(decode, cfg, params, tok, pos, s: int, steps: int):
  """(logits, tokens) of `steps` greedy decode steps from a fresh cache of `s` positions."""
  c, t, out = init_cache_for(cfg, cfg.num_layers, tok.shape[0], s), tok, []
  for i in range(steps):
    c, logits = decode(params, c, t, pos + i)
    t = jnp.argmax(logits, -1).astype(jnp.int32)
    out.append((np.asarray(logits), np.asarray(t)))
  return out


def _same_tokens(a, b):
  for (la, ta), (lb, tb) in zip(a, b):
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(ta, tb)


def test_decode_uses_the_custom_call_and_keeps_the_tokens(monkeypatch):
  cfg = tiny_config("opt")   # tied LM head: packed too
  params = init_params(cfg, jax.random.key(3))
  dp = decode_params(cfg, params)
  assert isinstance(dp, PackedParams) and "tied_head" in dp.packed
  assert decode_params(cfg, params).packed is dp.packed       # packed once per params object
  _, decode = make_steps(cfg)
  b, s = 4, 32
  cache = init_cache_for(cfg, cfg.num_layers, b, s)
  tok, pos = jnp.arange(b, dtype=jnp.int32) + 7, jnp.zeros((b,), jnp.int32)
  hlo = decode.lower(params, cache, tok, pos).as_text()
  assert "dejavu_packed_matmul" in hlo
  assert hlo.count("dejavu_packed_matmul") >= 6 * cfg.num_layers + 1

  packed_run = _greedy(decode, cfg, params, tok, pos, s, 12)
  monkeypatch.setenv("DEJAVU_CPU_KERNELS", "0")
  assert decode_params(cfg, params) is params
  assert "dejavu_packed_matmul" not in decode.lower(params, cache, tok, pos).as_text()
  _same_tokens(packed_run, _greedy(decode, cfg, params, tok, pos, s, 12))


def test_sharded_or_traced_params_are_left_alone():
  cfg = tiny_config("opt")
  params = init_params(cfg, jax.random.key(0))
  seen = []
  jax.jit(lambda p: seen.append(decode_params(cfg, p)) or 0)(params)
  assert not isinstance(seen[0], PackedParams)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
  spread = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert decode_params(cfg, spread) is spread


@pytest.mark.parametrize("h,hkv,alibi,scale_queries,context,kd",
                         [(4, 4, False, False, 24, 16), (6, 2, False, True, 32, 64),
                          (4, 4, True, False, 17, 24), (9, 3, True, True, 32, 64),
                          (2, 1, False, False, 32, 128), (3, 3, True, False, 20, 8)])
def test_attend_decode_kernel_equals_the_xla_formulation(h, hkv, alibi, scale_queries, context,
                                                         kd):
  """Head dims that are whole 16-float vectors take the vectorized path (16 positions scored at
  once), others the plain loop: both against layers.attend_decode."""
  from dejavu_jax.models.layers import attend_decode
  rng = np.random.default_rng(h * 31 + context)
  n_layers, b, s, layer = 3, 5, 32, 1
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k_all, v_all = f(b, h, kd), f(n_layers, b, s, hkv, kd), f(n_layers, b, s, hkv, kd)
  k_new, v_new = f(b, hkv, kd), f(b, hkv, kd)
  # Rows: empty context, mid, at the bucket's end, past the bucket (attention stops at it), pad.
  pos = jnp.asarray([0, 7, context - 1, s + 3, -1], jnp.int32)
  slopes = np.linspace(0.5, 0.01, h).astype(np.float32) if alibi else None
  scale = 1.0 / np.sqrt(kd)

  def xla():
    return attend_decode(q, k_all[layer, :, :context], v_all[layer, :, :context], k_new, v_new,
                         pos, scale, scale_queries, slopes)

  qs = q * scale if scale_queries else q
  got = jax.jit(lambda: cpu_kernels.attend_decode(
      qs, k_all, v_all, layer, context, k_new, v_new, pos, 1.0 if scale_queries else scale,
      slopes, xla))()
  hlo = jax.jit(lambda: cpu_kernels.attend_decode(
      qs, k_all, v_all, layer, context, k_new, v_new, pos, 1.0, slopes, xla)).lower().as_text()
  assert "dejavu_attend_decode" in hlo
  want = jax.jit(xla)()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=0)


_THREADS_SCRIPT = r"""
import os, sys
if sys.argv[2] == "one":
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # XLA sizes its pool from this
import jax, jax.numpy as jnp, numpy as np
from dejavu_jax.models import cpu_kernels
assert cpu_kernels.available()
rng = np.random.default_rng(0)
f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
x, w = f(5, 768), f(768, 1000)
y = jax.jit(cpu_kernels.packed_matmul, static_argnums=2)(x, cpu_kernels.pack(w), 1000)
from gguf import GGMLQuantizationType, quants
wq = quants.dequantize(quants.quantize(np.asarray(w).T, GGMLQuantizationType.Q4_1),
                       GGMLQuantizationType.Q4_1).reshape(1000, 768).T
yq = jax.jit(cpu_kernels.packed_matmul, static_argnums=2)(x, cpu_kernels.pack_quantized(wq), 1000)
q, k_all, v_all, k_new, v_new = f(6, 8, 64), f(2, 6, 64, 4, 64), f(2, 6, 64, 4, 64), f(6, 4, 64), f(6, 4, 64)
pos = jnp.asarray([0, 5, 30, 63, 64, -1], jnp.int32)
att = jax.jit(lambda: cpu_kernels.attend_decode(q, k_all, v_all, 1, 64, k_new, v_new, pos, 0.125,
                                                None, lambda: jnp.zeros_like(q)))()
np.savez(sys.argv[1], y=np.asarray(y), att=np.asarray(att), yq=np.asarray(yq))
"""


def test_results_do_not_depend_on_the_thread_count(tmp_path):
  """The kernels split panels and (row, KV head) pairs over XLA's thread pool: a process on one
  CPU (a pool of one) and one on every CPU give bit-identical products and attention."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs two CPUs to compare against one")
  out = {}
  # Without the forced virtual devices (conftest's XLA_FLAGS): with 8 of them XLA's pool has 8
  # threads whatever the affinity; without, one thread per CPU the process may run on.
  env = dict(os.environ, XLA_FLAGS="")
  for mode in ("one", "all"):
    path = str(tmp_path / f"{mode}.npz")
    subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, path, mode], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out[mode] = np.load(path)
  for name in ("y", "att", "yq"):
    np.testing.assert_array_equal(out["one"][name], out["all"][name])


def test_a_copy_with_one_weight_replaced_is_packed_anew():
  """The packed copy is keyed by every weight array: params that share all but one array with
  params already packed (a checkpoint loaded into a copy of the dict) get that one packed anew,
  and the packing is dropped when its arrays die."""
  from dejavu_jax.models import generate  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("opt")
  params = init_params(cfg, jax.random.key(0))
  first = decode_params(cfg, params)
  last = f"layers_{cfg.num_layers - 1}"
  mlp = params[last]["mlp"]
  new = mlp["fc2"]["kernel"] + 1.0
  copy = {**params, last: {**params[last], "mlp": {**mlp, "fc2": {**mlp["fc2"], "kernel": new}}}}
  second = decode_params(cfg, copy)
  got = np.asarray(second.packed[last]["mlp"]["fc2"]["kernel"])
  np.testing.assert_array_equal(got, np.asarray(cpu_kernels.pack(new)))
  assert not np.array_equal(got, np.asarray(first.packed[last]["mlp"]["fc2"]["kernel"]))
  entries = len(generate._PACKS)  # pylint: disable=protected-access
  del copy, second, new
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  assert len(generate._PACKS) == entries - 1  # pylint: disable=protected-access


# ---- block-quantized weights: the values of GGUF Q4_1 / Q8_0 tensors, read as such ----

def _gguf_values(w: np.ndarray, fmt: str) -> np.ndarray:
  """[K, N] float32 -> the float32 values a GGUF file of `w` quantized to `fmt` dequantizes to
  (blocks along K, per column: GGUF's rows are our columns)."""
  quants = pytest.importorskip("gguf.quants")
  from gguf import GGMLQuantizationType  # pylint: disable=g-import-not-at-top
  t = getattr(GGMLQuantizationType, fmt)
  k, n = w.shape
  return np.ascontiguousarray(
      quants.dequantize(quants.quantize(np.ascontiguousarray(w.T), t), t).reshape(n, k).T)


@pytest.mark.parametrize("fmt,nbytes", [("Q4_1", 24), ("Q8_0", 36)])
@pytest.mark.parametrize("k,n", [(576, 1536), (64, 45), (96, 8)])
def test_quantized_weights_are_packed_and_read_bit_for_bit(fmt, nbytes, k, n):
  rng = np.random.default_rng(k + n)
  w = _gguf_values(0.05 * rng.standard_normal((k, n), np.float32), fmt)
  packed = cpu_kernels.pack_quantized(jnp.asarray(w))
  assert packed is not None and packed.dtype == jnp.uint8
  assert packed.shape == (-(-n // 8), k // 32, 8, nbytes)
  # the XLA reading and the custom call's reading both give back every weight exactly
  np.testing.assert_array_equal(np.asarray(cpu_kernels.unpack_quantized(packed, n)).view(np.uint32),
                                w.view(np.uint32))
  fn = jax.jit(cpu_kernels.packed_matmul, static_argnums=2)
  eye = np.eye(k, dtype=np.float32)
  assert "dejavu_q_matmul" in jax.jit(cpu_kernels.packed_matmul, static_argnums=2).lower(
      eye, packed, n).as_text()
  np.testing.assert_array_equal(np.asarray(fn(eye, packed, n)).view(np.uint32), w.view(np.uint32))
  # the product, and a row's result whatever rows share its call (1..8-row tiles and beyond)
  x = rng.standard_normal((11, k), np.float32)
  got = np.asarray(fn(x, packed, n))
  np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), atol=2e-6 * k,
                             rtol=0)
  for m in (1, 2, 3, 4, 5, 8):
    np.testing.assert_array_equal(np.asarray(fn(x[:m], packed, n)), got[:m])
  np.testing.assert_array_equal(np.asarray(fn(x[3:4], packed, n))[0], got[3])


def test_weights_not_exactly_block_quantized_keep_the_float32_panels():
  rng = np.random.default_rng(1)
  w = _gguf_values(0.05 * rng.standard_normal((64, 40), np.float32), "Q4_1")
  assert cpu_kernels.pack_quantized(w) is not None
  assert cpu_kernels.pack_quantized(rng.standard_normal((64, 40), np.float32)) is None
  near = w.copy()
  near[63, 39] = np.nextafter(near[63, 39], np.float32(1))   # one value off by one ulp, last block
  assert cpu_kernels.pack_quantized(near) is None
  assert cpu_kernels.pack_quantized(w[:48]) is None           # K not a multiple of 32
  assert cpu_kernels.pack_quantized(w.astype(np.float16)) is None


def test_a_block_quantized_model_decodes_through_the_quantized_call(monkeypatch):
  """A model whose kernels hold Q4_1 values (a GGUF checkpoint's) packs them as blocks, by their
  values alone: a copy of the weights on another device packs the same way, and the tokens are
  those of XLA's float32 dots on the same weights."""
  cfg = tiny_config("llama", num_layers=2)
  params = init_params(cfg, jax.random.key(5))

  def quantize(path, x):   # every kernel but the LM head's
    if (path[-1].key == "kernel" and path[-2].key != "lm_head" and x.ndim == 2
        and x.shape[0] % 32 == 0):
      return jnp.asarray(_gguf_values(np.asarray(x), "Q4_1"))
    return x
  params = jax.tree_util.tree_map_with_path(quantize, params)
  dp = decode_params(cfg, params)
  kinds = {str(x.dtype) for x in jax.tree.leaves(dp.packed)}
  assert kinds == {"uint8", "float32"}   # kernels as blocks; the random LM head as panels
  assert dp.packed["lm_head"]["kernel"].dtype == jnp.float32
  other = jax.device_put(params, jax.devices()[1])
  np.testing.assert_array_equal(
      np.asarray(decode_params(cfg, other).packed["layers_0"]["mlp"]["down_proj"]["kernel"]),
      np.asarray(dp.packed["layers_0"]["mlp"]["down_proj"]["kernel"]))
  _, decode = make_steps(cfg)
  b, s = 3, 16
  tok, pos = jnp.arange(b, dtype=jnp.int32) + 3, jnp.zeros((b,), jnp.int32)
  assert "dejavu_q_matmul" in decode.lower(params, init_cache_for(cfg, cfg.num_layers, b, s),
                                           tok, pos).as_text()

  quantized = _greedy(decode, cfg, params, tok, pos, s, 10)
  monkeypatch.setenv("DEJAVU_CPU_KERNELS", "0")
  _same_tokens(quantized, _greedy(decode, cfg, params, tok, pos, s, 10))


def test_copies_of_quantized_weights_are_recognised_by_their_digest(monkeypatch):
  """Every stage and engine builds its own arrays of the same weights: the full value check runs
  once per content, a copy (here on another device) is recognised by its digest, and different
  content is checked anew."""
  rng = np.random.default_rng(7)
  w = _gguf_values(0.05 * rng.standard_normal((256, 96), np.float32), "Q4_1")
  first = cpu_kernels.pack_quantized(jnp.asarray(w))
  checked = []
  real = cpu_kernels._fit  # pylint: disable=protected-access
  monkeypatch.setattr(cpu_kernels, "_fit", lambda v, fmt: checked.append(len(v)) or real(v, fmt))
  copy = cpu_kernels.pack_quantized(jax.device_put(w, jax.devices()[1]))
  assert copy.devices() == {jax.devices()[1]}
  np.testing.assert_array_equal(np.asarray(copy), np.asarray(first))
  assert max(checked) <= 4             # only column 0's first blocks, not all 768
  other = w.copy()
  other[:, 5] = other[:, 6]            # still Q4_1 values, different content
  got = cpu_kernels.pack_quantized(other)
  assert max(checked) == 256 // 32 * 96
  np.testing.assert_array_equal(np.asarray(cpu_kernels.unpack_quantized(got, 96)), other)
