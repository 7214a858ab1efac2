"""Cost model: how long a pipeline stage's prompt and token steps take, and how long bytes take to move.

Owns the one `CostModel` interface used by the simulator (`dejavu_jax.sim`), the planner and the
pipeline engine's paced mode, the hardware presets, the link presets and the byte helpers.

Three sources sit behind the interface:
  * `roofline(model, hardware)`: max(compute time, memory time) per layer from the model's sizes
    and a `Hardware` spec, each stretched by an explicit, documented efficiency factor.
  * `calibrate(model, measurements)`: an affine model fitted (non-negative least squares) to stage
    step times measured on the machine at hand.
  * `TableCostModel`: per-layer times given by the user (scalars, or a grid that is interpolated).

Links (`Link`: latency + bytes / bandwidth) are presets, or `calibrate_links` of a table measured
by benchmarks/transport.py (one link per path: prompt KV, replica delta, swap-in, weights).

All times are in seconds and all sizes in bytes. Every model is bound to one `ModelConfig`.

Why one module over 400 lines: the roofline, table and calibrated models, the hardware and
link tables and the byte helpers are one vocabulary of modelled time shared by every layer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from dejavu_jax.config import ModelConfig


class CostModel(Protocol):
  """Per-stage step times of one model (see the module docstring)."""

  model: ModelConfig

  def prompt_time(self, layers: int, prompt_len: int, batch: int) -> float:
    """Seconds for a stage owning `layers` decoder layers to prefill `batch` prompts."""

  def token_time(self, layers: int, batch: int, context: int) -> float:
    """Seconds for one decode step of that stage with `context` tokens already cached."""

  def head_time(self, tokens: int) -> float:
    """Extra seconds of the embeddings + LM head (first/last stage) over `tokens` positions."""


# ---------------------------------------------------------------------------------------------
# Links and bytes.


@dataclasses.dataclass(frozen=True)
class Link:
  """A point-to-point transfer channel: time = latency + bytes / bandwidth.

  Attributes:
    name: preset name, for reports.
    bandwidth: sustained bytes per second (nominal line rate for networks: protocol overhead is
      left to the caller's efficiency choice, the presets use the nominal rate).
    latency: seconds of fixed cost per transfer (one message / one DMA setup).
  """

  name: str
  bandwidth: float
  latency: float = 0.0

  def __post_init__(self):
    if self.bandwidth <= 0:
      raise ValueError(f"link {self.name!r}: bandwidth must be > 0 bytes/s, got {self.bandwidth}")
    if self.latency < 0:
      raise ValueError(f"link {self.name!r}: latency must be >= 0 s, got {self.latency}")

  def transfer_time(self, nbytes: float) -> float:
    """Seconds to move `nbytes` (0 bytes cost nothing: no message is sent)."""
    if nbytes < 0:
      raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return 0.0 if nbytes == 0 else self.latency + nbytes / self.bandwidth


LINKS: dict[str, Link] = {
    # PCIe 4.0 x16: 32 GB/s raw, ~25 GB/s achieved by pinned cudaMemcpy.
    "pcie4": Link("pcie4", 25e9, 10e-6),
    # NVLink 3 (A100), one direction between a GPU pair.
    "nvlink": Link("nvlink", 250e9, 5e-6),
    # The paper's VMs: 40 Gbps between A100 VMs, 32 Gbps between V100 VMs.
    "inter_vm_40gbps": Link("inter_vm_40gbps", 40e9 / 8, 50e-6),
    "inter_vm_32gbps": Link("inter_vm_32gbps", 32e9 / 8, 50e-6),
    # A host-to-host memcpy (pageable memory, one thread).
    "host_memcpy": Link("host_memcpy", 10e9, 1e-6),
}


def get_link(name_or_link: str | Link) -> Link:
  """Returns a preset link by name (or the `Link` itself)."""
  if isinstance(name_or_link, Link):
    return name_or_link
  if name_or_link not in LINKS:
    raise ValueError(f"unknown link {name_or_link!r}; known links: {', '.join(LINKS)}")
  return LINKS[name_or_link]


def kv_bytes(model: ModelConfig, layers: int, batch: int, tokens: int) -> int:
  """Bytes of K and V for `tokens` positions of `batch` sequences over `layers` layers."""
  return layers * batch * tokens * model.kv_bytes_per_token_per_layer()


def prompt_kv_bytes_per_layer(model: ModelConfig, batch: int, prompt_len: int) -> int:
  """Bytes of one layer's prompt cache of a microbatch (the unit layer-wise streaming sends)."""
  return kv_bytes(model, 1, batch, prompt_len)


def token_kv_bytes(model: ModelConfig, layers: int, batch: int) -> int:
  """Bytes of one generated token's K/V delta over `layers` layers (what swap-out/replication send)."""
  return kv_bytes(model, layers, batch, 1)


def activation_bytes(model: ModelConfig, batch: int, tokens: int) -> int:
  """Bytes of the hidden states passed between stages for `tokens` positions of `batch` rows."""
  return batch * tokens * model.hidden_size * model.dtype_bytes


def swap_in_time(link: Link, model: ModelConfig, layers: int, batch: int, context: int) -> float:
  """Seconds to bring a microbatch's whole cache (`context` tokens) of a stage onto the device."""
  return link.transfer_time(kv_bytes(model, layers, batch, context))


def swap_out_time(link: Link, model: ModelConfig, layers: int, batch: int) -> float:
  """Seconds to write back one step's token delta (only the delta is swapped out)."""
  return link.transfer_time(token_kv_bytes(model, layers, batch))


# ---------------------------------------------------------------------------------------------
# Roofline.


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator (or this CPU) and the efficiency factors the roofline applies to it.

  Attributes:
    name: preset name.
    peak_flops_16: dense float16/bfloat16 FLOP/s (tensor cores where they exist).
    peak_flops_32: dense float32 FLOP/s.
    mem_bandwidth: device memory bytes/s.
    memory_bytes: device memory capacity.
    compute_efficiency: fraction of peak FLOP/s that the large GEMMs of a prompt step achieve
      (FasterTransformer-class kernels reach 50-70% on A100 at batch x prompt >= 1k tokens).
    memory_efficiency: fraction of memory bandwidth that a decode step's weight + KV streaming
      achieves (~70-80% for GEMV-like kernels on HBM).
    layer_overhead_s: fixed seconds per layer per step (about ten kernel launches plus their
      synchronization); it dominates decode of small models and is why t is never ~0.
    host_link: link between device and host memory (swapping, host slots, replication).
  """

  name: str
  peak_flops_16: float
  peak_flops_32: float
  mem_bandwidth: float
  memory_bytes: float
  compute_efficiency: float = 0.6
  memory_efficiency: float = 0.75
  layer_overhead_s: float = 30e-6
  host_link: Link = LINKS["pcie4"]

  def peak_flops(self, dtype: str) -> float:
    return self.peak_flops_32 if dtype == "float32" else self.peak_flops_16


GIB = 2**30   # "80GB" HBM is 80 GiB (85.9e9 bytes), as nvidia-smi reports it

HARDWARE: dict[str, Hardware] = {
    "a100_80gb": Hardware("a100_80gb", 312e12, 19.5e12, 2.039e12, 80 * GIB),
    "v100_16gb": Hardware("v100_16gb", 125e12, 15.7e12, 0.9e12, 16 * GIB,
                          host_link=Link("pcie3", 12e9, 10e-6)),
    "h100_80gb": Hardware("h100_80gb", 989e12, 67e12, 3.35e12, 80 * GIB,
                          host_link=Link("pcie5", 50e9, 10e-6)),
}


def measure_cpu(matmul_size: int = 384, copy_mb: int = 32) -> Hardware:
  """Measures this CPU's matmul FLOP/s and memcpy bandwidth with numpy (well under a second).

  The measured numbers are already achieved rates, so the efficiency factors are 1; the per-layer
  overhead is the dispatch cost of one jitted step on CPU (order 50 us).
  """
  a = np.random.default_rng(0).standard_normal((matmul_size, matmul_size), dtype=np.float32)
  a @ a  # warm-up: BLAS thread pool start
  reps, best = 5, math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t0)
  flops = 2 * matmul_size**3 / max(best, 1e-9)
  src = np.ones(copy_mb * 2**20 // 8)
  dst = np.empty_like(src)
  best_copy = math.inf
  for _ in range(3):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best_copy = min(best_copy, time.perf_counter() - t0)
  # A copy reads and writes every byte; report bytes moved per second as for an HBM roofline.
  bw = 2 * src.nbytes / max(best_copy, 1e-9)
  return Hardware("this_cpu", peak_flops_16=flops, peak_flops_32=flops, mem_bandwidth=bw,
                  memory_bytes=8e9, compute_efficiency=1.0, memory_efficiency=1.0,
                  layer_overhead_s=50e-6, host_link=Link("host_memcpy", bw / 2, 1e-6))


def get_hardware(name_or_hw: str | Hardware) -> Hardware:
  """Returns a hardware preset ("a100_80gb", "v100_16gb", "h100_80gb", "this_cpu")."""
  if isinstance(name_or_hw, Hardware):
    return name_or_hw
  if name_or_hw == "this_cpu":
    return measure_cpu()
  if name_or_hw not in HARDWARE:
    raise ValueError(f"unknown hardware {name_or_hw!r}; known hardware: "
                     f"{', '.join(list(HARDWARE) + ['this_cpu'])}")
  return HARDWARE[name_or_hw]


@dataclasses.dataclass(frozen=True)
class RooflineCostModel:
  """max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth) per layer, plus a fixed overhead.

  A "machine" (one pipeline stage) is `gpus_per_machine` devices running the stage tensor-parallel;
  `tp_efficiency` is the fraction of linear scaling that tensor parallelism keeps (all-reduces).
  """

  model: ModelConfig
  hardware: Hardware
  gpus_per_machine: int = 1
  tp_efficiency: float = 0.9

  def _scale(self) -> float:
    n = self.gpus_per_machine
    return n * (self.tp_efficiency if n > 1 else 1.0)

  @property
  def machine_memory_bytes(self) -> float:
    return self.gpus_per_machine * self.hardware.memory_bytes

  @functools.cached_property
  def _consts(self) -> tuple:
    """The model's and hardware's per-step constants, computed once: the simulator asks for
    ~10^5 step times per run, and recomputing the layer sizes was most of its time."""
    m, hw, s = self.model, self.hardware, self._scale()
    return (hw.peak_flops(m.dtype) * hw.compute_efficiency * s,
            hw.mem_bandwidth * hw.memory_efficiency * s, hw.layer_overhead_s,
            m.layer_matmul_params(), m.layer_weight_bytes(), m.kv_bytes_per_token_per_layer(),
            m.hidden_size)

  def _time(self, flops: float, nbytes: float, layers: int) -> float:
    flop_rate, byte_rate, overhead = self._consts[:3]
    return max(flops / flop_rate, nbytes / byte_rate) + layers * overhead

  def _matmul_params(self) -> int:
    return self._consts[3]

  def prompt_time(self, layers: int, prompt_len: int, batch: int) -> float:
    _check_args(layers=layers, prompt_len=prompt_len, batch=batch)
    m, tokens = self.model, batch * prompt_len
    # 2 FLOPs per weight per token, plus QK^T and AV over the (causal, counted full) prompt.
    flops = layers * (2 * tokens * self._matmul_params() + 4 * batch * prompt_len**2 * m.hidden_size)
    nbytes = layers * (m.layer_weight_bytes() + kv_bytes(m, 1, batch, prompt_len)
                       + 2 * activation_bytes(m, batch, prompt_len))
    return self._time(flops, nbytes, layers)

  def token_time(self, layers: int, batch: int, context: int) -> float:
    _check_args(layers=layers, batch=batch, context=context)
    _, _, _, matmul, weights, kv_per_token, hidden = self._consts
    flops = layers * (2 * batch * matmul + 4 * batch * (context + 1) * hidden)
    # Decode streams every weight and the whole cache once per step (kv_bytes of context + 1).
    nbytes = layers * (weights + batch * (context + 1) * kv_per_token)
    return self._time(flops, nbytes, layers)

  def head_time(self, tokens: int) -> float:
    m = self.model
    flops = 2 * tokens * m.vocab_size * m.embed_dim
    nbytes = m.vocab_size * m.embed_dim * m.dtype_bytes
    return self._time(flops, nbytes, 0)


def roofline(model: ModelConfig, hardware: str | Hardware = "a100_80gb",
             gpus_per_machine: int = 1, tp_efficiency: float = 0.9) -> RooflineCostModel:
  """Roofline cost model of `model` on a preset (or given) `hardware`."""
  if gpus_per_machine < 1:
    raise ValueError(f"gpus_per_machine must be >= 1, got {gpus_per_machine}")
  if not 0 < tp_efficiency <= 1:
    raise ValueError(f"tp_efficiency must be in (0, 1], got {tp_efficiency}")
  return RooflineCostModel(model, get_hardware(hardware), gpus_per_machine, tp_efficiency)


# ---------------------------------------------------------------------------------------------
# User table.


class TableCostModel:
  """Per-layer step times given by the user, linear in the number of layers.

  `prompt` and `token` are either a scalar (seconds per layer, whatever the shape) or a mapping
  from `(prompt_len, batch)` / `(batch, context)` to seconds per layer on a full grid; lookups
  between grid points interpolate bilinearly and clamp outside the grid. `head` is a scalar or a
  mapping tokens -> seconds (interpolated). A stage's time is `layers * per_layer + stage_overhead`.
  """

  def __init__(self, model: ModelConfig, prompt, token, head=0.0, stage_overhead: float = 0.0):
    self.model = model
    self._prompt = _Grid.make("prompt", prompt)
    self._token = _Grid.make("token", token)
    self._head = _Grid.make("head", head, ndim=1)
    self.stage_overhead = float(stage_overhead)

  @classmethod
  def from_dict(cls, model: ModelConfig, table: Mapping) -> "TableCostModel":
    """Builds from {"prompt": ..., "token": ..., "head": ...}; grid keys may be "a,b" strings."""
    unknown = set(table) - {"prompt", "token", "head", "stage_overhead"}
    if unknown:
      raise ValueError(f"unknown cost table keys {sorted(unknown)}")
    if "prompt" not in table or "token" not in table:
      raise ValueError("a cost table needs both 'prompt' and 'token' entries")
    return cls(model, table["prompt"], table["token"], table.get("head", 0.0),
               table.get("stage_overhead", 0.0))

  @classmethod
  def from_json(cls, model: ModelConfig, path: str) -> "TableCostModel":
    with open(path) as f:
      return cls.from_dict(model, json.load(f))

  def prompt_time(self, layers: int, prompt_len: int, batch: int) -> float:
    _check_args(layers=layers, prompt_len=prompt_len, batch=batch)
    return layers * self._prompt(prompt_len, batch) + self.stage_overhead

  def token_time(self, layers: int, batch: int, context: int) -> float:
    _check_args(layers=layers, batch=batch, context=context)
    return layers * self._token(batch, context) + self.stage_overhead

  def head_time(self, tokens: int) -> float:
    return self._head(tokens)


class _Grid:
  """A scalar or a full grid of values with clamped (bi)linear interpolation."""

  def __init__(self, axes: list[np.ndarray], values: np.ndarray):
    self.axes, self.values = axes, values

  @classmethod
  def make(cls, what: str, spec, ndim: int = 2) -> "_Grid":
    if isinstance(spec, (int, float)):
      if spec < 0:
        raise ValueError(f"{what} time must be >= 0, got {spec}")
      return cls([], np.asarray(float(spec)))
    if not isinstance(spec, Mapping) or not spec:
      raise ValueError(f"{what} table must be a number or a non-empty mapping, got {spec!r}")
    keys = [_parse_key(k, ndim) for k in spec]
    axes = [np.unique([k[i] for k in keys]).astype(float) for i in range(ndim)]
    values = np.full([len(a) for a in axes], np.nan)
    for k, v in zip(keys, spec.values()):
      if v < 0:
        raise ValueError(f"{what} table entry {k} is negative: {v}")
      values[tuple(int(np.searchsorted(axes[i], k[i])) for i in range(ndim))] = float(v)
    if np.isnan(values).any():
      raise ValueError(f"{what} table must be a full grid over {[a.tolist() for a in axes]}")
    return cls(axes, values)

  def __call__(self, *x: float) -> float:
    v = self.values
    for axis, xi in zip(self.axes, x):
      # Interpolate along the leading axis, keeping the rest.
      v = np.apply_along_axis(lambda col: np.interp(xi, axis, col), 0, v) if v.ndim > 1 \
          else np.interp(xi, axis, v)
    return float(v)


def _parse_key(k, ndim: int) -> tuple[float, ...]:
  if isinstance(k, str):
    k = tuple(float(p) for p in k.split(","))
  elif not isinstance(k, tuple):
    k = (k,)
  if len(k) != ndim:
    raise ValueError(f"table key {k!r} must have {ndim} component(s)")
  return tuple(float(p) for p in k)


# ---------------------------------------------------------------------------------------------
# Calibration.


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One measured stage step: kind is "prompt", "token" or "head"; length is the prompt length
  (prompt), the cached context (token) or the number of positions (head)."""

  kind: str
  layers: int
  length: int
  batch: int
  seconds: float


