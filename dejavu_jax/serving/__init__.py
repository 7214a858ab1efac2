"""The serving engine: orchestration of a pipeline's workers (engine.py, disagg_engine.py), its
prompt-path split checks (disagg_split.py) and the paced mode's step durations (pacing.py).
Harness and study code (runners, run records, plots) lives above it, in `dejavu_jax.studies`."""
