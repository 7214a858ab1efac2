"""A real two-host Ray cluster on this machine: each node in its own Linux network namespace,
joined by a veth pair whose two addresses exist only inside those namespaces (created and
removed here). The head listens on its namespace address; the driver runs in the head's
namespace (the only place that address is reachable); the pipeline is spread one stage per node;
the stage on the other "host" is SIGKILLed by the driver's remote path (the actor kills itself)
and recovered from its replica. Oracle: tokens equal `fake_generate`. Every TCP listener of each
namespace is on its own address or loopback (a wildcard bind there covers exactly those two:
the namespace has no other address). Namespaces and every process in them are removed even when
the test fails; a namespace that cannot be made fails the test with the reason."""

import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _sh(*cmd, ns=None, check=True, timeout=120):
  full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
  p = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise RuntimeError(f"{' '.join(full)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
  return p.stdout


def _free_subnet() -> ipaddress.IPv4Network:
  """A /24 no interface of this machine's own namespace uses (so the addresses really exist only
  inside the test's namespaces)."""
  used = [ipaddress.ip_interface(w.split()[3]).network
          for w in _sh("ip", "-o", "-4", "addr").splitlines() if len(w.split()) > 3]
  for third in range(77, 250):
    net = ipaddress.ip_network(f"10.213.{third}.0/24")
    if not any(net.overlaps(u) for u in used):
      return net
  raise RuntimeError("no free 10.213.x.0/24 subnet")


class Namespaces:
  """Two namespaces and a veth pair between them; `close` kills every process inside them
  (`ip netns pids`: exactly the processes started there) and deletes them."""

  def __init__(self):
    tag = f"{os.getpid() % 100000}"
    self.names = [f"dvh{tag}", f"dvw{tag}"]
    self.made: list[str] = []
    net = _free_subnet()
    self.ips = [str(net.network_address + 1), str(net.network_address + 2)]
    self.prefix = net.prefixlen

  def make(self):
    probe = f"dvprobe{os.getpid() % 100000}"
    try:
      _sh("ip", "netns", "add", probe)
      _sh("ip", "netns", "del", probe)
    except RuntimeError as e:
      pytest.fail(f"cannot create a network namespace (root and CAP_SYS_ADMIN needed): {e}")
    for n in self.names:
      _sh("ip", "netns", "add", n)
      self.made.append(n)
    veth = [f"v{n}" for n in self.names]
    _sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
    for n, v, ip in zip(self.names, veth, self.ips):
      _sh("ip", "link", "set", v, "netns", n)
      # No IPv6 link-local address either: the veth carries exactly one address.
      _sh("sysctl", "-qw", f"net.ipv6.conf.{v}.disable_ipv6=1", ns=n)
      _sh("ip", "addr", "add", f"{ip}/{self.prefix}", "dev", v, ns=n)
      _sh("ip", "link", "set", v, "up", ns=n)
      _sh("ip", "link", "set", "lo", "up", ns=n)

  def pids(self, n) -> list[int]:
    return [int(p) for p in _sh("ip", "netns", "pids", n, check=False).split()]

  def close(self) -> list[int]:
    """Returns the pids that were still alive in a namespace when it was closed."""
    left = []
    for n in self.made:
      pids = self.pids(n)
      left += pids
      for p in pids:
        try:
          os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
          pass
    deadline = time.monotonic() + 15
    while any(self.pids(n) for n in self.made) and time.monotonic() < deadline:
      time.sleep(0.2)
    for n in self.made:
      _sh("ip", "netns", "del", n, check=False)   # the veth pair goes with it
    self.made = []
    return left


def _running(pid: int) -> bool:
  """Alive and not a zombie (a killed daemon waits for init to reap it)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _start(env, ns, *args):
  p = subprocess.run(["ip", "netns", "exec", ns, RAY, "start", *args], env=env,
                     capture_output=True, text=True, timeout=180)
  if p.returncode != 0:
    raise RuntimeError(f"ray start {' '.join(args)} in {ns} failed ({p.returncode}): "
                       f"{p.stdout[-1500:]} {p.stderr[-2500:]}")


def _listeners(ns) -> list[str]:
  """Local addresses of every listening TCP socket in namespace `ns` (`ss -ltn`)."""
  return [line.split()[3].rsplit(":", 1)[0].strip("[]")
          for line in _sh("ss", "-Hltn", ns=ns).splitlines() if line.strip()]


def _addresses(ns) -> set[str]:
  return {w.split()[3].split("/")[0] for w in _sh("ip", "-o", "addr", ns=ns).splitlines()}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_namespace_hosts_spread_pipeline_remote_kill():
  nss = Namespaces()
  # Token authentication on, with a token this test makes (every node and the driver hold it).
  env = {**os.environ, "PYTHONPATH": ROOT, "RAY_USAGE_STATS_ENABLED": "0",
         "JAX_PLATFORMS": "cpu", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
  env.pop("RAY_ADDRESS", None)
  head, worker = nss.names
  address = f"{nss.ips[0]}:6379"
  try:
    nss.make()
    assert nss.ips[0] not in _sh("ip", "-o", "addr"), "the head's address leaked to this host"
    common = ["--num-cpus=2", "--disable-usage-stats"]
    _start(env, head, "--head", f"--node-ip-address={nss.ips[0]}", "--port=6379",
           "--include-dashboard=false", *common)
    _start(env, worker, f"--address={address}", f"--node-ip-address={nss.ips[1]}", *common)
    drv = subprocess.run(["ip", "netns", "exec", head, sys.executable, "-m", "tests.netns_serve",
                          f"--address={address}", "--kill_at=0.6"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert drv.returncode == 0, drv.stderr[-4000:]
    out = json.loads(drv.stdout.strip().splitlines()[-1])
    assert out["error"] is None
    assert out["tokens_identical"]
    assert out["driver_ip"] == nss.ips[0]
    assert sorted(out["stage_ips"]) == sorted(nss.ips), "spread: one stage on each host"
    (kill,) = out["kills"]
    assert kill["stage"] == out["remote_stage"] == out["stage_ips"].index(nss.ips[1])
    assert kill["how"] == "SIGKILL by the actor itself (another host)"
    assert out["handled_by"] == [{"replica": 2}]
    assert out["replacement_warm"], "the spare took the stage with its warm program and weights"
    with pytest.raises(ProcessLookupError):   # the killed actor's process is gone
      os.kill(kill["pid"], 0)
    for ns, ip in zip(nss.names, nss.ips):
      assert _addresses(ns) - {"::1"} == {"127.0.0.1", ip}, _addresses(ns)
      listen = _listeners(ns)
      assert listen, f"no listener in {ns}"
      bad = [a for a in listen if a not in (ip, "127.0.0.1", "::1", "0.0.0.0", "*", "::")
             and not a.startswith("127.")]
      assert not bad, f"{ns} listens on {bad}"
    assert any(a == nss.ips[0] for a in _listeners(head)), "the head's GCS on its address"
  finally:
    left = nss.close()   # the cluster runs until here by design: nothing may outlive it
  deadline = time.monotonic() + 15
  while (alive := [p for p in left if _running(p)]) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not alive, f"processes of the namespace cluster left behind: {alive}"
  assert not [n for n in _sh("ip", "netns", "list").split() if n in nss.names]
