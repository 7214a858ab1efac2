"""The Ray runtime on a two-node Ray cluster (`ray.cluster_utils.Cluster`: two raylets on this
machine, as two hosts would run them): stages placed one per node ("spread"), stage 1 SIGKILLed
and recovered from its replica. Oracle: tokens equal `fake_generate`."""

import pytest
import ray
from ray.cluster_utils import Cluster

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.serving.workload import Request
from tests.ray_util import checked_shutdown, pid_gone

CFG = tiny_config("opt", num_layers=4, max_positions=128)


@pytest.fixture(scope="module")
def two_nodes():
  # The nodes take the machine's address: with node_ip_address 127.0.0.1 the second raylet
  # never reaches the head's GCS (measured: a 4 min hang).
  cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                          "include_dashboard": False})

  def shutdown():
    ray.shutdown()
    cluster.shutdown()

  with checked_shutdown(shutdown):
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
    res = eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=30)])
    assert res.error is None
    assert res.tokens() == ref
    (ev,) = res.recoveries
    assert ev.handled_by == {"replica": 2}, ev
    (kill,) = rt.kills
    assert pid_gone(kill["pid"])
