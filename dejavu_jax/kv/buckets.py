"""Length buckets: prompts are padded to a few static lengths so each compiles once.

A value-level helper shared by the models (prefill shapes), the streaming library (packed prefix
lengths), swapping (swap-in prefix sizes) and the serving engine (prompt buckets).
"""

from __future__ import annotations

MIN_BUCKET = 16


def bucket_length(n: int, limit: int) -> int:
  """Smallest power of two >= n (at least MIN_BUCKET), capped at `limit`."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return min(b, limit)
