"""The command line tells the truth: --help lists every field and exits 0, config errors are one
line and exit 2 with nothing written, the figures selection works as documented, and the README
main job exits 1 when a completion differs from the failure-free run."""

import os
import subprocess
import sys

import pytest

from configs import figures_tiny
from dejavu_jax import config as C
from dejavu_jax.studies import cli
from tests import prefork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=180, code=None):
  cmd = [sys.executable, *(("-c", code) if code else ("-m",)), *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _errors(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


CONFIG_ERRORS = [
    (("--config.recovry=replica",), "did you mean \"recovery\""),
    (("--config=configs/no_such.py",), "no such config file 'configs/no_such.py'"),
    (("--config=configs/serve_tiny.py", "--config.fail_stages=(5,)"), "config.fail_stages"),
    (("--config=configs/serve_tiny.py", "--config.top_p=2.0"), "config.top_p"),
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The commands that stop before building anything, each its own process forked from one
  that imported jax once (tests/prefork.py): {name: (result, output dir it was given)}."""
  d = tmp_path_factory.mktemp("cli")
  cmds = {"help": (("experiments.serve", "--help"), None),
          "figures_bad": (("experiments.figures", "--config=configs/figures_tiny.py",
                           "--config.only=(failures,nope)"), d / "figs")}
  for i, (args, _) in enumerate(CONFIG_ERRORS):
    cmds[f"error{i}"] = (("experiments.serve", *args), d / f"out{i}")
  argvs = [[*a, f"--output_dir={out}"] if out else list(a) for a, out in cmds.values()]
  results = prefork.run_modules(argvs, ROOT, timeout=180)
  return {name: (r, out) for (name, (_, out)), r in zip(cmds.items(), results)}


def test_serve_help_lists_every_field_and_exits_0(quick):
  proc, _ = quick["help"]
  assert proc.returncode == 0, proc.stderr
  for f in C.serve_fields():
    assert f"\n{f.name} " in proc.stdout and f.doc in proc.stdout, f.name
  assert "--output_dir" in proc.stdout and "(undocumented)" not in proc.stdout


@pytest.mark.parametrize("i", range(len(CONFIG_ERRORS)))
def test_config_errors_are_one_line_exit_2_nothing_written(quick, i):
  message = CONFIG_ERRORS[i][1]
  proc, out = quick[f"error{i}"]
  assert proc.returncode == 2, proc.stderr
  errors = _errors(proc.stderr)
  assert len(errors) == 1 and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not out.exists()


def test_figures_selection_as_documented():
  c = figures_tiny.get_config()
  from experiments import figures   # pylint: disable=g-import-not-at-top
  for only in (("(failures,planner)",), ("failures", "planner"), ("failures,planner",)):
    c.only = only   # the first is what --config.only='(failures,planner)' hands over
    assert figures.selected(c) == ("failures", "planner")
  c.only = ()
  assert figures.selected(c) == ()
  c.only = ("nope",)
  with pytest.raises(cli.UsageError, match="nope"):
    figures.selected(c)


def test_figures_bad_selection_leaves_nothing(quick):
  proc, out = quick["figures_bad"]
  assert proc.returncode == 2 and "nope" in proc.stderr, proc.stderr
  assert not out.exists()


def test_figures_documented_selection_runs(tmp_path):
  out = tmp_path / "figs"
  proc = _run("experiments.figures", "--config=configs/figures_tiny.py",
              "--config.only=(planner)", f"--output_dir={out}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / "run.json").exists() and (out / "planner").is_dir()
  assert not (out / "failures").exists()


# The text job on a tiny random llama (no GGUF load), with the single-device reference altered
# so that one completion differs from what the pipeline served.
_TEXT_JOB = """
import sys, runpy
import jax
from dejavu_jax.config import tiny_config
from dejavu_jax.models import init_params
from dejavu_jax.studies import text, textjob
cfg = tiny_config("llama")
params = init_params(cfg, jax.random.key(0))
class Tok:
  eos_token_id = None
  def decode(self, ids):
    return " ".join(map(str, ids))
text.load_text_model = lambda path="", dtype="float32": (cfg, params, Tok())
textjob.encode_prompts = lambda tok, prompts, chat=True: [[3 + i, 5, 7] for i in range(len(prompts))]
real = textjob.generate
def altered(*a, **k):
  out = real(*a, **k)
  out[0] = [(t + 1) % cfg.vocab_size for t in out[0]]
  return out
if sys.argv.pop(1) == "differ":
  textjob.generate = altered
runpy.run_module("experiments.serve", run_name="__main__")
"""


@pytest.mark.parametrize("mode,code", [("differ", 1), ("same", 0)])
def test_text_job_exit_code_says_whether_completions_match(tmp_path, mode, code):
  proc = _run(mode, "--config=configs/serve_text.py", "--config.text_new_tokens=4",
              "--config.fail_stages=()", "--config.fail_after_steps=()",
              f"--output_dir={tmp_path / 'out'}", code=_TEXT_JOB, timeout=240)
  assert proc.returncode == code, proc.stderr[-3000:]
  if code:
    assert "DIFFERENT from" in proc.stdout and "differs" in proc.stderr
  else:
    assert "are identical to the failure-free" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_readme_main_job_end_to_end(tmp_path):
  """configs/serve_text.py as the README runs it: the real SmolLM2, stage 1 killed, every
  completion identical to the failure-free run, exit 0; run.json holds only what ran."""
  out = tmp_path / "serve"
  proc = _run("experiments.serve", "--config=configs/serve_text.py", f"--output_dir={out}",
              timeout=960)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "all 6 completions are identical to the failure-free single-device greedy run" in (
      proc.stdout)
  assert "recovered" in proc.stdout and "{" not in proc.stdout.split("recovered", 1)[1][:80]
  import json   # pylint: disable=g-import-not-at-top
  config = json.loads((out / "run.json").read_text())["config"]
  assert not {"model", "rates", "num_requests", "cost", "max_len"} & set(config)
