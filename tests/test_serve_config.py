"""ServeConfig grouped by concern: each group checks its own fields and names them, flat and
nested construction agree, and the help generated from the declarations lists every field."""

import dataclasses
import math
import pickle

import pytest

from configs import serve, serve_text
from dejavu_jax import config as C
from dejavu_jax.models import generate as gen
from dejavu_jax.studies import runconfig

# One bad value per checked field: (field, value).
BAD = [
    ("num_stages", 0), ("tensor", 0), ("microbatch_size", 2.5), ("max_len", -1),
    ("mode", "batch"), ("program", "toy"), ("stage_ranges", ((0, 1, 2),)),
    ("temperature", -0.1), ("temperature", math.nan), ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5), ("seed", -1), ("eos_token_id", -2),
    ("recovery", ""), ("snapshot_every", 0), ("heartbeat_s", 0.0), ("heartbeat_timeout_s", math.nan),
    ("progress_timeout_s", -1.0), ("step_timeout_s", 0), ("cache_probe", "on"),
    ("max_pending", 0), ("raise_on_error", "yes"),
    ("swapping", "sometimes"), ("device_kv_budget_bytes", 0), ("device_kv_budget_fraction", 1.5),
    ("swap_context", 0),
    ("prompt_stages", -1), ("token_stages", 1.5), ("host_slots", -1), ("stream_link", 3),
    ("layerwise_stream", 1),
    ("runtime", "k8s"), ("ray_address", 6379), ("ray_placement", "scatter"),
    ("ray_transport", "pigeon"), ("ray_gpus_per_stage", -1), ("ray_spares", -1),
    ("ray_spares", 1.5),
    ("pacing", "fast"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_each_group_names_the_bad_field(field, value):
  with pytest.raises(C.ServeConfigError) as e:
    C.ServeConfig(**{field: value})
  assert e.value.field == field and str(e.value).startswith(f"{field}: ")
  group = C.SERVE_GROUPS[C.serve_field_paths()[field].split(".")[0]]
  with pytest.raises(C.ServeConfigError) as e:   # the group alone checks it too
    group(**{field: value})
  assert e.value.field == field


def test_every_checked_group_is_covered():
  assert {C.serve_field_paths()[f].split(".")[0] for f, _ in BAD} == set(C.SERVE_GROUPS)


def test_cross_group_checks_name_the_field():
  with pytest.raises(C.ServeConfigError, match="swap_context") as e:
    C.ServeConfig(max_len=64, swap_context=65)
  assert e.value.field == "swap_context"
  with pytest.raises(C.ServeConfigError) as e:
    C.ServeConfig(heartbeat_s=5.0)
  assert e.value.field == "heartbeat_timeout_s"


def test_flat_and_nested_construction_are_equal():
  flat = C.ServeConfig(num_stages=2, program="fake", recovery="replica", temperature=0.7,
                       max_pending=3, swapping="on", host_slots=4, runtime="ray", pacing="paced")
  nested = C.ServeConfig(
      topology=C.TopologyConfig(num_stages=2, program="fake"),
      sampling=C.SamplingConfig(temperature=0.7), fault=C.FaultConfig(recovery="replica"),
      admission=C.AdmissionConfig(max_pending=3), memory=C.MemoryConfig(swapping="on"),
      disagg=C.DisaggConfig(host_slots=4), cluster=C.ClusterConfig(runtime="ray"),
      timing=C.TimingConfig(pacing="paced"))
  assert flat == nested and hash(flat) == hash(nested)
  # A flat name overrides the value of a group given with it.
  mixed = C.ServeConfig(topology=C.TopologyConfig(num_stages=3, program="fake"), num_stages=2,
                        recovery="replica", temperature=0.7, max_pending=3, swapping="on",
                        host_slots=4, runtime="ray", pacing="paced")
  assert mixed == flat
  assert flat.flat()["temperature"] == 0.7 and len(flat.flat()) == len(C.serve_fields())


def test_replace_flat_or_group():
  sc = C.ServeConfig(num_stages=2, recovery="replica")
  assert sc.replace(recovery="snapshot").fault.recovery == "snapshot"
  assert sc.replace(recovery="snapshot").topology == sc.topology
  assert sc.replace(sampling=C.SamplingConfig(top_k=5)).sampling.top_k == 5
  # dataclasses.replace with a flat name (engine call sites during the transition).
  assert dataclasses.replace(sc, recovery="snapshot") == sc.replace(recovery="snapshot")
  with pytest.raises(C.ServeConfigError, match="heartbeat_s"):
    sc.replace(heartbeat_s=-1.0)
  with pytest.raises(TypeError, match="did you mean 'recovery'"):
    sc.replace(recovry="snapshot")


def test_fields_are_read_through_their_group_and_pickling():
  sc = C.ServeConfig(heartbeat_timeout_s=4.0, ray_placement="spread")
  assert sc.fault.heartbeat_timeout_s == 4.0
  assert sc.cluster.ray_placement == "spread"
  with pytest.raises(AttributeError):   # one access path: the group's
    sc.heartbeat_timeout_s  # pylint: disable=pointless-statement
  with pytest.raises(AttributeError):
    sc.no_such_field  # pylint: disable=pointless-statement
  assert pickle.loads(pickle.dumps(sc)) == sc


def test_field_paths_and_unique_names():
  paths = C.serve_field_paths()
  assert len(paths) == len(C.serve_fields()) == 41
  for name, path in paths.items():
    group, flat = path.split(".")
    assert flat == name and hasattr(getattr(C.ServeConfig(), group), name)
  assert paths["heartbeat_timeout_s"] == "fault.heartbeat_timeout_s"
  assert paths["temperature"] == "sampling.temperature"
  assert paths["ray_spares"] == "cluster.ray_spares"


def test_one_sampling_config():
  assert gen.SamplingConfig is C.SamplingConfig
  assert gen.GREEDY == C.ServeConfig().sampling


def test_generated_help_lists_every_field_with_its_doc():
  text = C.serve_help()
  for f in C.serve_fields():
    assert f.doc and f"  {f.name} = {f.default!r}\n      {f.doc}" in text
  described = runconfig.describe(serve.get_config())
  for f in C.serve_fields():
    assert f"\n{f.name} " in described and f.doc in described, f.name
  assert "(undocumented)" not in described
  assert "(undocumented)" not in runconfig.describe(serve_text.get_config())


def test_every_field_settable_from_the_serve_config():
  c = serve.get_config()
  for f in C.serve_fields():
    assert f.name in c, f.name
  c.temperature, c.top_p, c.stream_link, c.layerwise_stream = 0.7, 0.9, "pcie4", False
  c.ray_placement = "spread"
  sc = runconfig.serve_config(c)
  assert (sc.sampling.temperature, sc.sampling.top_p) == (0.7, 0.9)
  assert (sc.disagg.stream_link, sc.disagg.layerwise_stream) == ("pcie4", False)
  assert sc.cluster.ray_placement == "spread" and sc.fault.recovery == "replica"


def test_config_error_names_the_serve_field():
  c = serve.get_config()
  c.top_p = 2.0
  with pytest.raises(runconfig.ConfigError) as e:
    runconfig.validate(c)
  assert e.value.field == "top_p" and "config.top_p" in str(e.value)
  c = serve.get_config()
  with c.unlocked():
    c.recovry = "replica"
  with pytest.raises(runconfig.ConfigError, match="did you mean 'recovery'"):
    runconfig.validate(c)