class CalibratedCostModel:
  """Affine fit per kind (non-negative coefficients, so it never predicts negative times):

    prompt = c0 + layers * (a0 + a1 * batch * prompt_len + a2 * batch * prompt_len**2)
    token  = d0 + layers * (b0 + b1 * batch + b2 * batch * context)
    head   = e0 + e1 * tokens
  """

  def __init__(self, model: ModelConfig, prompt_coef, token_coef, head_coef):
    self.model = model
    self.prompt_coef = np.asarray(prompt_coef, float)
    self.token_coef = np.asarray(token_coef, float)
    self.head_coef = np.asarray(head_coef, float)

  @staticmethod
  def features(kind: str, layers: int, length: int, batch: int) -> np.ndarray:
    if kind == "prompt":
      return np.array([1.0, layers, layers * batch * length, layers * batch * length**2])
    if kind == "token":
      return np.array([1.0, layers, layers * batch, layers * batch * length])
    if kind == "head":
      return np.array([1.0, batch * length])
    raise ValueError(f"unknown measurement kind {kind!r}; expected prompt, token or head")

  def prompt_time(self, layers: int, prompt_len: int, batch: int) -> float:
    _check_args(layers=layers, prompt_len=prompt_len, batch=batch)
    return float(self.features("prompt", layers, prompt_len, batch) @ self.prompt_coef)

  def token_time(self, layers: int, batch: int, context: int) -> float:
    _check_args(layers=layers, batch=batch, context=context)
    return float(self.features("token", layers, context, batch) @ self.token_coef)

  def head_time(self, tokens: int) -> float:
    return float(self.features("head", 1, tokens, 1) @ self.head_coef)


