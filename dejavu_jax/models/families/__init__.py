"""The registry of model families: `get(name)` for a `ModelConfig.family`, `for_model_type(t)`
for a Hugging Face config.json `model_type`. One module per family (opt, gpt2, llama, bloom)
fills in a `base.Family`; adding a family is adding a module and a line in `_MODULES`.
"""

from __future__ import annotations

from dejavu_jax.models.families.base import Family

_MODULES = ("opt", "gpt2", "llama", "bloom")
_REGISTRY: dict[str, Family] = {}


def _load() -> dict[str, Family]:
  # Imported on first use: the family modules build ModelConfigs, and config.py looks families
  # up, so neither may import the other at module load.
  if not _REGISTRY:
    import importlib  # pylint: disable=g-import-not-at-top
    for m in _MODULES:
      fam = importlib.import_module(f"dejavu_jax.models.families.{m}").FAMILY
      _REGISTRY[fam.name] = fam
  return _REGISTRY


def names() -> tuple[str, ...]:
  return tuple(_load())


def get(name: str) -> Family:
  """The family `name` ("opt", "gpt2", "llama", "bloom"); a ValueError names the known ones."""
  reg = _load()
  if name not in reg:
    raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(reg)}")
  return reg[name]


def for_model_type(model_type) -> Family:
  """The family that loads Hugging Face `model_type`; a ValueError names the supported ones."""
  for fam in _load().values():
    if model_type in fam.model_types:
      return fam
  known = ", ".join(repr(t) for f in _load().values() for t in f.model_types)
  raise ValueError(f"unsupported model_type {model_type!r}; expected one of {known}")
