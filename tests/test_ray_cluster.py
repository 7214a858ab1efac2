"""The Ray runtime on a two-node Ray cluster (`ray.cluster_utils.Cluster`: two raylets on this
machine, as two hosts would run them): stages placed one per node ("spread"), stage 1 SIGKILLed
and recovered from its replica, every node on loopback only. Oracle: tokens equal
`fake_generate`."""

import pytest
import ray
from ray.cluster_utils import Cluster

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.runtime.ray_session import loopback_node
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request
from tests.ray_util import checked_shutdown, is_loopback, pid_gone, tcp_listeners

CFG = tiny_config("opt", num_layers=4, max_positions=128)


@pytest.fixture(scope="module")
def two_nodes():
  # Both nodes and the driver on loopback. Passing node_ip_address="127.0.0.1" alone is not
  # enough: the nodes bind 127.0.0.1, but `ray.init(address=...)` rewrites a loopback address
  # to the machine's, where no GCS listens (it retried for minutes).
  with loopback_node():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                            "include_dashboard": False})

  def shutdown():
    ray.shutdown()
    cluster.shutdown()

  with checked_shutdown(shutdown):
    with loopback_node():
      cluster.add_node(num_cpus=2)
      cluster.wait_for_nodes()
      ray.init(address=cluster.address)
    yield cluster


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_node_cluster_spread_with_a_kill(two_nodes):
  reqs = [Request(i, 0.0, (5 + i, 9, 2 * i + 3), 40) for i in range(6)]
  ref = {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}
  serve = ServeConfig(num_stages=2, microbatch_size=3, max_len=64, heartbeat_s=0.1,
                      heartbeat_timeout_s=30.0, recovery="replica", program="fake",
                      pacing="paced", runtime="ray", ray_address=two_nodes.address,
                      ray_placement="spread")
  cost = TableCostModel(CFG, prompt=0.024, token=0.012)   # 6 ms per stage step
  with PipelineEngine(CFG, None, serve, cost_model=cost) as eng:
    rt = eng.runtime
    nodes = {rt.worker(s).node_id for s in range(2)}
    assert len(nodes) == 2, "spread placement must put the two stages on different nodes"
    wide = [s for s in tcp_listeners() if not is_loopback(s[2])]
    assert not wide, f"listening beyond loopback: {wide}"
    res = eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=30)])
    assert res.error is None
    assert res.tokens() == ref
    (ev,) = res.recoveries
    assert ev.handled_by == {"replica": 2}, ev
    (kill,) = rt.kills
    assert pid_gone(kill["pid"])
