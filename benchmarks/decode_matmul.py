"""The matmuls of a small-batch decode step on XLA:CPU: formulations and compiler options side by
side, against the machine's read bandwidth and a numpy/OpenBLAS reference.

  python benchmarks/decode_matmul.py [--runs=5] [--batch=8] [--threads=single|multi|both]
                                     [--cases=qkvo,fc1,layers,attn_opt_125m,step_opt_125m,...]
                                     [--variants=dot/ynn_idot,numpy/dot,...]

Why. At batch 8 an OPT-125M decode step reads ~500 MB of float32 weights and does 2 GFLOP: at this
machine's ~24 GB/s read bandwidth the step could take ~21 ms, but it took ~90 ms (issue 24), as if
the matmuls ran at ~22 GFLOP/s. This benchmark measures each of the step's matmul shapes alone,
with the weights streamed from memory as in a step (one distinct weight matrix per layer, L = 12
of them per shape: every case reads 110-155 MB, several times the 32 MiB L3), in each variant:

  formulations (under the project's `generate.CPU_COMPILER_OPTIONS`):
    dot      x @ W, W [in, out] (Flax's layout, the model's today)
    dot_t    W stored [out, in], contracting the last dims of both (torch's layout)
    chunk    the dot over N split into 512-column pieces, concatenated
    fused    the 12 layers' weights as one [L, in, out] operand, one batched dot (an upper bound
             for fusing projections that share an input, e.g. q/k/v)
    mulsum   broadcast multiply + sum over `in` (an XLA loop fusion, no library call)
  compiler options (the dot formulation):
    ynn_idot xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT: each dot its
             own YNNPACK call (the project's choice since this benchmark, `generate.
             CPU_COMPILER_OPTIONS`)
    ynn_dot  ...=LIBRARY_FUSION_TYPE_DOT: chains of dots and their elementwise neighbours fused
             into one YNNPACK graph (the project's choice before)
    ynn_all  no options: XLA's default YNNPACK fusions (dots, reductions, elementwise)
    eigen    YNNPACK fusions off: XLA's own dot (Eigen)
    xnn      YNNPACK off, XNNPACK graph fusion greedy with its cost model bypassed
    vw512    ynn_idot + xla_cpu_prefer_vector_width=512
  custom call:
    ffi/packed  `models.cpu_kernels.packed_matmul`: W packed once into 32-column panels stored
             k-major ([ceil(out/32), in, 32]), read as one sequential stream past an 8-row x
             32-column register tile (the project's decode steps since issue 24, through
             `generate.decode_params`)
  reference: numpy (OpenBLAS) x @ W and x @ W_t.T in a Python loop.

Cases: qkvo ([B,768]x[768,768], 48 matrices: q, k, v, out of 12 layers), fc1 ([768,3072] x 12),
fc2 ([3072,768] x 12), head (the LM head [768,50272], once, 154 MB), layers (the 12 layers' six
matmuls chained with ReLU, no attention, plus the head: every matmul of the step);
attn_<model> (a step's attention alone: every layer's query over its slice of the stacked
[L, B, 256, Hkv, K] cache plus the new entry, `layers.attend_decode_einsum` (dots) vs
`attend_decode_mulsum` (multiply + sum)); step_<model> (the real decode step,
`models.generate.step_functions`, random weights, cache 256, context 256, in a jitted loop of 8
donated steps as `make_decode_n`: times and bytes are per 8 steps) under each option set and
each attention formulation (`model/*` is the model's own choice, `layers.attend_decode`;
`model/ffi_packed` the decode steps as they run, packed weights through `models.cpu_kernels`).
Per round every variant of a case
runs back to back (interleaved), `--reps` calls each, keeping the fastest call's wall time and
CPU time (time.process_time: the time this process actually ran, robust to other jobs taking
the cores); a figure is the median over rounds of those. GFLOP/s = 2 B in out L / time;
read_fraction = weight bytes / time / the read bandwidth measured in the same round (a sum over
a 256 MiB buffer, as benchmarks/decode_vs_hf.py). Thread modes run in separate worker
processes (studies/paired.py): `single` is XLA and OpenBLAS on one thread, the setting of the
decode_vs_hf / decode_llama single-threaded targets.

The last stdout line is one JSON object (every figure measured).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools  # noqa: E402
import json  # noqa: E402

from absl import app, flags  # noqa: E402

from dejavu_jax.studies import paired  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 5, "timed rounds (median reported)")
_REPS = flags.DEFINE_integer("reps", 3, "calls of a variant per round (the fastest is kept)")
_BATCH = flags.DEFINE_integer("batch", 8, "rows of x (the decode batch)")
_CASES = flags.DEFINE_list("cases", ["qkvo", "fc1", "fc2", "head", "layers", "attn_opt_125m",
                                     "attn_smollm2_135m", "step_opt_125m"],
                           "cases to measure (see the module docstring)")
_VARIANTS = flags.DEFINE_list("variants", [], "only these variants (default: all of a case)")
_THREADS = flags.DEFINE_enum("threads", "single", ["both", *paired.MODES],
                             "single: XLA and OpenBLAS on one thread; multi: their defaults")
_WORKER = flags.DEFINE_string("worker", "", "internal: run as the paired harness's worker")

D, F, V, L = 768, 3072, 50272, 12
YNN_DOT = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
YNN_IDOT = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
OPTIONS = {
    "ynn_idot": YNN_IDOT,
    "ynn_dot": YNN_DOT,
    "ynn_all": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "xnn": {"xla_cpu_experimental_ynn_fusion_type": "",
            "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_BYPASS_COST_MODEL"},
    "vw512": {**YNN_IDOT, "xla_cpu_prefer_vector_width": 512},
}
SHAPES = {"qkvo": (D, D, 4 * L), "fc1": (D, F, L), "fc2": (F, D, L), "head": (D, V, 1)}


def _matmul_variants(jax, jnp, np, b: int, din: int, dout: int, n: int, rng):
  """{name: (fn, args)} for one shape case: n distinct [din, dout] weights."""
  from dejavu_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  w = rng.standard_normal((n, din, dout), np.float32) * 0.02
  wt = np.ascontiguousarray(w.transpose(0, 2, 1))
  x = rng.standard_normal((b, din), np.float32)
  # Separate arrays, as the model's parameters: a slice of one stacked array would be copied
  # out before a library dot could read it.
  xj, wj, wtj = jnp.asarray(x), [jnp.asarray(a) for a in w], [jnp.asarray(a) for a in wt]

  def dot(x, w):
    return [x @ w[i] for i in range(n)]

  def dot_t(x, wt):
    return [jax.lax.dot_general(x, wt[i], (((1,), (1,)), ((), ()))) for i in range(n)]

  def chunk(x, w):
    return [jnp.concatenate([x @ w[i][:, c:c + 512] for c in range(0, dout, 512)], axis=-1)
            for i in range(n)]

  def fused(x, w):
    return jnp.einsum("bi,lio->lbo", x, w)

  def mulsum(x, w):
    return [jnp.sum(x[:, :, None] * w[i][None], axis=1) for i in range(n)]

  out = {}
  for name, opts in OPTIONS.items():
    out[f"dot/{name}"] = (jax.jit(dot, compiler_options=opts), (xj, wj))
  out["dot_t/ynn_idot"] = (jax.jit(dot_t, compiler_options=YNN_IDOT), (xj, wtj))
  out["dot_t/eigen"] = (jax.jit(dot_t, compiler_options=OPTIONS["eigen"]), (xj, wtj))
  out["chunk/ynn_idot"] = (jax.jit(chunk, compiler_options=YNN_IDOT), (xj, wj))
  out["fused/ynn_idot"] = (jax.jit(fused, compiler_options=YNN_IDOT), (xj, jnp.asarray(w)))
  if n * din * dout <= 64 * D * D:   # the loop fusion is slow: only where it stays cheap
    out["mulsum/ynn_idot"] = (jax.jit(mulsum, compiler_options=YNN_IDOT), (xj, wj))
  packed = [cpu_kernels.pack(a) for a in wj]
  out["ffi/packed"] = (jax.jit(lambda x, p: [cpu_kernels.packed_matmul(x, p[i], dout)
                                             for i in range(n)]), (xj, packed))
  out["numpy/dot"] = (lambda x, w: [x @ w[i] for i in range(n)], (x, w))
  out["numpy/dot_t"] = (lambda x, wt: [x @ wt[i].T for i in range(n)], (x, wt))
  flops = 2 * b * din * dout * n
  return out, flops, w.nbytes


def _layers_variants(jax, jnp, np, b: int, rng):
  """Every matmul of an OPT-125M step (12 layers' q, k, v, out, fc1, fc2 chained with ReLU, the
  LM head), no attention and no norms: the step's matmul floor."""
  from dejavu_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  def mats(shape, n):
    return rng.standard_normal((n, *shape), np.float32) * 0.02
  ws = {"q": mats((D, D), L), "k": mats((D, D), L), "v": mats((D, D), L), "o": mats((D, D), L),
        "fc1": mats((D, F), L), "fc2": mats((F, D), L), "head": mats((D, V), 1)[0]}
  wts = {k: np.ascontiguousarray(np.swapaxes(v, -1, -2)) for k, v in ws.items()}
  x = rng.standard_normal((b, D), np.float32)

  def step(x, w, mm):
    for i in range(L):
      h = mm(x, w["q"][i]) + mm(x, w["k"][i]) + mm(x, w["v"][i])
      x = x + mm(h, w["o"][i])
      x = x + mm(jax.nn.relu(mm(x, w["fc1"][i])), w["fc2"][i])
    return mm(x, w["head"])

  def plain(x, w):
    return x @ w

  def trans(x, w):
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))

  def np_step(x, w, mm):
    for i in range(L):
      h = mm(x, w["q"][i]) + mm(x, w["k"][i]) + mm(x, w["v"][i])
      x = x + mm(h, w["o"][i])
      x = x + mm(np.maximum(mm(x, w["fc1"][i]), 0), w["fc2"][i])
    return mm(x, w["head"])

  wj = {k: list(map(jnp.asarray, v)) if v.ndim == 3 else jnp.asarray(v) for k, v in ws.items()}
  wtj = {k: list(map(jnp.asarray, v)) if v.ndim == 3 else jnp.asarray(v) for k, v in wts.items()}
  xj = jnp.asarray(x)
  out = {}
  for name, opts in OPTIONS.items():
    out[f"dot/{name}"] = (jax.jit(lambda x, w: step(x, w, plain), compiler_options=opts), (xj, wj))
  out["dot_t/ynn_idot"] = (jax.jit(lambda x, w: step(x, w, trans), compiler_options=YNN_IDOT),
                          (xj, wtj))
  out["dot_t/eigen"] = (jax.jit(lambda x, w: step(x, w, trans),
                                compiler_options=OPTIONS["eigen"]), (xj, wtj))
  packed = jax.tree.map(cpu_kernels.pack, wj)
  # Every OPT-125M width (768, 3072, 50272) is a whole number of panels.
  out["ffi/packed"] = (jax.jit(lambda x, p: step(
      x, p, lambda a, b: cpu_kernels.packed_matmul(a, b, b.shape[0] * cpu_kernels.PANEL))),
                       (xj, packed))
  out["numpy/dot"] = (lambda x, w: np_step(x, w, lambda a, b: a @ b), (x, ws))
  out["numpy/dot_t"] = (lambda x, w: np_step(x, w, lambda a, b: a @ b.T), (x, wts))
  flops = 2 * b * (L * (4 * D * D + 2 * D * F) + D * V)
  nbytes = sum(v.nbytes for v in ws.values())
  return out, flops, nbytes


