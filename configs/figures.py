"""Every figure of the paper in one run: `python -m experiments.figures --config=configs/figures.py`.

`figures.<name>` holds each figure's own config (configs/fig_*.py, and the swapping and
disaggregation configs once those modules exist), so any field can be overridden on the command
line: `--config.figures.failures.num_requests=16`. `only` restricts the run to some figures.
`get_config("tiny")` (configs/figures_tiny.py) takes every figure's tiny config (tests); the
default takes every figure's default config, which is the paper's setting.
"""

import importlib

import ml_collections

# figure name -> its config module (must match experiments/figures.py's registry).
CONFIG_MODULES = {
    "streaming": "configs.fig_streaming",
    "stream_overhead": "configs.fig_stream_overhead",
    "ratio": "configs.fig_ratio",
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
  # Every figure's own default is the paper's setting, sized so that the whole run fits in 40
  # minutes on 2 cores (tests/test_figure_configs.py checks the defaults); no overrides here.
  return c