def calibrate(model: ModelConfig,
              measurements: Iterable[Measurement | Sequence | Mapping]) -> CalibratedCostModel:
  """Fits a `CalibratedCostModel` to measured stage step times.

  Args:
    model: the model the measurements were taken on.
    measurements: `Measurement`s, tuples `(kind, layers, length, batch, seconds)` or dicts with
      those keys. Needs at least one prompt and one token record; head records are optional.
  """
  from scipy.optimize import nnls  # scipy comes with jax

  rows: dict[str, list[tuple[np.ndarray, float]]] = {"prompt": [], "token": [], "head": []}
  for rec in measurements:
    if isinstance(rec, Mapping):
      rec = Measurement(**rec)
    elif not isinstance(rec, Measurement):
      rec = Measurement(*rec)
    if rec.seconds < 0 or rec.layers < 1 or rec.batch < 1 or rec.length < 0:
      raise ValueError(f"invalid measurement {rec}")
    rows[rec.kind if rec.kind in rows else _bad_kind(rec.kind)].append(
        (CalibratedCostModel.features(rec.kind, rec.layers, rec.length, rec.batch), rec.seconds))
  coefs = {}
  for kind, data in rows.items():
    if not data:
      if kind == "head":
        coefs[kind] = np.zeros(2)
        continue
      raise ValueError(f"calibration needs at least one {kind!r} measurement")
    x = np.stack([f for f, _ in data])
    y = np.array([s for _, s in data])
    # Scale columns so that NNLS is well conditioned across features of very different sizes.
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)
    coef, _ = nnls(x / scale, y)
    coefs[kind] = coef / scale
  return CalibratedCostModel(model, coefs["prompt"], coefs["token"], coefs["head"])


