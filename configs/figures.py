"""Every figure of the paper in one run: `python -m experiments.figures --config=configs/figures.py`.

`figures.<name>` holds each figure's own config (configs/fig_*.py, and the swapping and
disaggregation configs once those modules exist), so any field can be overridden on the command
line: `--config.figures.failures.num_requests=16`. `only` restricts the run to some figures.
`get_config("tiny")` (configs/figures_tiny.py) takes every figure's tiny config (tests).
"""

import importlib

import ml_collections

# figure name -> its config module (must match experiments/figures.py's registry).
CONFIG_MODULES = {
    "streaming": "configs.fig_streaming",
    "failures": "configs.fig_failures",
    "planner": "configs.fig_planner",
    "disagg_sim": "configs.fig_disagg_sim",
    "swapping": "configs.swapping",
    "disaggregation": "configs.disaggregation",
}


def figure_config(module_name: str, variant: str):
  """A figure's config: `get_config("tiny")` for the tiny variant, else `get_config()`; None when
  the module does not exist (yet)."""
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      return None
    raise
  if variant == "tiny":
    try:
      return module.get_config("tiny")
    except TypeError:   # a config without variants
      return module.get_config()
  return module.get_config()


def get_config(arg=None):
  variant = arg or "full"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.only = ()                        # figure names to run; () = all
  c.figures = ml_collections.ConfigDict()
  for name, module_name in CONFIG_MODULES.items():
    fc = figure_config(module_name, variant)
    if fc is not None:
      c.figures[name] = fc
  if variant != "tiny":
    # The engine studies at their own configs' sizes take ~40 min (disaggregation) and ~20 min
    # (swapping) here; the figure run keeps every system of each at two rates, fewer
    # microbatches per point, so that all figures regenerate within 30 minutes on 2 cores.
    if "disaggregation" in c.figures:
      c.figures.disaggregation.rates = (0.6, 1.2)
      c.figures.disaggregation.num_microbatches = 4
    if "swapping" in c.figures:
      c.figures.swapping.loads = (0.5, 2.0)
  return c
