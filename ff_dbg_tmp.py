import os, time, sys
os.environ["XLA_FLAGS"]="--xla_force_host_platform_device_count=8"
from dejavu_jax import sim
from dejavu_jax.studies import failstudy
t=time.perf_counter()
sc = failstudy.Scenario("reduced", "opt_66b", "a100_80gb", 2, num_stages=4, microbatch_size=1, prompt_len=500,
      output_len=400, arrivals=failstudy.arrivals("zero", 4, 1.0), failures=(sim.Failure(10.0, 1),),
      recovery=sim.RecoveryConfig(snapshot_every=50, restart_scope="job"))
rep = failstudy.Replayer(sc, failstudy.Replay(chunk=100, time_scale=1/15), log=print)
print("init", time.perf_counter()-t)
for st in [None, "restart", "reprefill", "replica", "snapshot"]:
  t=time.perf_counter()
  out = rep.run(st, [(1, 10.0)] if st else [])
  print(st, "run", time.perf_counter()-t, "serve wall", out["wall_s"])
rep.close()