def _bad_kind(kind):
  raise ValueError(f"unknown measurement kind {kind!r}; expected prompt, token or head")


def _check_args(**kw):
  for name, v in kw.items():
    lo = 0 if name == "context" else 1
    if v < lo:
      raise ValueError(f"{name} must be >= {lo}, got {v}")


def streamed_prompt_time(compute: float, layers: int, per_layer_transfer: float) -> float:
  """A prompt stage's time when each layer's KV is sent while the next layer computes."""
  c = compute / layers
  x = per_layer_transfer
  return c + x + (layers - 1) * max(c, x)


# ---------------------------------------------------------------------------------------------
# Links calibrated from a measured table (benchmarks/transport.py).

# The paths bytes take in DéjàVu, each a `Link` once calibrated: a prompt layer's KV from a
# prompt worker to a token worker, a step's KV delta to the replica holder, a cache from host
# memory onto the device (swapping, host slots), a stage's weights onto a replacement.
LINK_PATHS = ("prompt_kv", "replica_delta", "swap_in", "weights")
# Transports measured as a reference only (one process): never chosen for a path by default.
REFERENCE_TRANSPORTS = ("memcpy",)
# Where benchmarks/transport.py writes its table by default (relative to the repository root):
# figures that use a measured table "when it exists" look here.
DEFAULT_LINK_TABLE = os.path.join("results", "transport", "links.json")