STEPS_PER_CALL = 8


class _DecodeLoop:
  """A jitted loop of STEPS_PER_CALL decode steps that keeps its (donated) cache between calls,
  as `make_decode_n` does: every call rewrites positions 128.. (the cost does not depend on the
  values), attention reads `context` positions."""

  def __init__(self, jax, jnp, cfg, params, b: int, opts: dict, attend=None, context: int = 256):
    from dejavu_jax.kv.cache import init_cache_for  # pylint: disable=g-import-not-at-top
    from dejavu_jax.models import layers as layers_lib
    from dejavu_jax.models.generate import step_functions
    _, decode = step_functions(cfg)

    def loop(params, cache, tok, pos):
      def body(carry, _):
        cache, tok, pos = carry
        cache, logits = decode(params, cache, tok, pos, context)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (cache, nxt, pos + 1), nxt
      (cache, _, _), toks = jax.lax.scan(body, (cache, tok, pos), None, length=STEPS_PER_CALL)
      return cache, toks

    def traced(*args):
      # The attention formulation under test replaces the model's while this traces.
      saved = layers_lib.attend_decode
      layers_lib.attend_decode = attend or saved
      try:
        return loop(*args)
      finally:
        layers_lib.attend_decode = saved

    self.fn = jax.jit(traced, donate_argnums=(1,), compiler_options=opts)
    self.params = params
    self.cache = init_cache_for(cfg, cfg.num_layers, b, context)
    self.tok = jnp.arange(b, dtype=jnp.int32) + 5
    self.pos = jnp.full((b,), 128, jnp.int32)

  def __call__(self):
    self.cache, toks = self.fn(self.params, self.cache, self.tok, self.pos)
    return toks.T   # [B, steps]: row 0 is the first row's tokens


