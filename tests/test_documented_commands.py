"""Every command line quoted in README.md and WORKSPACE.md runs: each `python -m` command of a
fenced bash block or an inline code span is run with --help appended (the config-driven mains
load the config, apply every --config.<field> override and check it, then exit 0 without
building anything), so a documented command with a renamed or misspelled field fails here. The
planner, which has no config, runs as written (seconds). Each command is its own process, forked
from one that imported jax once (tests/prefork.py): a command is mostly that import."""

import os
import re
import shlex

import pytest

from tests import prefork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "WORKSPACE.md")
# Placeholders a reader fills in; such a line is a template, not a command.
PLACEHOLDERS = ("...", "/path/to/", "[--", "|")
# Run as written (no --help: absl's own --help exits 1).
RUN_AS_IS = ("dejavu_jax.planner",)
def _strip_comment(line: str) -> str:
  return re.sub(r"(^|\s)#\s.*$", "", line).rstrip()


def documented_commands() -> list[tuple[str, str]]:
  """(doc, command) for every `python -m` command line of the docs."""
  out = []
  for doc in DOCS:
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    for block in blocks:
      joined = re.sub(r"\\\n\s*", " ", block)
      for line in joined.splitlines():
        line = _strip_comment(line)
        if "python -m " in line and not line.lstrip().startswith("#"):
          out.append((doc, line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`((?:\.venv/bin/)?python -m [^`]+)`", prose):
      out.append((doc, " ".join(span.split())))
  cmds, seen = [], set()
  for doc, line in out:
    line = line[line.index("python -m ") - (len(".venv/bin/") if ".venv/bin/python -m" in line
                                            else 0):]
    if any(p in line for p in PLACEHOLDERS) or line in seen:
      continue
    seen.add(line)
    cmds.append((doc, line))
  return cmds


COMMANDS = documented_commands()


def test_the_docs_quote_commands():
  mods = {shlex.split(c)[2] for _, c in COMMANDS}
  assert {"experiments.serve", "experiments.figures", "experiments.simulate",
          "experiments.generate"} <= mods


def _module_argv(command: str) -> list[str]:
  """[module, *args] of `python -m module args`, --help appended."""
  argv = shlex.split(command)
  module = argv[2]
  return [module, *(argv[3:] if module in RUN_AS_IS else argv[3:] + ["--help"])]


@pytest.fixture(scope="module")
def results():
  """Every command run once, two at a time."""
  cmds = [c for _, c in COMMANDS]
  return dict(zip(cmds, prefork.run_modules([_module_argv(c) for c in cmds], ROOT, timeout=400)))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc,command", COMMANDS, ids=[c[:90] for _, c in COMMANDS])
def test_documented_command_runs(results, doc, command):
  proc = results[command]
  assert proc.returncode == 0, f"{doc}: {command}\n{proc.stderr[-2000:]}"
