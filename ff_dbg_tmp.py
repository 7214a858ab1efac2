import os, time, sys
os.environ["XLA_FLAGS"]="--xla_force_host_platform_device_count=8"
import numpy as np
from configs import fig_failures as cf
from experiments import fig_failures as ff
from dejavu_jax.studies import failstudy
c = cf.get_config()
sc = ff.scenarios(c)[2]
rp = failstudy.Replay(chunk=10, time_scale=float(sys.argv[1]) if len(sys.argv)>1 else 1.0)
rep = failstudy.Replayer(sc, rp)
for strat in ["replica", "replica", "restart"]:
  out = rep.run(strat, (), [(1, 25)])
  e = out["engine_records"][0]; s = out["sim_records"][0]
  print(strat, "engine", e.first_token, e.finish, "sim", s.first_token, s.finish, out["engine_recoveries"], out["sim_recoveries"][0]["downtime_s"], out["sim_recoveries"][0].get("resumed_at"), "overruns", out["overruns"], out["spare_wait_s"])
rep.close()
