"""`configs/figures.py` with every figure's tiny config: the whole figure run in seconds (tests)."""

from configs import figures


def get_config():
  return figures.get_config("tiny")
