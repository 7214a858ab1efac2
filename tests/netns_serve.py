"""The driver of tests/test_netns_cluster.py, run inside the head's network namespace (only there
is the head's address reachable): serves a 2-stage fake pipeline on the namespace cluster, one
stage per node, with the remote stage killed mid-run, and prints one JSON line of what happened.

  ip netns exec NS python -m tests.netns_serve --address=10.x.y.1:6379 --kill_at=0.5
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from dejavu_jax.config import ServeConfig, tiny_config  # noqa: E402
from dejavu_jax.costmodel import TableCostModel  # noqa: E402
from dejavu_jax.fault.inject import FailureSpec  # noqa: E402
from dejavu_jax.pipeline.fake import fake_generate  # noqa: E402
from dejavu_jax.serving.engine import PipelineEngine  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402

CFG = tiny_config("opt", num_layers=4, max_positions=128)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--address", required=True)
  parser.add_argument("--kill_at", type=float, default=0.5)
  args = parser.parse_args()
  import ray  # pylint: disable=g-import-not-at-top
  reqs = [Request(i, 0.0, (5 + i, 9, 2 * i + 3), 60) for i in range(6)]
  ref = {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}
  serve = ServeConfig(num_stages=2, microbatch_size=3, max_len=80, heartbeat_s=0.1,
                      heartbeat_timeout_s=30.0, recovery="replica", program="fake",
                      pacing="paced", runtime="ray", ray_address=args.address,
                      ray_placement="spread")
  cost = TableCostModel(CFG, prompt=0.024, token=0.012)   # 6 ms per stage step
  out = {}
  with PipelineEngine(CFG, None, serve, cost_model=cost) as eng:
    rt = eng.runtime
    out["driver_ip"] = ray.util.get_node_ip_address()
    out["stage_ips"] = [rt.worker(s).ip for s in range(2)]
    out["stage_nodes"] = [rt.worker(s).node_id for s in range(2)]
    # Ray places the spread group's bundles on either node: the stage on the other host is the
    # one killed (the driver's remote path: the actor SIGKILLs itself).
    remote = [s for s in range(2) if rt.worker(s).ip != out["driver_ip"]]
    out["remote_stage"] = remote[0] if remote else None
    eng.serve(reqs[:3])   # every program traced before the measured run
    res = eng.serve(reqs, failures=[FailureSpec(args.kill_at, stage=out["remote_stage"] or 0)])
    out["error"] = res.error
    out["tokens_identical"] = res.tokens() == ref
    out["handled_by"] = [ev.handled_by for ev in res.recoveries]
    out["kills"] = [{k: v for k, v in kill.items() if k != "at"} for kill in rt.kills]
    w = rt.worker(out["remote_stage"] or 0)
    out["replacement_ip"] = w.ip
    out["replacement_warm"] = ray.get(w.actor.info.remote(), timeout=60)["warm"]
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
