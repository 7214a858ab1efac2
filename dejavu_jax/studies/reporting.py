"""What every figure script writes: result rows as JSONL, Markdown tables, and one-axis charts.

A figure script (`experiments/fig_*.py`) returns a list of flat dict rows, each naming the
`system` it measured; `write_rows` saves them (strict JSON, never appended), `markdown_table`
renders chosen columns for the index page, and `plot_lines` / `plot_bars` draw every compared
system on one chart (no pyplot state), and the serve runner's latency-vs-rate and failure-timeline
charts.

What a reviewer needs to read a chart: every legend entry visible (each line its own
marker and dash; coinciding timeline curves drawn a point apart), failures marked and labelled,
a failure-free baseline drawn first wherever failures are, validity warnings printed on the
figure, bars on a linear axis with their values and the legend clear of them.
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

import numpy as np
from matplotlib import transforms as mtransforms

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
    if styles and label in styles:
      ax.plot(xs, ys, styles[label], color=f"C{i % 10}", label=str(label))
    else:
      ax.plot(xs, ys, color=f"C{i % 10}", label=str(label), **_distinct(i, len(xs)))
  if log_y:
    ax.set_yscale("log")
  if log_x:
    ax.set_xscale("log")
  return _finish_figure(fig, ax, path, xlabel, ylabel, title)


def plot_bars(groups: Sequence[str], bars: dict, path: str, *, ylabel: str,
              title: str | None = None, value_fmt: str = "{:.3g}",
              baseline: str | None = None) -> str:
  """Grouped bars on a linear axis (a bar's length is its value), each labelled with its value:
  `bars` maps a system to one value per group (NaN: no bar). `baseline` (a key of `bars`) is
  drawn hatched grey, first, so every other bar reads against it. The legend sits above the axes,
  clear of the bars."""
  fig, ax = _new_figure()
  order = ([baseline] if baseline in bars else []) + [k for k in bars if k != baseline]
  n = max(len(order), 1)
  width = 0.8 / n
  x = np.arange(len(groups))
  top = 0.0
  shift = 1 if baseline in bars else 0   # the same colour per system as in the line charts
  for i, label in enumerate(order):
    values = np.asarray(bars[label], np.float64)
    style = (dict(color="0.75", hatch="//", edgecolor="0.3") if label == baseline else
             dict(color=f"C{(i - shift) % 10}"))
    rects = ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=str(label), **style)
    ax.bar_label(rects, labels=[value_fmt.format(v) if np.isfinite(v) else "" for v in values],
                 fontsize=7, padding=2)
    if np.isfinite(values).any():
      top = max(top, float(np.nanmax(values)))
  ax.set_xticks(x)
  ax.set_xticklabels(groups, rotation=15 if len(groups) > 3 else 0, fontsize=8)
  ax.set_ylim(0, top * 1.15 if top > 0 else 1)
  return _finish_figure(fig, ax, path, "", ylabel, title, legend_above=True)


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
    ax.plot(rates, [r[median_key] for r in pts], "-", marker=_MARKERS[i % len(_MARKERS)],
            color=color, label=f"{label} {_stat_name(median_key)}")
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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def _distinct(i: int, n_points: int) -> dict:
  """Line style i: its own marker and dash, markers staggered along the line, so series that
  coincide (e.g. two strategies with the same timeline) still show every legend entry."""
  every = max(1, n_points // 8)
  return dict(marker=_MARKERS[i % len(_MARKERS)], linestyle=_LINESTYLES[i % len(_LINESTYLES)],
              markevery=(min(i % every, max(n_points - 1, 0)), every), markersize=5,
              linewidth=1.4)


def _finish_figure(fig, ax, path, xlabel: str, ylabel: str, title: str | None,
                   legend_above: bool = False, notes: Sequence[str] = ()) -> str:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  handles, _ = ax.get_legend_handles_labels()
  n = len(handles)
  if legend_above and n:
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01, 1.0, 0.2), mode="expand",
              ncol=min(n, 3), fontsize=8, frameon=False, borderaxespad=0.0)
    if title:
      fig.suptitle(title, fontsize=10)
  else:
    if title:
      ax.set_title(title, fontsize=10)
    if n:
      ax.legend(fontsize=8)
  if notes:
    import textwrap  # pylint: disable=g-import-not-at-top
    shown = [textwrap.shorten("! " + w, 125, placeholder=" ...") for w in notes[:3]]
    if len(notes) > 3:
      shown[-1] = f"! ... and {len(notes) - 2} more warnings (comparison.md, summary.jsonl)"
    text = "\n".join(shown)
    fig.text(0.01, 0.01, text, fontsize=6.5, color="firebrick", va="bottom", ha="left",
             wrap=True)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * min(len(notes), 3), 1, 1))
  else:
    fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


FAILURE_FREE_PREFIX = "failure-free"


def plot_failure_timeline(runs: dict, path: str | os.PathLike, *,
                          failure_times: Sequence[float] | dict = (), title: str | None = None,
                          failure_labels: Sequence[str] | None = None,
                          notes: Sequence[str] = ()) -> str:
  """Cumulative end-to-end latency of finished requests against time, one curve per run, as in
  the paper's failure figures: a failure shows as a flat stretch (nothing finishes) followed by a
  steeper climb (the redone and delayed requests). Labelled dashed vertical lines mark the
  failures; a run whose label starts with 'failure-free' is the baseline (black, drawn under the
  others); every curve has its own marker and dash, so curves that coincide stay visible.

  Args:
    runs: label -> RequestRecords of one run (name the seed in the label when seeds differ).
    path: the image file.
    failure_times: seconds at which failures were injected, or {run label: seconds at which its
      failures fired} (failures placed by step fire at a different time in every run: each is
      marked in its run's colour).
    title: the figure title.
    failure_labels: one legend label per failure (default 'failure at T s').
    notes: validity warnings, printed in red under the axes (e.g. 'the failure hit no work').
  """
  fig, ax = _new_figure()
  ordered = sorted(runs.items(), key=lambda kv: not str(kv[0]).startswith(FAILURE_FREE_PREFIX))
  per_run = failure_times if isinstance(failure_times, dict) else {}
  i = 0
  for label, records in ordered:
    done = sorted((r for r in records if r.done), key=lambda r: r.finish)
    t = [0.0] + [r.finish for r in done]
    cum = [0.0] + np.cumsum([r.finish - r.arrival for r in done]).tolist()
    if str(label).startswith(FAILURE_FREE_PREFIX):
      ax.step(t, cum, where="post", color="k", linewidth=2.2, alpha=0.55, label=str(label),
              zorder=1)
      continue
    # Curves that coincide (strategies losing nothing) are shifted by a point or two each, and
    # later ones drawn smaller on top, so every legend entry stays visible.
    shifted = mtransforms.offset_copy(ax.transData, fig=fig, x=1.2 * i, y=1.2 * i,
                                      units="points")
    style = _distinct(i, len(t)) | {"markersize": max(3.0, 7.0 - i)}
    ax.step(t, cum, where="post", color=f"C{i % 10}", label=str(label), zorder=2 + i,
            transform=shifted, **style)
    ax.update_datalim(np.column_stack([t, cum]))   # a shifted artist is not autoscaled
    for j, ft in enumerate(per_run.get(label, ())):
      ax.axvline(ft, color=f"C{i % 10}", linestyle=(0, (4, 2)), linewidth=1.0,
                 label=f"{label}: failure at {ft:.2f} s")
    i += 1
  ax.autoscale_view()
  shared = () if per_run else failure_times
  labels = list(failure_labels or [f"failure at {ft:.2f} s" for ft in shared])
  for j, ft in enumerate(shared):
    ax.axvline(ft, color="firebrick", linestyle=(0, (4, 2)), linewidth=1.0,
               label="failure injected" if j == 0 else None)
    ax.annotate(labels[j] if j < len(labels) else "failure", xy=(ft, 0.98),
                xycoords=("data", "axes fraction"), xytext=(-3, 0), textcoords="offset points",
                rotation=90, va="top", ha="right", fontsize=7, color="firebrick")
  return _finish_figure(fig, ax, path, "time (s)", "cumulative latency (s)", title,
                        notes=notes)
