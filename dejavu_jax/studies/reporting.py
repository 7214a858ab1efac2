"""What every figure script writes: result rows as JSONL, Markdown tables, and one-axis charts.

A figure script (`experiments/fig_*.py`) returns a list of flat dict rows, each naming the
`system` it measured; `write_rows` saves them (strict JSON, never appended), `markdown_table`
renders chosen columns for the index page, and `plot_lines` / `plot_bars` draw every compared
system on one chart (no pyplot state), and the serve runner's latency-vs-rate and failure-timeline
charts.
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

import numpy as np

from dejavu_jax import metrics


def write_rows(path: str, rows: Sequence[dict]) -> str:
  """One JSON object per row (strict JSON: NaN/inf -> null); overwrites `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(metrics.dumps(row) + "\n")
  return path


def _cell(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return "-" if not math.isfinite(v) else f"{v:.4g}"
  return str(v).replace("|", "/")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  """Rows as a Markdown table; `columns` picks and orders them (default: every key seen)."""
  if not rows:
    return "(no rows)"
  if columns is None:
    columns = []
    for r in rows:
      columns += [k for k in r if k not in columns and not isinstance(r[k], (dict, list))]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def plot_lines(series: dict, path: str, *, xlabel: str, ylabel: str, title: str | None = None,
               log_y: bool = False, log_x: bool = False, styles: dict | None = None) -> str:
  """`series`: label -> (xs, ys); one colour per label (a `styles[label]` format overrides)."""
  fig, ax = _new_figure()
  for i, (label, (xs, ys)) in enumerate(series.items()):
    ax.plot(xs, ys, (styles or {}).get(label, "o-"), color=f"C{i % 10}", label=str(label))
  if log_y:
    ax.set_yscale("log")
  if log_x:
    ax.set_xscale("log")
  return _finish_figure(fig, ax, path, xlabel, ylabel, title)


def plot_bars(groups: Sequence[str], bars: dict, path: str, *, ylabel: str,
              title: str | None = None, log_y: bool = False) -> str:
  """Grouped bars: `bars` maps a system to one value per group (NaN: no bar)."""
  fig, ax = _new_figure()
  n = max(len(bars), 1)
  width = 0.8 / n
  x = np.arange(len(groups))
  for i, (label, values) in enumerate(bars.items()):
    ax.bar(x + (i - (n - 1) / 2) * width, values, width, color=f"C{i % 10}", label=str(label))
  ax.set_xticks(x)
  ax.set_xticklabels(groups, rotation=15 if len(groups) > 3 else 0, fontsize=8)
  if log_y:
    ax.set_yscale("log")
  return _finish_figure(fig, ax, path, "", ylabel, title)


def _stat_name(key: str) -> str:
  """'p99' from 'norm_latency_p99_s_per_tok' (the legend's name for a series)."""
  m = re.search(r"(?:^|_)(p\d+|mean|median)(?:_|$)", key)
  return m.group(1) if m else key


def plot_latency_vs_rate(rows: Sequence[dict], path: str | os.PathLike, *,
                         rate_key: str = "rate", system_key: str = "system",
                         median_key: str = "norm_latency_p50_s_per_tok",
                         tail_key: str | None = "norm_latency_p99_s_per_tok",
                         title: str | None = None, log_y: bool = False) -> str:
  """Normalized latency against request rate, as in the paper's figures, saved to `path`.

  Args:
    rows: one summary per (system, rate), with the request rate under `rate_key` and, when
      several systems are compared, the system's name under `system_key`.
    path: the image file (format from the extension, e.g. .png or .pdf).
    rate_key: the key holding the request rate (requests/s).
    system_key: the key naming the system; rows without it form one unnamed series.
    median_key: drawn solid, with markers.
    tail_key: drawn dashed in the same color; None to leave it out.
    title: the figure title.
    log_y: a logarithmic latency axis (latency explodes past saturation).

  Returns:
    `path`, as a string.
  """
  series: dict[str, list[dict]] = {}
  for row in rows:
    if rate_key not in row:
      raise ValueError(f"a row has no request rate under {rate_key!r}: keys {sorted(row)}")
    series.setdefault(str(row.get(system_key, "")), []).append(row)
  fig, ax = _new_figure()
  for i, (system, pts) in enumerate(series.items()):
    pts = sorted(pts, key=lambda r: r[rate_key])
    rates = [r[rate_key] for r in pts]
    color = f"C{i % 10}"
    label = system or "system"
    ax.plot(rates, [r[median_key] for r in pts], "o-", color=color,
            label=f"{label} {_stat_name(median_key)}")
    if tail_key is not None:
      ax.plot(rates, [r[tail_key] for r in pts], "--", color=color,
              label=f"{label} {_stat_name(tail_key)}")
  if log_y:
    ax.set_yscale("log")
  return _finish_figure(fig, ax, path, "request rate (requests/s)",
                        "normalized latency (s/token)", title)


def _new_figure():
  """A figure built without pyplot: no global backend state, safe beside other threads."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.4, 4.2))
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def _finish_figure(fig, ax, path, xlabel: str, ylabel: str, title: str | None) -> str:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


def plot_failure_timeline(runs: dict, path: str | os.PathLike, *,
                          failure_times: Sequence[float] = (), title: str | None = None) -> str:
  """Cumulative end-to-end latency of finished requests against time, one curve per run, as in
  the paper's failure figures: a failure shows as a flat stretch (nothing finishes) followed by a
  steeper climb (the redone and delayed requests). Dashed vertical lines mark the failures.

  Args:
    runs: label -> RequestRecords of one run.
    path: the image file.
    failure_times: seconds at which failures were injected.
    title: the figure title.
  """
  fig, ax = _new_figure()
  for i, (label, records) in enumerate(runs.items()):
    done = sorted((r for r in records if r.done), key=lambda r: r.finish)
    t = [r.finish for r in done]
    cum = np.cumsum([r.finish - r.arrival for r in done])
    ax.step([0.0] + t, [0.0] + cum.tolist(), where="post", color=f"C{i % 10}", label=str(label))
  for ft in failure_times:
    ax.axvline(ft, color="k", linestyle="--", linewidth=0.8)
  return _finish_figure(fig, ax, path, "time (s)", "cumulative latency (s)", title)
