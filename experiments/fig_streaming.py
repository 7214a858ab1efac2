"""Figure: the paper's streaming ablation per prompt length (`configs/fig_streaming.py`).

For each prompt length and each mode of `dejavu_jax.stream.ablation` (naive, buffered,
layerwise, background) it measures, for real on this machine, the exposed time of streaming the
prompt's KV cache into a host log (from the end of the prompt's compute until the log holds it)
and one decode step's delta (synchronous modes: the copy; background: the submit only), with the
benchmark's procedure (`benchmarks/streaming.py compute_ablation`). Writes `streaming.jsonl` and
`streaming.png` (exposed prompt streaming time per mode, on one chart) to --output_dir.

  python -m experiments.fig_streaming --config=configs/fig_streaming.py --output_dir=/tmp/fig
"""

import os
import time
import types

from benchmarks import streaming as bench
from dejavu_jax.studies import reporting
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import runrecord
from dejavu_jax.stream import ablation


KIND = "measured"
TABLE = ("prompt_len", "system", "prompt_stream_ms", "prompt_speedup_vs_naive",
         "token_step_stream_ms", "prefill_ms")


def setting(c) -> str:
  return (f"{c.get('variant', 'cpu')}: {c.model} x{c.compute_layers} layers ({c.dtype}) on this "
          f"CPU, batch {c.batch}, prompt {list(c.prompt_lens)}, medians of {c.runs}")


def _background_submit_s(cfg, args) -> float:
  """What the background mode costs the decode loop per step: its submit (gather + enqueue)."""
  return bench.decode_overhead(cfg, args)["submit_s"]


def run(c, out_dir, log=print) -> list[dict]:
  os.makedirs(out_dir, exist_ok=True)
  cfg = get_model_config(c.model, dtype=c.dtype, **dict(c.get("model_overrides") or {}))
  rows, series = [], {m: ([], []) for m in ablation.MODES}
  bar = runrecord.progress_bar(len(c.prompt_lens), "streaming ablation", bool(log))
  for i, n in enumerate(c.prompt_lens):
    max_len = 1 << (n + 16 - 1).bit_length()     # a cache with room for a few decode steps
    args = types.SimpleNamespace(compute_layers=c.compute_layers, prompt=n, max_len=max_len,
                                 batch=c.batch, runs=c.runs, decode_steps=4,
                                 decode_runs=max(c.runs, 1))
    t0 = time.perf_counter()
    comp, token = bench.compute_ablation(cfg, args)
    token["background"] = _background_submit_s(cfg, args)
    for mode in ablation.MODES:
      p = comp["prompt"][mode]
      rows.append({"prompt_len": n, "system": mode, "prompt_stream_ms": p * 1e3,
                   "prompt_total_ms": comp["totals_s"][mode] * 1e3,
                   "prompt_speedup_vs_naive": comp["prompt"]["naive"] / max(p, 1e-9),
                   "token_step_stream_ms": token[mode] * 1e3,
                   "prefill_ms": comp["prefill_s"] * 1e3, "model": c.model, "dtype": c.dtype,
                   "batch": c.batch, "compute_layers": c.compute_layers,
                   "measure_s": time.perf_counter() - t0})
      series[mode][0].append(n)
      series[mode][1].append(p * 1e3)
    bar(i + 1, len(c.prompt_lens))
  bar.close()
  reporting.write_rows(os.path.join(out_dir, "streaming.jsonl"), rows)
  reporting.plot_lines(series, os.path.join(out_dir, "streaming.png"), xlabel="prompt tokens",
                       ylabel="exposed prompt streaming time (ms)", log_y=True,
                       title=f"{c.model} x{c.compute_layers} layers, batch {c.batch}, {c.dtype}")
  return rows


def headline(rows) -> str:
  n = max(r["prompt_len"] for r in rows)
  at = {r["system"]: r for r in rows if r["prompt_len"] == n}
  return (f"prompt {n}: exposed prompt streaming vs naive: " + ", ".join(
      f"{m} {at[m]['prompt_speedup_vs_naive']:.2f}x" for m in ablation.MODES if m != "naive")
      + f"; token step: naive {at['naive']['token_step_stream_ms']:.2f} ms, background "
      f"{at['background']['token_step_stream_ms']:.2f} ms")


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_streaming.py", "results/fig_streaming")
