"""Predicted loss increase dL(rule, N) of every candidate rule for every head (docs/method.md 2, 4).

    dL_h(rule, N) = sum over causal blocks (r >= c) of (1 - keep_rule[r, c]) * E_bar_h[r, c]

E_bar [L, H, NB, NB] is the block-pooled |influence| profiled at length N. The block keep weight
`keep_rule[r, c]` is the fraction of the block's causal (query, key) entries that the token-exact
rule mask of `moa_jax.plans.rules.attend_mask` attends. Approximation (block granularity): this is
exact for blocks the rule keeps or drops entirely and assumes the influence is spread uniformly
over the causal entries of a partially kept block (the window edge and the diagonal blocks).

Computation without a loop over masks: away from the sink columns (and the truncated last block
row when N is not a multiple of the block) a block's keep weight depends only on its diagonal
offset d = r - c, and it is 1 below the window edge, 0 beyond it and fractional on at most two
diagonals. So per head we sum E_bar along each block diagonal, take prefix sums over d, and read
off every rule's dropped mass from them; the few sink-column / last-row blocks are weighted
exactly, one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moa_jax.plans import rules as rules_lib


def _attended_in_blocks(q0, q_rows, k0, k1, sink, window) -> np.ndarray:
  """Attended causal pairs per block: queries q0..q0+q_rows-1 against keys k0..k1 (inclusive).

  All arguments broadcast; the count follows `rules_lib.attend_mask` (j <= t and (j < sink or
  t - j < window)) row by row, so it is exact. Returns float64 with the broadcast shape.
  """
  q0, k0, k1 = (np.asarray(a, np.int64)[..., None] for a in (q0, k0, k1))
  q_rows = np.asarray(q_rows, np.int64)[..., None]
  sink = np.asarray(sink, np.int64)[..., None]
  window = np.asarray(window, np.int64)[..., None]
  offset = np.arange(int(np.max(q_rows)), dtype=np.int64)  # [b]
  q = q0 + offset  # [..., b]
  last_key = np.minimum(k1, q)  # keys k0..last_key are causal for query q
  in_sink = np.maximum(0, np.minimum(last_key, sink - 1) - k0 + 1)
  first_window_key = np.maximum(np.maximum(k0, sink), q - window + 1)
  in_window = np.maximum(0, last_key - first_window_key + 1)
  return np.where(offset < q_rows, in_sink + in_window, 0).sum(-1).astype(np.float64)


def loss_delta(
  e_bar: np.ndarray,
  rules: Sequence[rules_lib.ElasticRule],
  n: int,
  sink: int = rules_lib.DEFAULT_SINK,
  block: int = rules_lib.DEFAULT_BLOCK,
) -> np.ndarray:
  """dL of every rule for every head at length n.

  Args:
    e_bar: [L, H, NB, NB] block-pooled influence at length n (NB = ceil(n / block)); only the
      causal blocks r >= c are read.
    rules: the R candidate rules.
  Returns:
    float64 [L, H, R]: predicted loss increase of each head under each rule.
  """
  e_bar = np.asarray(e_bar, np.float64)
  nb = rules_lib.num_blocks(n, block)
  if e_bar.ndim != 4 or e_bar.shape[-2:] != (nb, nb):
    raise ValueError(
      f"e_bar must have shape [L, H, {nb}, {nb}] for length {n} and block {block}, "
      f"got {e_bar.shape}"
    )
  if not np.all(np.isfinite(e_bar)):
    raise ValueError("e_bar holds NaN or infinite values: re-run the profiling")
  if not rules:
    raise ValueError("loss_delta needs at least one candidate rule")
  windows = rules_lib.window_size(
    [r.alpha for r in rules], [r.beta for r in rules], n, block
  )  # [R]
  r_idx, c_idx = np.tril_indices(nb)  # causal blocks
  sink_cols = min(-(-sink // block), nb)
  truncated_last_row = n % block != 0
  special = (c_idx < sink_cols) | (truncated_last_row & (r_idx == nb - 1))

  # Regular blocks: full-size, no sink key; keep weight depends on d = r - c only.
  d = np.arange(nb)
  keep_diag = _attended_in_blocks(
    d * block, block, 0, block - 1, 0, windows[:, None]
  ) / _attended_in_blocks(d * block, block, 0, block - 1, 0, n + 1)  # [R, NB]
  diag = (r_idx - c_idx)[~special]
  order = np.argsort(diag, kind="stable")
  diag_sums = np.zeros(e_bar.shape[:2] + (nb,))  # [L, H, NB] E_bar summed along each diagonal
  if diag.size:
    present, starts = np.unique(diag[order], return_index=True)
    regular = e_bar[..., r_idx[~special][order], c_idx[~special][order]]  # [L, H, M]
    diag_sums[..., present] = np.add.reduceat(regular, starts, axis=-1)
  prefix = np.concatenate(
    [np.zeros(diag_sums.shape[:2] + (1,)), np.cumsum(diag_sums, -1)], -1
  )  # [L, H, NB + 1]

  # keep_diag[c] is 1 on d < first_partial, 0 on d >= first_dropped, fractional in between.
  first_partial = np.argmax(keep_diag < 1, axis=-1) + nb * np.all(keep_diag >= 1, axis=-1)
  first_dropped = np.argmax(keep_diag <= 0, axis=-1) + nb * np.all(keep_diag > 0, axis=-1)
  assert np.all(first_dropped - first_partial <= 2), "window edge spans more than two diagonals"
  delta = prefix[..., nb, None] - prefix[..., first_dropped]  # [L, H, R] diagonals dropped whole
  for step in range(2):
    edge = np.minimum(first_partial + step, nb - 1)  # [R]
    weight = np.where(
      first_partial + step < first_dropped, 1 - keep_diag[np.arange(len(rules)), edge], 0.0
    )  # [R]
    delta += weight * diag_sums[..., edge]

  # Sink-column and truncated-last-row blocks: exact per-block keep weights.
  if special.any():
    rs, cs = r_idx[special], c_idx[special]
    q_rows = np.minimum((rs + 1) * block, n) - rs * block
    k1 = np.minimum((cs + 1) * block, n) - 1
    kept = _attended_in_blocks(rs * block, q_rows, cs * block, k1, sink, windows[:, None])
    causal = _attended_in_blocks(rs * block, q_rows, cs * block, k1, 0, n + 1)
    dropped = 1 - kept / causal  # [R, S]
    delta += np.einsum("rs,lhs->lhr", dropped, e_bar[..., rs, cs])
  return delta
