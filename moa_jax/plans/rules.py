"""Elastic rules and the one token-exact MoA mask (docs/method.md section 3).

This module is the single definition of which keys a query may attend. The kernels, the
caches, the profiler, the optimizer and the evaluation all ask `attend_mask`, or use block
layouts and densities derived here from it (tests check the derivations against brute force).

Semantics: a head with sink `s` and window `W` lets the query at position t attend the key at
position j iff  0 <= j <= t  and  (j < s  or  t - j < W).  Negative positions mark padding (or
empty cache slots) and attend nothing. For a rule (alpha, beta) the window at planned total
length N is  W(N) = clip(floor(alpha + beta * N), min(block, N), N).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_SINK = 64
DEFAULT_BLOCK = 64
DENSE_WINDOW = np.iinfo(np.int32).max  # a window that covers every causal key
# The logit of a masked (query, key) entry: finite, so that a row with nothing attended (yet)
# never turns into NaN in a softmax or an online-softmax rescale.
MASKED_LOGIT = -1e30

# Block layout codes (see `block_layout`).
SKIP, PARTIAL, FULL = 0, 1, 2

_FLOOR_EPS = 1e-6  # so that e.g. 0.29 * 100 floors to 29, not 28


@dataclasses.dataclass(frozen=True, order=True)
class ElasticRule:
  """One head's elastic rule: window W(N) = alpha + beta * N tokens (clamped), plus the sink."""

  alpha: float
  beta: float

  def window(self, n: int, block: int = DEFAULT_BLOCK) -> int:
    """The window in tokens at planned total length `n`."""
    return int(window_size(self.alpha, self.beta, n, block))


def window_size(alpha, beta, n: int, block: int = DEFAULT_BLOCK) -> np.ndarray:
  """W(N) = clip(floor(alpha + beta * n), min(block, n), n) as int64; broadcasts alpha and beta."""
  if n <= 0:
    raise ValueError(f"sequence length must be positive, got {n}")
  raw = np.floor(np.asarray(alpha, np.float64) + np.asarray(beta, np.float64) * n + _FLOOR_EPS)
  return np.clip(raw, min(block, n), n).astype(np.int64)


def attend_mask(q_pos, k_pos, sink, window):
  """True where a query at `q_pos` may attend a key at `k_pos` (the token-exact MoA rule).

  Arguments broadcast against each other and may be numpy arrays, jax arrays or values inside a
  Pallas kernel (only elementwise operators are used). Positions < 0 are padding / empty slots.
  """
  causal = (k_pos >= 0) & (q_pos >= 0) & (k_pos <= q_pos)
  return causal & ((k_pos < sink) | (q_pos - k_pos < window))


