"""flush / fetch: the transports that move a buffer between device memory, host memory and devices.

This module owns the choice of how bytes leave and reach a device:

- `flush`: device -> host numpy, optionally straight into a preallocated destination (a slice of
  a host KV log). Methods:
    "async"  `copy_to_host_async()` then `np.asarray`: on a CPU backend the array already lives in
             host RAM and `np.asarray` is a zero-copy view, so the only copy is the one into `out`;
             on an accelerator it is one DMA into a host buffer.
    "pinned" `jax.device_put` to the device's host memory kind ("pinned_host", else
             "unpinned_host"), then a view. On the pinned jax's CPU backend this copy allocates a
             fresh host buffer (page faults bound it near 1.4 GB/s here), so "auto" prefers "async"
             on CPU and "pinned" where a real device->host DMA exists.
  A backend without host memory kinds falls back to "async" cleanly.
- `fetch`: host -> device (`jax.device_put`).
- `copy_to`: device -> device (`jax.device_put`; no collectives, which can deadlock on forced CPU
  devices when dispatched from several threads).

`start_flush` begins a device->host copy without blocking, so the caller's thread only dispatches
and a background thread finishes with `flush` (see streamer.py).
"""

from __future__ import annotations

import jax
import numpy as np

from dejavu_jax.stream.packing import Packed

METHODS = ("auto", "async", "pinned")


def host_memory_kind(device: jax.Device) -> str | None:
  """The host memory kind a device can place arrays in, or None where the backend has none."""
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # Backends without the memories API.
    return None
  for kind in ("pinned_host", "unpinned_host"):
    if kind in kinds:
      return kind
  return None


def resolve_method(method: str, device: jax.Device) -> str:
  """The concrete method ("async" or "pinned") that `method` means on `device`."""
  if method not in METHODS:
    raise ValueError(f"unknown flush method {method!r}; expected one of {METHODS}")
  if method == "auto":
    method = "async" if device.platform == "cpu" else "pinned"
  if method == "pinned" and host_memory_kind(device) is None:
    method = "async"
  return method


def _device_of(x: jax.Array) -> jax.Device:
  return next(iter(x.devices()))


def start_flush(x, method: str = "auto"):
  """Starts copying `x` to host memory; returns a handle for `flush`. Does not block."""
  if not isinstance(x, jax.Array):
    return x
  dev = _device_of(x)
  if resolve_method(method, dev) == "pinned":
    kind = host_memory_kind(dev)
    if x.sharding.memory_kind == kind:
      return x
    return jax.device_put(x, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))
  x.copy_to_host_async()
  return x


def flush(x, out: np.ndarray | None = None, method: str = "auto") -> np.ndarray:
  """Copies a device array (or a `start_flush` handle) to host memory. Blocks until done.

  Args:
    x: a jax.Array on one device, a handle from `start_flush`, or a numpy array.
    out: optional preallocated host destination of the same shape; the data lands there.
    method: "auto", "async" or "pinned" (see the module docstring).
  Returns:
    `out` when given; otherwise a host array the caller owns (never a view of device memory
    that a later donation could recycle).
  """
  h = start_flush(x, method)
  view = np.asarray(h)
  if out is None:
    # A view of a CPU device buffer (or of a pinned buffer) is copied so the result is owned.
    return view.copy() if not view.flags.owndata else view
  if out.shape != view.shape:
    raise ValueError(f"flush destination has shape {out.shape}, the source {view.shape}")
  np.copyto(out, view, casting="no")
  return out


def fetch(host, device: jax.Device) -> jax.Array:
  """Copies a host array (numpy, or a jax array in a host memory kind) onto `device`."""
  if isinstance(host, jax.Array) and host.sharding.memory_kind not in (None, "device"):
    return jax.device_put(host, jax.sharding.SingleDeviceSharding(device, memory_kind="device"))
  return jax.device_put(host, device)


def copy_to(x: jax.Array, device: jax.Device) -> jax.Array:
  """Copies a device array onto another device (asynchronous, like any dispatch)."""
  return jax.device_put(x, device)


# ---- the same on a Packed slice ----
def flush_packed(packed: Packed, method: str = "auto") -> Packed:
  """A Packed with host (numpy) arrays. Blocks until the copy is done."""
  return packed.replace(data=flush(packed.data, method=method),
                        positions=flush(packed.positions, method=method))


def fetch_packed(packed: Packed, device: jax.Device) -> Packed:
  """A Packed with its arrays on `device`."""
  return packed.replace(data=fetch(packed.data, device),
                        positions=fetch(packed.positions, device))


def copy_packed(packed: Packed, device: jax.Device) -> Packed:
  return packed.replace(data=copy_to(packed.data, device),
                        positions=copy_to(packed.positions, device))
