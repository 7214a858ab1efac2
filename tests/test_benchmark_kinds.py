"""Every benchmark's JSON line says which of its figures are measured on this machine and which
are modelled (cost model, simulator, or paced runs, which follow the cost model by construction):
`"kind": {"<metric>": "measured" | "modelled"}`."""

import ast
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


def test_every_benchmark_labels_its_figures():
  assert len(SCRIPTS) >= 11
  for path in SCRIPTS:
    with open(path) as f:
      tree = ast.parse(f.read())
    labels = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
              and n.value in ("measured", "modelled", "modeled")}
    kinds = [n for n in ast.walk(tree)
             if (isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and
                 n.slice.value == "kind") or (isinstance(n, ast.keyword) and n.arg == "kind")]
    assert kinds, f"{path}: no 'kind' in its JSON line"
    assert labels and labels <= {"measured", "modelled"}, (path, labels)


def test_paced_and_simulated_figures_are_modelled():
  """Where a script reports paced or simulated figures, they are labelled modelled."""
  for name, keys in (("pipeline.py", ("paced_vs_formula",)),
                     ("sim_vs_paced.py", ("max_rel_error_throughput",)),
                     ("swapping.py", ("paced_throughput_gain", "sim_throughput_gain")),
                     ("dataparallel.py", ("dp_over_single_engine", "dp_over_single_sim")),
                     ("disaggregation.py", ("paced_gain_at_planner_split",
                                            "sim_vs_paced_rel_error"))):
    src = open(os.path.join(ROOT, "benchmarks", name)).read()
    kind = src[src.index("# Which figures are measured"):]
    for k in keys:
      assert k in kind and "modelled" in kind, (name, k)


def test_sim_speed_json_line_labels_its_keys():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sim_speed.py"),
                        "--runs=1", "--requests=20"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, check=True).stdout
  line = json.loads(out.strip().splitlines()[-1])
  assert set(line["kind"]) <= set(line) and set(line["kind"].values()) == {"measured"}
  assert "sim_paper_scale_s" in line["kind"]