class LinkTableError(ValueError):
  """A link table that cannot be calibrated (missing rows, one size only, bad numbers)."""


def load_link_table(path: str) -> dict:
  """A link table written by benchmarks/transport.py (JSON with a "rows" list)."""
  try:
    with open(path) as f:
      table = json.load(f)
  except OSError as e:
    raise LinkTableError(f"cannot read link table {path!r}: {e}") from None
  except json.JSONDecodeError as e:
    raise LinkTableError(f"link table {path!r} is not JSON: {e}") from None
  if not isinstance(table, Mapping) or not isinstance(table.get("rows"), list):
    raise LinkTableError(f"link table {path!r} has no 'rows' list")
  return dict(table)


def link_table_record(path: str) -> dict:
  """Which table a run used, for its summary / run.json: the path and its content's sha256."""
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {"path": os.path.abspath(path), "sha256": digest}


def fit_link(name: str, points: Sequence[tuple[float, float]]) -> Link:
  """latency + bytes / bandwidth through measured `(bytes, seconds)` points (least squares,
  latency >= 0). Needs two distinct sizes; two points are fitted exactly."""
  from scipy.optimize import nnls  # pylint: disable=g-import-not-at-top
  sizes = sorted({float(b) for b, _ in points})
  if len(sizes) < 2:
    raise LinkTableError(f"link {name!r}: needs measurements at two sizes or more, got "
                         f"{sizes or 'none'}")
  for b, t in points:
    if not (b > 0 and t > 0 and math.isfinite(t)):
      raise LinkTableError(f"link {name!r}: bad measurement ({b} bytes, {t} s)")
  x = np.array([[1.0, float(b)] for b, _ in points])
  y = np.array([float(t) for _, t in points])
  scale = x.max(axis=0)
  (latency, per_byte), _ = nnls(x / scale, y)
  latency, per_byte = latency / scale[0], per_byte / scale[1]
  if per_byte <= 0:
    raise LinkTableError(f"link {name!r}: time does not grow with size ({points}); no bandwidth "
                         "can be fitted")
  return Link(name, 1.0 / per_byte, float(latency))


