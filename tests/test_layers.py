"""The package import graph is acyclic: every package imports only from packages below it.

Imports inside functions count (a lazy import is still a dependency). A top-level module
(config.py, costmodel.py, workload.py, ...) is a node like a package."""

import ast
import os

import dejavu_jax

ROOT = os.path.dirname(dejavu_jax.__file__)


def _node(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if parts[0] == "dejavu_jax" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(dirpath, f)
      rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
      src = _node(rel.removesuffix(".__init__"))
      if src is None:
        continue
      graph.setdefault(src, set())
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
          dst = _node(n)
          if dst and dst != src and (os.path.exists(os.path.join(ROOT, dst)) or
                                     os.path.exists(os.path.join(ROOT, dst + ".py"))):
            graph[src].add(dst)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def test_package_import_graph_is_acyclic():
  graph = import_graph()
  assert {"config", "kv", "models", "stream", "runtime", "fault", "serving", "sim",
          "studies"} <= set(graph)
  assert cycles(graph) == [], {k: sorted(v) for k, v in graph.items()}


def test_layers_point_down():
  """The layering the packages' docstrings describe (a lower layer never imports a higher)."""
  graph = import_graph()
  order = ["partition", "config", "costmodel", "workload", "metrics", "kv", "models", "stream",
           "pipeline", "runtime", "fault", "serving", "sim", "planner", "studies", "server"]
  rank = {n: i for i, n in enumerate(order)}
  for src, dsts in graph.items():
    for dst in dsts:
      if src == "sim" and dst == "serving" or src == "serving" and dst == "sim":
        raise AssertionError(f"{src} imports {dst}: the simulator and the engine sit side by side")
      assert rank[dst] < rank[src], f"{src} (layer {rank[src]}) imports {dst} (layer {rank[dst]})"


def test_the_check_sees_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []
