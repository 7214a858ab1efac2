"""The /metrics page: the online loop's live figures in the Prometheus text format (written by
hand: a few gauges, counters and two histograms do not need a client library)."""

from __future__ import annotations

import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


def _histogram(name: str, help_: str, values, buckets) -> list[str]:
  values = list(values)
  out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
  for b in buckets:
    out.append(f'{name}_bucket{{le="{b}"}} {sum(v <= b for v in values)}')
  out += [f'{name}_bucket{{le="+Inf"}} {len(values)}', f"{name}_sum {sum(values)!r}",
          f"{name}_count {len(values)}"]
  return out


def prometheus_text(loop, counts: dict) -> str:
  """Queue depth, running requests, tokens and tokens/s (last 10 s), request outcomes, TTFT and
  TPOT histograms (seconds, finished requests), recoveries by strategy, kills."""
  c = loop.counts
  now = time.perf_counter()
  recent = sum(n for t, n in list(loop.token_log) if now - t <= 10.0)
  lines = [
      "# HELP dejavu_queue_depth Admitted requests waiting for a microbatch slot.",
      "# TYPE dejavu_queue_depth gauge", f"dejavu_queue_depth {counts['pending']}",
      "# HELP dejavu_running_requests Requests in a microbatch in flight.",
      "# TYPE dejavu_running_requests gauge", f"dejavu_running_requests {counts['running']}",
      "# HELP dejavu_generation_tokens_total Tokens streamed to clients.",
      "# TYPE dejavu_generation_tokens_total counter",
      f"dejavu_generation_tokens_total {loop.tokens_out}",
      "# HELP dejavu_generation_tokens_per_second Tokens streamed over the last 10 s, per second.",
      "# TYPE dejavu_generation_tokens_per_second gauge",
      f"dejavu_generation_tokens_per_second {recent / 10.0!r}",
      "# HELP dejavu_requests_total Requests by outcome.",
      "# TYPE dejavu_requests_total counter"]
  for status in ("admitted", "finished", "cancelled", "rejected_queue_full", "rejected_invalid",
                 "rejected_down"):
    lines.append(f'dejavu_requests_total{{status="{status}"}} {c.get(status, 0)}')
  lines += _histogram("dejavu_time_to_first_token_seconds",
                      "Time to first token (engine clock: submission to sampling).",
                      loop.ttft_s, TTFT_BUCKETS)
  lines += _histogram("dejavu_time_per_output_token_seconds",
                      "Time per output token after the first, per finished request.",
                      loop.tpot_s, TPOT_BUCKETS)
  lines += ["# HELP dejavu_failures_total Worker failures detected and recovered.",
            "# TYPE dejavu_failures_total counter", f"dejavu_failures_total {c.get('recoveries', 0)}",
            "# HELP dejavu_kills_total Stages killed through the admin endpoint.",
            "# TYPE dejavu_kills_total counter", f"dejavu_kills_total {c.get('kills', 0)}",
            "# HELP dejavu_recovered_microbatches_total Microbatches recovered, by strategy.",
            "# TYPE dejavu_recovered_microbatches_total counter"]
  strategies = sorted(k.split(":", 1)[1] for k in c if k.startswith("recovered_by:"))
  for s in strategies or ["replica"]:
    lines.append(f'dejavu_recovered_microbatches_total{{strategy="{s}"}} '
                 f'{c.get("recovered_by:" + s, 0)}')
  return "\n".join(lines) + "\n"