def calibrate_links(table: Mapping, gpu_table: Mapping | None = None,
                    transports: Mapping[str, str] | None = None) -> dict[str, Link]:
  """One `Link` per path of `LINK_PATHS` from a measured table (benchmarks/transport.py).

  Args:
    table: {"rows": [{"path", "transport", "bytes", "seconds"}, ...]}: the median time of one
      message of `bytes` on `path` over `transport`.
    gpu_table: the same, measured on a GPU machine: its rows replace `table`'s for every path it
      has (host<->device copies and weight loads are the GPU's there).
    transports: path -> the transport to calibrate it from; default: the one fastest at the
      path's largest measured size (reference transports such as in-process memcpy only when
      nothing else was measured).
  Returns {path: Link(f"{path}:{transport}", bandwidth, latency)} for every path with rows.
  """
  rows: dict[str, list] = {}
  for source in (table, gpu_table):
    if source is None:
      continue
    got: dict[str, list] = {}
    for r in source.get("rows", ()):
      for key in ("path", "transport", "bytes", "seconds"):
        if key not in r:
          raise LinkTableError(f"link table row {r!r} has no {key!r}")
      if r["path"] not in LINK_PATHS:
        raise LinkTableError(f"unknown link path {r['path']!r}; expected one of {LINK_PATHS}")
      got.setdefault(r["path"], []).append(r)
    rows.update(got)   # a GPU table's path replaces the CPU table's
  if not rows:
    raise LinkTableError("the link table has no rows")
  transports = dict(transports or {})
  unknown = set(transports) - set(LINK_PATHS)
  if unknown:
    raise LinkTableError(f"unknown link path(s) {sorted(unknown)}; expected {LINK_PATHS}")
  out = {}
  for path, rs in rows.items():
    by_t: dict[str, list] = {}
    for r in rs:
      by_t.setdefault(r["transport"], []).append((float(r["bytes"]), float(r["seconds"])))
    chosen = transports.get(path)
    if chosen is None:
      real = [t for t in by_t if t not in REFERENCE_TRANSPORTS] or list(by_t)
      top = max(b for t in real for b, _ in by_t[t])
      at_top = {t: min(s for b, s in by_t[t] if b == top) for t in real
                if any(b == top for b, _ in by_t[t])}
      chosen = min(at_top, key=at_top.get)
    elif chosen not in by_t:
      raise LinkTableError(f"path {path!r} has no measurements over transport {chosen!r}; "
                           f"measured: {sorted(by_t)}")
    out[path] = fit_link(f"{path}:{chosen}", by_t[chosen])
  missing = set(transports) - set(out)
  if missing:
    raise LinkTableError(f"the link table has no rows for path(s) {sorted(missing)}")
  return out


def calibrated_links(path: str | None) -> dict[str, Link]:
  """`calibrate_links` of the table at `path` ({} for None)."""
  return calibrate_links(load_link_table(path)) if path else {}
