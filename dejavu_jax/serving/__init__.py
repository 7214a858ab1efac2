"""The serving engine: one engine loop (engine.py) whose serving shape is a `PromptPath`
(prompt_path.py: colocated, or disaggregated into a prompt and a token pipeline), what a serve
returns (result.py), the prompt/token split checks (disagg_split.py) and the paced mode's step
durations (pacing.py). disagg_engine.py keeps the disaggregated engine's old names. Harness and
study code (runners, run records, plots) lives above it, in `dejavu_jax.studies`."""
