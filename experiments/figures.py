"""Every figure of the paper in one command, into one folder with an index page.

  python -m experiments.figures --config=configs/figures.py --output_dir=results/figures
  python -m experiments.figures --config=configs/figures.py --config.only='(failures,planner)'

`FIGURES` is the registry: each entry names a module with `run(config, output_dir) -> list[dict]`
(rows, each naming the `system` it measured) and the key of its config in `configs/figures.py`.
A module may also define `TABLE` (the columns the index shows) and `headline(rows) -> str` (the
number that goes into RESULTS.md). A figure whose module does not exist is listed in the index
as skipped, "module not available yet"; a figure that fails is listed with its error and the
others still run.

Each figure's headline is labelled `measured` or `modelled` (the module's `KIND`, else the
registry's `kind`) and shown beside its setting (the module's `setting(config)`, one line).

Writes `<output_dir>/<figure>/` (each figure's JSONL and plots), `figures.jsonl` (one row per
figure: status, wall time, kind, setting, headline, files), `run.json`, and `index.md` /
`index.html` (every plot beside its table and the config that made it).
"""

from __future__ import annotations

import dataclasses
import glob
import html
import importlib
import json
import os
import sys
import time
import traceback

# The engine figures (swapping, disaggregation) run pipelines on virtual CPU devices; the flag
# must be set before jax is imported (by any figure module).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli
from dejavu_jax.studies import reporting
from dejavu_jax import metrics
from dejavu_jax.studies import runrecord


@dataclasses.dataclass(frozen=True)
class Figure:
  name: str
  module: str
  title: str
  kind: str = "modelled"   # what its headline is when the module does not say (module.KIND)


FIGURES = (
    Figure("streaming", "experiments.fig_streaming",
           "Streaming ablation: naive / buffered / layer-by-layer / background, per prompt length",
           "measured"),
    Figure("stream_overhead", "experiments.fig_stream_overhead",
           "Streaming overhead: generation with the KV streamed to host, disk, another process",
           "measured"),
    Figure("ratio", "experiments.fig_ratio",
           "Prompt/token step-time ratio over microbatch size and prompt length"),
    Figure("failures", "experiments.fig_failures",
           "Failures (paper's setting): total runtime and cumulative latency over time per "
           "recovery strategy, one request's latency; simulator and paced engine [modelled]"),
    Figure("planner", "experiments.fig_planner",
           "Planner and cost/makespan on a trace: Baseline, Baseline-DP, DéjàVu; the planner's "
           "recommendation with and without DP replicas"),
    Figure("disagg_sim", "experiments.fig_disagg_sim",
           "Fig 8 (simulator): DéjàVu Dp-Dt vs Baseline-D, latency vs rate; link sensitivity"),
    Figure("swapping", "experiments.swapping",
           "Fig 9: batch B vs 2B with swapping per model, over the context; where it stops paying"),
    Figure("disaggregation", "experiments.disaggregation",
           "Fig 8 (paced engine + simulator): DéjàVu Dp-Dt vs Baseline-D, latency vs rate"),
)

MAX_TABLE_ROWS = 40
_FLAG_NAMES = ("config", "output_dir", "overwrite")

def _import(module_name: str):
  """The figure's module, or None when it does not exist (yet). A module that defines absl
  flags at import time would clash with this script's --config/--output_dir (already parsed and
  read by now): those flags are released first so its definitions succeed."""
  for name in _FLAG_NAMES:
    if name in flags.FLAGS:
      delattr(flags.FLAGS, name)
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      return None
    raise


def setting(module, fc) -> str:
  """The figure's setting in one line: its module's `setting(config)`, else the config's
  workload fields (studies/paper.describe)."""
  if hasattr(module, "setting"):
    return module.setting(fc)
  from dejavu_jax.studies import paper  # pylint: disable=g-import-not-at-top
  return paper.describe(fc)