def num_blocks(n: int, block: int = DEFAULT_BLOCK) -> int:
  """Blocks of `block` tokens that cover n tokens: ceil(n / block)."""
  return -(-n // block)


def block_layout(windows, sink: int, n: int, block: int = DEFAULT_BLOCK) -> np.ndarray:
  """Block layout of heads with the given windows over positions 0..n-1.

  Args:
    windows: int array [...] of per-head windows in tokens.
  Returns:
    int8 [..., NB, NB] with SKIP (no attended entry), PARTIAL (some entries attended: mask
    element-wise, always the case on the diagonal) or FULL (every entry attended, no mask).
  """
  w = np.asarray(windows, np.int64)[..., None, None]
  nb = num_blocks(n, block)
  r = np.arange(nb)[:, None]
  c = np.arange(nb)[None, :]
  q0, q1 = r * block, np.minimum((r + 1) * block, n) - 1
  k0, k1 = c * block, np.minimum((c + 1) * block, n) - 1
  causal_any = k0 <= q1
  any_sink = causal_any & (k0 < sink)
  any_window = causal_any & (np.maximum(0, q0 - k1) < w)
  computed = any_sink | any_window
  first_non_sink = np.maximum(k0, sink)
  all_attended = (first_non_sink > k1) | (q1 - first_non_sink < w)
  full = computed & (k1 < q0) & all_attended
  layout = np.where(full, FULL, np.where(computed, PARTIAL, SKIP))
  return layout.astype(np.int8)


def key_block_ranges(off, t0, t1, win_min, win_max, *, sink: int, block_k: int):
  """Key blocks of `block_k` keys that query tokens t0..t1 reach (the kernels' loop bounds).

  Token indices count within a row with `off` left-padding tokens (token i has position
  i - off), so this is `attend_mask` at block granularity for a tile of rows whose windows lie
  in [win_min, win_max]. Works on scalars inside kernels and on broadcasting int32 arrays.
  Returns (sink_lo, sink_hi, lo, f0, f1, hi): the sink blocks [sink_lo, sink_hi) that lie
  before the window's blocks [lo, hi), of which [f0, f1) are interior: key block
  [k0, k0 + block_k) with k0 >= off (no padding), k0 + block_k - 1 <= t0 (causal for every
  row) and t1 - k0 < win_min (inside every row's window), so every pair is attended. The other
  blocks need the element-wise mask. Without padding and with tiles of one block the visited
  blocks are the non-SKIP blocks of `block_layout` for win_max (tests check this).
  """
  lo = lax.div(jnp.maximum(off, t0 - win_max + 1), block_k)
  hi = jnp.maximum(lax.div(t1, block_k) + 1, lo)  # empty when the tile is all padding
  first_full = lax.div(jnp.maximum(off, t1 - win_min + 1) + block_k - 1, block_k)
  f0 = jnp.clip(first_full, lo, hi)
  f1 = jnp.clip(lax.div(t0 + 1, block_k), f0, hi)
  sink_lo = lax.div(off, block_k)
  sink_end = lax.div(off + sink + block_k - 1, block_k) if sink > 0 else sink_lo
  sink_hi = jnp.clip(sink_end, sink_lo, jnp.maximum(lo, sink_lo))
  return sink_lo, sink_hi, lo, f0, f1, hi


def attended_pairs(windows, sink: int, n: int) -> np.ndarray:
  """Number of attended causal (query, key) pairs over positions 0..n-1, per head. [...] int64."""
  w = np.asarray(windows, np.int64)[..., None]
  t = np.arange(n, dtype=np.int64)
  in_sink = np.minimum(t + 1, sink)
  in_window = np.minimum(t + 1, w)
  overlap = np.maximum(0, in_sink - np.maximum(0, t - w + 1))
  return (in_sink + in_window - overlap).sum(-1)


def cached_tokens(windows, sink: int, n: int) -> np.ndarray:
  """KV-cache slots a head needs for planned length n: min(sink + W, n). [...] int64."""
  return np.minimum(sink + np.asarray(windows, np.int64), n)


def kv_density(windows, sink: int, n: int) -> float:
  """Memory density: mean over cached heads of min(sink + W, n) / n (sinks counted)."""
  return float(np.mean(cached_tokens(windows, sink, n)) / n)


def attention_density(windows, sink: int, n: int) -> float:
  """Compute density: attended causal pairs / (n (n + 1) / 2), mean over heads (sinks counted)."""
  return float(np.mean(attended_pairs(windows, sink, n)) / (n * (n + 1) / 2))


def candidate_rules(
  profile_lengths: Sequence[int],
  constraint_lengths: Sequence[int],
  alpha_step: int = 1024,
  betas: Sequence[float] = tuple(i / 8 for i in range(9)),
) -> list[ElasticRule]:
  """The candidate grid of docs/method.md section 3.

  alpha runs over {-m, -m + alpha_step, ..., P} (m: smallest constraint length, P: largest
  profile length). A rule is kept if its unclamped window is positive at the smallest length
  and at most P at P (shorter lengths then clamp it to N); (0, 0) is dropped. With profile
  lengths 2k/4k/8k and constraint lengths 2k/4k/8k/16k this is the paper's 48-rule grid.
  """
  if not profile_lengths or not constraint_lengths:
    raise ValueError("candidate_rules needs at least one profile and one constraint length")
  lengths = sorted(set(profile_lengths) | set(constraint_lengths))
  smallest, biggest_profile = min(lengths), max(profile_lengths)
  m = min(constraint_lengths)
  alphas = range(-m, biggest_profile + 1, alpha_step)
  rules = []
  for alpha, beta in itertools.product(alphas, betas):
    if alpha == 0 and beta == 0:
      continue
    if alpha + beta * smallest <= 0:
      continue
    if alpha + beta * biggest_profile > biggest_profile:
      continue
    rules.append(ElasticRule(float(alpha), float(beta)))
  return rules


def expand_to_query_heads(values, num_heads: int):
  """Per-KV-group values [..., K] -> per-query-head values [..., num_heads] (GQA order).

  Query head n belongs to group n // G (G = num_heads / K); values already given per query
  head (K = num_heads) come back unchanged. Works on numpy arrays, jax arrays (also traced) and
  sequences (returned as numpy arrays).
  """
  values = values if hasattr(values, "shape") else np.asarray(values)
  k = values.shape[-1]
  if k == 0 or num_heads % k:
    raise ValueError(f"{num_heads} query heads cannot be split into {k} groups")
  return values if k == num_heads else values[..., np.arange(num_heads) // (num_heads // k)]
