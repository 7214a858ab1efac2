#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers, one test file each at a time (module fixtures stay per file): many tests wait on
# paced steps and heartbeats, so the pair overlaps well on 2 cores (754 tests; measured on a fresh
# clone: 923-997 s wall, 2026-12-04).
exec .venv/bin/python -m pytest tests -q -n 2 --dist loadfile "$@"