def run_figure(fig: Figure, c, out_dir: str, log=print) -> dict:
  """Runs one figure into out_dir/<name>; returns its index entry."""
  entry = {"name": fig.name, "title": fig.title, "module": fig.module, "rows": [],
           "files": [], "headline": "", "wall_s": 0.0, "kind": fig.kind, "setting": ""}
  module = _import(fig.module)
  if module is None:
    return entry | {"status": "skipped", "why": f"module {fig.module} not available yet"}
  if fig.name not in c.figures:
    return entry | {"status": "skipped", "why": f"its config (configs/figures.py "
                                                f"CONFIG_MODULES['{fig.name}']) not available yet"}
  fc = c.figures[fig.name]
  entry["kind"] = getattr(module, "KIND", fig.kind)
  entry["setting"] = setting(module, fc)
  sub = runrecord.prepare_output_dir(os.path.join(out_dir, fig.name), overwrite=True)
  log(f"\n=== {fig.name}: {fig.title}")
  t0 = time.perf_counter()
  try:
    rows = module.run(fc, sub)
  except Exception as e:  # pylint: disable=broad-except
    log(traceback.format_exc())
    return entry | {"status": "failed", "why": f"{type(e).__name__}: {e}",
                    "wall_s": time.perf_counter() - t0, "config": runrecord.config_dict(fc)}
  wall = time.perf_counter() - t0
  headline = module.headline(rows) if hasattr(module, "headline") and rows else ""
  files = sorted(os.path.relpath(p, out_dir) for p in glob.glob(os.path.join(sub, "*")))
  log(f"--- {fig.name} done in {wall:.1f} s ({entry['kind']}). {headline}")
  return entry | {"status": "ok", "rows": list(rows), "files": files, "headline": headline,
                  "wall_s": wall, "table": list(getattr(module, "TABLE", ()) or ()),
                  "config": runrecord.config_dict(fc)}


def selected(c) -> tuple[str, ...]:
  """The figure names of `config.only` (() = all). The command line hands a tuple override
  written without quotes, `--config.only='(failures,planner)'`, over as one string, so every
  item is split on commas and stripped of brackets and quotes."""
  items = (c.only,) if isinstance(c.only, str) else tuple(c.only or ())
  names = []
  for item in items:
    for name in str(item).split(","):
      name = name.strip().strip("()[]").strip().strip("'\"")
      if name:
        names.append(name)
  unknown = sorted(set(names) - {f.name for f in FIGURES})
  if unknown:
    raise cli.UsageError(f"config.only: unknown figure(s) {unknown}; known: "
                         f"{[f.name for f in FIGURES]}")
  return tuple(names)


def run(c, out_dir: str, log=print) -> list[dict]:
  """Runs every selected figure (the output directory must be prepared); writes the index."""
  only = selected(c)
  t0 = time.perf_counter()
  entries = [run_figure(f, c, out_dir, log) for f in FIGURES if not only or f.name in only]
  wall = time.perf_counter() - t0
  with open(os.path.join(out_dir, "figures.jsonl"), "w") as f:
    for e in entries:
      f.write(metrics.dumps({k: v for k, v in e.items() if k != "rows"}) + "\n")
  write_index(entries, out_dir, wall)
  log(f"\n{len(entries)} figure(s) in {wall:.1f} s -> {os.path.join(out_dir, 'index.md')}")
  for e in entries:
    log(f"  {e['name']:<15} {e['status']:<8} {e['wall_s']:7.1f} s  {e['kind']:<9} "
        f"{e['headline'] or e.get('why', '')}")
  return entries


def _table_rows(e: dict) -> tuple[list[dict], list[str] | None]:
  rows = [r for r in e["rows"] if isinstance(r, dict)][:MAX_TABLE_ROWS]
  return rows, (e.get("table") or None)


