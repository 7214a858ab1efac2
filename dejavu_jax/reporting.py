"""What every figure script writes: result rows as JSONL, Markdown tables, and one-axis charts.

A figure script (`experiments/fig_*.py`) returns a list of flat dict rows, each naming the
`system` it measured; `write_rows` saves them (strict JSON, never appended), `markdown_table`
renders chosen columns for the index page, and `plot_lines` / `plot_bars` draw every compared
system on one chart through the same figure path as `serving.metrics` (no pyplot state).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from dejavu_jax.serving import metrics


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
  fig, ax = metrics._new_figure()  # pylint: disable=protected-access
  for i, (label, (xs, ys)) in enumerate(series.items()):
    ax.plot(xs, ys, (styles or {}).get(label, "o-"), color=f"C{i % 10}", label=str(label))
  if log_y:
    ax.set_yscale("log")
  if log_x:
    ax.set_xscale("log")
  return metrics._finish_figure(fig, ax, path, xlabel, ylabel, title)  # pylint: disable=protected-access


def plot_bars(groups: Sequence[str], bars: dict, path: str, *, ylabel: str,
              title: str | None = None, log_y: bool = False) -> str:
  """Grouped bars: `bars` maps a system to one value per group (NaN: no bar)."""
  fig, ax = metrics._new_figure()  # pylint: disable=protected-access
  n = max(len(bars), 1)
  width = 0.8 / n
  x = np.arange(len(groups))
  for i, (label, values) in enumerate(bars.items()):
    ax.bar(x + (i - (n - 1) / 2) * width, values, width, color=f"C{i % 10}", label=str(label))
  ax.set_xticks(x)
  ax.set_xticklabels(groups, rotation=15 if len(groups) > 3 else 0, fontsize=8)
  if log_y:
    ax.set_yscale("log")
  return metrics._finish_figure(fig, ax, path, "", ylabel, title)  # pylint: disable=protected-access