def _step_variants(jax, jnp, np, b: int, model: str):
  """The real decode step (attention included) under each option set and attention formulation,
  in a loop of STEPS_PER_CALL donated steps (times are per call: divide by STEPS_PER_CALL)."""
  from dejavu_jax.config import get_model_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import layers as layers_lib
  from dejavu_jax.models.decoder import init_params
  from dejavu_jax.models.generate import decode_params
  cfg = get_model_config(model)
  params = init_params(cfg, jax.random.key(0))
  out = {}
  for name, opts in OPTIONS.items():
    out[f"model/{name}"] = (_DecodeLoop(jax, jnp, cfg, params, b, opts), ())
  # The project's decode steps today: packed weights through the CPU custom calls.
  out["model/ffi_packed"] = (_DecodeLoop(jax, jnp, cfg, decode_params(cfg, params), b,
                                         YNN_IDOT), ())
  for name in ("einsum", "mulsum"):
    att = getattr(layers_lib, f"attend_decode_{name}")
    out[f"attn_{name}/ynn_idot"] = (_DecodeLoop(jax, jnp, cfg, params, b, YNN_IDOT, att), ())
    out[f"attn_{name}/ynn_all"] = (_DecodeLoop(jax, jnp, cfg, params, b, {}, att), ())
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  if "embed_positions" in params:
    weights -= params["embed_positions"]["embedding"].nbytes
  flops = 2 * b * (weights // 4) * STEPS_PER_CALL
  # Bytes: the weights plus the K/V the step attends over (256 positions, all read).
  kv = 2 * cfg.num_layers * b * 256 * cfg.num_kv_heads * cfg.head_dim * 4
  return out, flops, (weights + kv) * STEPS_PER_CALL


def _attn_variants(jax, jnp, np, b: int, model: str):
  """A decode step's attention alone: every layer's query over its old cache slice (read in place
  from the stacked [L, B, S, Hkv, K] cache) plus its new entry, context 256, no projections."""
  from dejavu_jax.config import get_model_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import layers as layers_lib
  cfg = get_model_config(model)
  nl, h, hkv, kd, s = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 256
  keys = iter(jax.random.split(jax.random.key(3), 8))
  k_all = jax.random.normal(next(keys), (nl, b, s, hkv, kd), jnp.float32)
  v_all = jax.random.normal(next(keys), (nl, b, s, hkv, kd), jnp.float32)
  q = jax.random.normal(next(keys), (nl, b, h, kd), jnp.float32)
  k_new = jax.random.normal(next(keys), (nl, b, hkv, kd), jnp.float32)
  v_new = jax.random.normal(next(keys), (nl, b, hkv, kd), jnp.float32)
  pos = jnp.full((b,), 200, jnp.int32) + jnp.arange(b, dtype=jnp.int32)
  scale = kd**-0.5
  variants = {"einsum": layers_lib.attend_decode_einsum,
              "mulsum": layers_lib.attend_decode_mulsum}

  def run(att, q, k_all, v_all, k_new, v_new, pos):
    outs = []
    for i in range(nl):
      # Each layer's query depends on the previous output, as in a step (no cross-layer fusion).
      qi = q[i] + (0.0 * outs[-1] if outs else 0.0)
      outs.append(att(qi, k_all[i], v_all[i], k_new[i], v_new[i], pos, scale, False, None))
    return outs[-1]

  out = {}
  args = (q, k_all, v_all, k_new, v_new, pos)
  for name, att in variants.items():
    fn = functools.partial(run, att)
    out[f"{name}/ynn_idot"] = (jax.jit(fn, compiler_options=YNN_IDOT), args)
  out["einsum/ynn_all"] = (jax.jit(functools.partial(run, layers_lib.attend_decode_einsum)),
                           args)
  nbytes = 2 * nl * b * s * hkv * kd * 4
  flops = 4 * nl * b * s * h * kd
  return out, flops, nbytes


class Bench:
  """A worker's state: every case's compiled variants, built once."""

  def __init__(self, b: int, cases, variants):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp
    import numpy as np
    self.np, self.jax = np, jax
    rng = np.random.default_rng(0)
    self.cases = {}
    for case in cases:
      if case in SHAPES:
        built = _matmul_variants(jax, jnp, np, b, *SHAPES[case], rng)
      elif case == "layers":
        built = _layers_variants(jax, jnp, np, b, rng)
      elif case.startswith("attn_"):
        built = _attn_variants(jax, jnp, np, b, case[len("attn_"):])
      elif case.startswith("step_"):
        built = _step_variants(jax, jnp, np, b, case[len("step_"):])
      else:
        raise ValueError(f"unknown case {case!r}; expected {[*SHAPES, 'layers', 'step']}")
      fns, flops, nbytes = built
      if variants:
        fns = {k: v for k, v in fns.items() if k in variants}
      self.cases[case] = (fns, flops, nbytes)
    src = np.ones((256 << 20) // 4, np.float32)
    self.src = src
    self.checked = False

  def _call(self, fn, args):
    out = fn(*args)
    self.jax.block_until_ready(out)
    return out

  def check(self):
    """Every variant of a case computes the same product (to float32 rounding)."""
    np = self.np
    for case, (fns, _, _) in self.cases.items():
      ref = None
      for name, (fn, args) in fns.items():
        got = np.asarray(self._call(fn, args)[0], np.float32)  # the first layer's (or row's)
        if ref is None:
          ref = got
        elif not np.allclose(got.reshape(ref.shape), ref, rtol=2e-3, atol=2e-3):
          raise AssertionError(f"{case}: {name} differs from the first variant")

  def one_round(self) -> dict:
    if not self.checked:
      self.check()
      self.checked = True
    np = self.np
    read = self.src.nbytes / _timed(lambda: np.sum(self.src), 3)[0]
    rec = {"read_GBps": read / 1e9, "load": os.getloadavg()[0]}
    for case, (fns, flops, nbytes) in self.cases.items():
      rec[case] = {"flops": flops, "bytes": nbytes}
      for name, (fn, args) in fns.items():
        wall, cpu = _timed(lambda: self._call(fn, args), _REPS.value)
        rec[case][name] = {"wall": wall, "cpu": cpu}
    return rec


def _timed(fn, reps: int):
  """(fastest wall seconds, fastest CPU seconds) over `reps` calls."""
  walls, cpus = [], []
  for _ in range(reps):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  return min(walls), min(cpus)


def summarize(records, cases) -> dict:
  med = statistics.median
  read = med(r["read_GBps"] for r in records)
  out = {"read_GBps": round(read, 2), "load_per_round": [round(r["load"], 2) for r in records]}
  for case in cases:
    flops, nbytes = records[0][case]["flops"], records[0][case]["bytes"]
    rows = {}
    for name in records[0][case]:
      if name in ("flops", "bytes"):
        continue
      wall = med(r[case][name]["wall"] for r in records)
      cpu = med(r[case][name]["cpu"] for r in records)
      rows[name] = {"ms": round(wall * 1e3, 2), "cpu_ms": round(cpu * 1e3, 2),
                    "GFLOPs": round(flops / wall / 1e9, 1),
                    "read_fraction": round(nbytes / wall / 1e9 / read, 3)}
    out[case] = {"flops": flops, "bytes": nbytes, "variants": rows}
  return out


def main(argv):
  del argv
  if _WORKER.value:
    bench = Bench(_BATCH.value, _CASES.value, _VARIANTS.value)
    paired.serve_rounds(bench.one_round)
    return
  modes = paired.MODES if _THREADS.value == "both" else (_THREADS.value,)
  args = [a for a in sys.argv[1:] if not a.startswith("--threads")]
  records, loads = paired.run_paired(os.path.abspath(__file__), args, _RUNS.value, modes)
  b = _BATCH.value
  result = {"batch": b, "runs": _RUNS.value, "reps": _REPS.value, "cores": os.cpu_count(),
            "load_avg_per_round": loads, "load_avg_median": statistics.median(loads)}
  for mode in modes:
    result[mode] = summarize(records[mode], _CASES.value)
  result["kind"] = {m: "measured" for m in modes}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
