"""Figure: the prompt/token step-time ratio Y/t over microbatch size and prompt length
(`configs/fig_ratio.py`). Y is one prompt step of a microbatch of b prompts of P tokens, t one
token step of the same microbatch at context P, both on one pipeline stage; the paper's
planner disaggregates when Y/t exceeds (D-1)/(D(2-m)-1).

Modelled: the roofline cost model (dejavu_jax/costmodel.py) for each "model:hardware:stages"
(machines of `gpus_per_machine` GPUs). Measured: the same ratio timed on this CPU for a small
model (jitted prefill vs one jitted decode step at that context; medians of `measured_runs`).
Writes `ratio.jsonl`, `ratio_modelled.png` (Y/t vs prompt, a line per batch, per model) and
`ratio_measured.png`.

  python -m experiments.fig_ratio --config=configs/fig_ratio.py --output_dir=/tmp/ratio
"""

import os
import statistics
import time

import numpy as np

KIND = "modelled"   # the measured CPU grid's rows say kind=measured
TABLE = ("kind", "model", "batch", "prompt_len", "prompt_s", "token_s", "ratio")


def setting(c) -> str:
  return (f"{c.variant}: modelled {', '.join(c.models)} (x{c.gpus_per_machine} GPUs), batch "
          f"{min(c.batch_sizes)}-{max(c.batch_sizes)}, prompt {min(c.prompt_lens)}-"
          f"{max(c.prompt_lens)}; measured on this CPU: {c.measured_model} x{c.measured_layers}"
          f" layers, batch {list(c.measured_batches)}, prompt {list(c.measured_prompts)}")


def modelled(c) -> list[dict]:
  from dejavu_jax import costmodel as cm  # pylint: disable=g-import-not-at-top
  from dejavu_jax.config import get_model_config  # pylint: disable=g-import-not-at-top
  rows = []
  for spec in c.models:
    name, hw, stages = spec.split(":")
    model = get_model_config(name, dtype="float16")
    cost = cm.roofline(model, hw, gpus_per_machine=c.gpus_per_machine)
    layers = -(-model.num_layers // int(stages))
    for b in c.batch_sizes:
      for p in c.prompt_lens:
        y, t = cost.prompt_time(layers, p, b), cost.token_time(layers, b, p)
        rows.append({"kind": "modelled", "model": name, "hardware": hw, "stages": int(stages),
                     "system": f"{name} b={b}", "batch": b, "prompt_len": p, "prompt_s": y,
                     "token_s": t, "ratio": y / t})
  return rows


def measured(c, log=print) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dejavu_jax.config import get_model_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.kv.cache import init_cache_for  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import decoder  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import generate as gen  # pylint: disable=g-import-not-at-top
  cfg = get_model_config(c.measured_model, dtype="float32", num_layers=c.measured_layers,
                         **dict(c.get("measured_overrides") or {}))
  params = decoder.init_params(cfg, jax.random.PRNGKey(0))
  prefill, decode = gen.make_steps(cfg)
  rows = []
  rng = np.random.default_rng(0)
  for b in c.measured_batches:
    for p in c.measured_prompts:
      max_len = 1 << p.bit_length()          # room for the decode step at position p
      toks = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, p)), jnp.int32)
      pos = jnp.asarray(np.broadcast_to(np.arange(p, dtype=np.int32), (b, p)))
      cache = init_cache_for(cfg, cfg.num_layers, b, max_len)
      ys, ts = [], []
      for i in range(c.measured_runs + 1):   # the first run compiles
        t0 = time.perf_counter()
        cache, logits = prefill(params, cache, toks, pos)
        logits.block_until_ready()
        y = time.perf_counter() - t0
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        dpos = jnp.full((b,), p, jnp.int32)
        ctx = gen.decode_context(np.full(b, p), max_len)
        t0 = time.perf_counter()
        cache, lg = decode(params, cache, tok, dpos, context=ctx)
        lg.block_until_ready()
        t = time.perf_counter() - t0
        if i:
          ys.append(y)
          ts.append(t)
      y, t = statistics.median(ys), statistics.median(ts)
      rows.append({"kind": "measured", "model": f"{c.measured_model} x{c.measured_layers} "
                   "layers (this CPU)", "system": f"cpu b={b}", "batch": b, "prompt_len": p,
                   "prompt_s": y, "token_s": t, "ratio": y / t,
                   "load_avg_1m": os.getloadavg()[0]})
      log(f"measured b={b} P={p}: prompt {y * 1e3:.1f} ms, token {t * 1e3:.2f} ms, "
          f"ratio {y / t:.1f}")
  return rows


def run(c, out_dir, log=print) -> list[dict]:
  from dejavu_jax.studies import reporting  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  rows = modelled(c) + measured(c, log)
  reporting.write_rows(os.path.join(out_dir, "ratio.jsonl"), rows)
  _plot([r for r in rows if r["kind"] == "modelled"], os.path.join(out_dir, "ratio_modelled.png"),
        "modelled (roofline)")
  _plot([r for r in rows if r["kind"] == "measured"], os.path.join(out_dir, "ratio_measured.png"),
        "measured on this CPU")
  return rows


def _plot(rows, path, what):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 3.8), squeeze=False)
  for ax, model in zip(axes[0], models):
    mine = [r for r in rows if r["model"] == model]
    for i, b in enumerate(sorted({r["batch"] for r in mine})):
      pts = sorted((r["prompt_len"], r["ratio"]) for r in mine if r["batch"] == b)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=f"C{i}",
              label=f"batch {b}")
    ax.set(xlabel="prompt length (tokens)", ylabel="Y / t", title=f"{model}", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"prompt step / token step, {what}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def headline(rows) -> str:
  out = []
  for model in dict.fromkeys(r["model"] for r in rows if r["kind"] == "modelled"):
    mine = [r for r in rows if r["model"] == model]
    lo, hi = min(r["ratio"] for r in mine), max(r["ratio"] for r in mine)
    at = [r for r in mine if r["batch"] == 8 and r["prompt_len"] == 1000]
    out.append(f"{model} {lo:.0f}-{hi:.0f}" + (f" (b=8, P=1000: {at[0]['ratio']:.0f})"
                                               if at else ""))
  meas = [r for r in rows if r["kind"] == "measured"]
  txt = "modelled Y/t over batch 1-8, prompt 250-2000: " + ", ".join(out)
  if meas:
    txt += (f"; measured on this CPU ({meas[0]['model']}): {min(r['ratio'] for r in meas):.0f}-"
            f"{max(r['ratio'] for r in meas):.0f}")
  return txt


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_ratio.py", "results/fig_ratio")
