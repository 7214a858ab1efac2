"""The cache oracle: the cache a worker resumes from equals the failure-free run's, bit for bit.

Tokens alone are a weak witness of a restore: a real model's greedy token often survives a
slightly wrong cache. With `ServeConfig.cache_probe` every token worker reports, per used row of a
microbatch's cache, a digest of that row's K and V over its used prefix (api.CacheProbe) after
every step it computes and wherever a cache came to it from elsewhere: an install from a replica
or a snapshot, a swap-in from the host log, a prompt cache loaded from a host slot. The engine
names each row by its request (`ProbeRecord`), so a run and a failure-free reference of the same
requests on the same stage layout meet at the same keys (stage, request, row length) whatever
their microbatch ids, and `compare` checks every restore point of the run against the reference.

A row's key holds its length, which fixes the point in the request's life (prompt length plus
tokens cached); rows past their length and padding rows are never digested. The reference is a
failure-free serve of the same requests on an engine with the same token stages (for a
disaggregated run, a colocated engine of the same token stages computes what the slots should
have held). A restore point is checked against this run's own last step at the same key when
there is one (what the dead worker had computed: exact whatever microbatch the row shared, which
a float model's digest depends on), else against the reference. Two reference probes of one key that disagree (e.g. a swap-in that differs from the
step that wrote it) are reported as conflicts.
"""

from __future__ import annotations

import dataclasses

from dejavu_jax.runtime.api import RESTORE_POINTS, CacheProbe


@dataclasses.dataclass(frozen=True)
class ProbeRecord:
  stage: int
  request_id: int
  length: int        # the row's used prefix (prompt + tokens cached)
  point: str         # api.CacheProbe.point
  step: int
  mb_id: int
  digest: str

  @property
  def key(self) -> tuple:
    return (self.stage, self.request_id, self.length)


def records(ev: CacheProbe, request_ids) -> list[ProbeRecord]:
  """The probe's rows that hold requests (`request_ids`: the microbatch's rows 0..n-1)."""
  return [ProbeRecord(ev.stage, request_ids[row], n, ev.point, ev.step, ev.mb_id, digest)
          for row, n, digest in ev.rows if row < len(request_ids)]


@dataclasses.dataclass
class CacheVerdict:
  checked: int = 0                       # restore points of the run compared
  by_point: dict = dataclasses.field(default_factory=dict)    # point -> compared
  mismatches: list = dataclasses.field(default_factory=list)  # (run record, reference digest)
  missing: list = dataclasses.field(default_factory=list)     # run records with no reference
  conflicts: list = dataclasses.field(default_factory=list)   # reference keys seen twice, unequal

  @property
  def identical(self) -> bool | None:
    """True: every restore point equals the reference; None: there was none to compare."""
    if self.mismatches or self.missing or self.conflicts:
      return False
    return True if self.checked else None

  def describe(self) -> str:
    lines = [f"{self.checked} restore points compared {self.by_point}: "
             f"{len(self.mismatches)} differ, {len(self.missing)} without a reference, "
             f"{len(self.conflicts)} reference conflicts"]
    for rec, want in self.mismatches[:5]:
      lines.append(f"  stage {rec.stage} request {rec.request_id} length {rec.length} "
                   f"({rec.point}, microbatch {rec.mb_id} step {rec.step}): {rec.digest} != "
                   f"reference {want}")
    for rec in self.missing[:3]:
      lines.append(f"  no reference for stage {rec.stage} request {rec.request_id} length "
                   f"{rec.length} ({rec.point})")
    return "\n".join(lines)


def reference_map(reference) -> tuple[dict, list]:
  """key -> digest over every probe of a failure-free `ServeResult` (or a list of records),
  and the keys whose probes disagree."""
  probes = getattr(reference, "cache_probes", reference)
  ref, conflicts = {}, []
  for rec in probes:
    have = ref.setdefault(rec.key, rec.digest)
    if have != rec.digest:
      conflicts.append(rec.key)
  return ref, conflicts


def compare(reference, result, points=RESTORE_POINTS) -> CacheVerdict:
  """Every probe of `result` at `points` against the failure-free `reference` (module doc)."""
  if not getattr(reference, "cache_probes", reference):
    raise ValueError("the reference has no cache probes: serve it with "
                     "ServeConfig(cache_probe=True)")
  ref, conflicts = reference_map(reference)
  verdict = CacheVerdict(conflicts=conflicts)
  own = {}   # key -> the digest this run's own last step at that key computed
  for rec in getattr(result, "cache_probes", result):
    if rec.point not in points:
      if rec.point == "step":
        own[rec.key] = rec.digest
      continue
    verdict.checked += 1
    verdict.by_point[rec.point] = verdict.by_point.get(rec.point, 0) + 1
    # What was lost is what this run computed last at that key: the witness of an exact restore
    # whatever microbatch the row shared. A float model's K/V differ in low bits with the
    # batch's shapes, and a restart regroups requests, so the failure-free run is the witness
    # only where this run computed nothing at that key (a prompt load, a lost probe).
    want = own.get(rec.key) or ref.get(rec.key)
    if want is None:
      verdict.missing.append(rec)
    elif want != rec.digest:
      verdict.mismatches.append((rec, want))
  return verdict