def write_index(entries: list[dict], out_dir: str, wall: float) -> None:
  """index.md and index.html: per figure its plots, its table and its config."""
  info_path = os.path.join(out_dir, "run.json")
  info = json.load(open(info_path)) if os.path.exists(info_path) else {}
  md = [f"# Figures", "",
        f"commit `{info.get('commit', '?')}`, {info.get('time_utc', '?')}, "
        f"total wall time {wall:.1f} s", "",
        "| figure | status | wall (s) | kind | setting | headline |",
        "|---|---|---|---|---|---|"]
  for e in entries:
    md.append(f"| [{e['name']}](#{e['name']}) | {e['status']} | {e['wall_s']:.1f} | "
              f"{e['kind']} | {e['setting'].replace('|', '/')} | "
              f"{(e['headline'] or e.get('why', '')).replace('|', '/')} |")
  body = []
  for e in entries:
    md += ["", f"## {e['name']}", "", e["title"], "", f"*{e['kind']}*; setting: {e['setting']}",
           ""] + ([f"**headline**: {e['headline']}", ""] if e["headline"] else [])
    body.append(f"<h2 id='{e['name']}'>{html.escape(e['name'])}</h2><p>{html.escape(e['title'])}"
                f"</p><p><i>{e['kind']}</i>; setting: {html.escape(e['setting'])}</p>"
                + (f"<p><b>headline</b>: {html.escape(e['headline'])}</p>" if e["headline"]
                   else ""))
    if e["status"] != "ok":
      md.append(f"**{e['status']}**: {e.get('why', '')}")
      body.append(f"<p><b>{e['status']}</b>: {html.escape(e.get('why', ''))}</p>")
      continue
    rows, cols = _table_rows(e)
    pngs = [f for f in e["files"] if f.endswith(".png")]
    md += [f"![{p}]({p})" for p in pngs]
    md += ["", reporting.markdown_table(rows, cols)]
    if len(e["rows"]) > len(rows):
      md.append(f"\n({len(e['rows']) - len(rows)} more rows in the JSONL)")
    md += ["", "Files: " + ", ".join(f"[{f}]({f})" for f in e["files"]), "",
           "<details><summary>config</summary>", "", "```json",
           json.dumps(e["config"], indent=1, default=str), "```", "</details>"]
    imgs = "".join(f"<img src='{html.escape(p)}' width='560'><br>" for p in pngs)
    body.append(f"<table><tr><td valign='top'>{imgs}</td><td valign='top'>"
                f"{_html_table(rows, cols)}</td></tr></table><details><summary>config</summary>"
                f"<pre>{html.escape(json.dumps(e['config'], indent=1, default=str))}</pre>"
                f"</details>")
  with open(os.path.join(out_dir, "index.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  head = "".join(f"<tr><td><a href='#{e['name']}'>{e['name']}</a></td><td>{e['status']}</td>"
                 f"<td>{e['wall_s']:.1f}</td><td>{e['kind']}</td>"
                 f"<td>{html.escape(e['setting'])}</td>"
                 f"<td>{html.escape(e['headline'] or e.get('why', ''))}"
                 "</td></tr>" for e in entries)
  with open(os.path.join(out_dir, "index.html"), "w") as f:
    f.write(f"<html><head><meta charset='utf-8'><title>Figures</title><style>td,th{{border:1px "
            f"solid #ccc;padding:2px 6px;font-size:12px}}table{{border-collapse:collapse}}"
            f"</style></head><body><h1>Figures</h1><p>commit {info.get('commit', '?')}, "
            f"{info.get('time_utc', '?')}, total wall time {wall:.1f} s</p><table><tr>"
            f"<th>figure</th><th>status</th><th>wall (s)</th><th>kind</th><th>setting</th>"
            f"<th>headline</th></tr>{head}"
            f"</table>{''.join(body)}</body></html>\n")


def _html_table(rows: list[dict], cols) -> str:
  if not rows:
    return "(no rows)"
  md = reporting.markdown_table(rows, cols).splitlines()
  cells = [[x.strip() for x in line.strip("|").split("|")] for line in md]
  out = "<tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in cells[0]) + "</tr>"
  out += "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>"
                 for r in cells[2:])
  return f"<table>{out}</table>"


def main(c):
  out, overwrite = _OUT.value, _OVERWRITE.value   # read before _import
  selected(c)   # a bad selection fails before anything is written
  runrecord.prepare_output_dir(out, overwrite)
  runrecord.write_run_info(out, runrecord.run_info(c))
  entries = run(c, out)
  if any(e["status"] == "failed" for e in entries):
    sys.exit("some figures failed; see the index")


if __name__ == "__main__":
  _OUT = flags.DEFINE_string("output_dir", "results/figures", "where every figure and the index go")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False,
                                 "replace the results in a non-empty output_dir")
  cli.run(main, "configs/figures.py", __doc__, errors=(runrecord.OutputDirError,))
