"""Attention influence (docs/method.md section 2): the first-order loss change of masking one entry.

For one head with attention map A = softmax(causal logits) [T, S], output O = A V, loss L and
G = dL/dA, masking entry (i, j) and renormalizing row i changes the loss, to first order, by

    E_ij = -A_ij (G_ij - sum_n G_in A_in) / (1 - A_ij),

and where 1 - A_ij is exactly 0 in float32 (row 0, or any row whose whole mass sits on one key)
renormalization is impossible and E_ij = -G_ij A_ij. Nothing else is added to the denominator.

How a sample's entries become one number per b x b block (`magnitude`):
  * 'entries': the sum of |E| over the block (MoA's profile as published);
  * 'blocks': |sum of E| over the block, the size of the first-order loss change of masking that
    block in that sample: entries of opposite sign cancel, as they do when the block is masked, so
    diffuse heads whose many small entries cancel no longer outweigh a head with one decisive
    entry (see benchmarks/README.md, "Profile magnitude");
  * 'signed': the sum of E (the signed first-order change, for validation).
The magnitude is taken per sample, before samples are averaged.

Two computations of the block sums live here:
  * `block_influence_from_grads`: the direct formula from A and G = dL/dA (G from `jax.grad`
    against probes added to the maps, see `moa_jax.profile.probes`).
  * `block_influence_tiled`: the lean one. With G = dO V^T and sum_n G_in A_in = dO_i . O_i,
    E_ij = -A_ij dO_i . (V_j - O_i) / (1 - A_ij), so dO of every layer (one backward pass) and
    q, k, v suffice: A and G are recomputed one tile of query rows at a time (each tile against
    its causal key prefix only, its row logsumexp in float32), so no T x S map exists beyond one
    tile of one layer.

Head order is GQA order: query head n = kv_head * G + group_member (as `q.reshape(B, T, K, G, H)`).
All results are float32 [B, N, NB, NB] with NB = ceil(T / block), summed over each block's
entries (the causal part: entries above the diagonal have A = 0 and contribute nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moa_jax.plans.rules import DENSE_WINDOW, MASKED_LOGIT, attend_mask, num_blocks

HIGHEST = jax.lax.Precision.HIGHEST


def pool_blocks(x: jax.Array, block: int) -> jax.Array:
  """Sums [..., T, S] over block x block tiles -> [..., ceil(T/block), ceil(S/block)]."""
  *lead, t, s = x.shape
  nt, ns = num_blocks(t, block), num_blocks(s, block)
  pad = [(0, 0)] * len(lead) + [(0, nt * block - t), (0, ns * block - s)]
  x = jnp.pad(x, pad)
  return x.reshape(*lead, nt, block, ns, block).sum(axis=(-3, -1))


def influence_entries(weights: jax.Array, grads: jax.Array) -> jax.Array:
  """E_ij = -A_ij (G_ij - sum_n G_in A_in) / (1 - A_ij); -A_ij G_ij where a row has no other mass.

  A row's dominant entry (A_ij > 1/2, at most one per row) is evaluated in the equivalent form
  -A_ij (G_ij - sum_{n != j} G_in A_in / sum_{n != j} A_in): both sums skip j, so a peaked row
  (1 - A_ij ~ 1e-4) loses no digits to cancellation. Every other entry has 1 - A_ij >= 1/2.

  Args:
    weights: A [..., T, S] float32 (rows sum to 1 over the attended keys, or are all zero);
    grads: G = dL/dA [..., T, S] float32 (equivalently dO_i . V_j).
  Returns:
    E [..., T, S] float32.
  """
  dominant = weights > 0.5
  rest = jnp.where(dominant, 0.0, weights)
  rest_mass = jnp.sum(rest, axis=-1, keepdims=True)  # [..., T, 1] = 1 - A_ij* of the dominant j*
  rest_dot = jnp.sum(rest * grads, axis=-1, keepdims=True)
  row_dot = rest_dot + jnp.sum(jnp.where(dominant, weights * grads, 0.0), axis=-1, keepdims=True)
  ordinary = -weights * (grads - row_dot) / jnp.where(dominant, 1.0, 1.0 - weights)
  has_rest = rest_mass > 0
  renormalized = grads - rest_dot / jnp.where(has_rest, rest_mass, 1.0)
  dominant_entry = -weights * jnp.where(has_rest, renormalized, grads)
  return jnp.where(dominant, dominant_entry, ordinary)


MAGNITUDES = ("entries", "blocks", "signed")


def pool_influence(entries: jax.Array, block: int, magnitude: str) -> jax.Array:
  """E [..., T, S] -> one value per block [..., ceil(T/b), ceil(S/b)] by `magnitude`."""
  if magnitude == "entries":
    return pool_blocks(jnp.abs(entries), block)
  pooled = pool_blocks(entries, block)
  if magnitude == "blocks":
    return jnp.abs(pooled)
  if magnitude == "signed":
    return pooled
  raise ValueError(f"unknown influence magnitude {magnitude!r}; choose one of {MAGNITUDES}")


def block_influence_from_grads(
  weights: jax.Array, grads: jax.Array, block: int, magnitude: str = "entries"
) -> jax.Array:
  """The direct path: per-block influence (see `magnitude` above) from the maps and dL/dA.

  Args:
    weights: A [B, K, G, T, S] float32 (zero where masked); grads: dL/dA, same shape.
    block: block size b.
  Returns:
    [B, N, ceil(T/b), ceil(S/b)] float32 with N = K * G.
  """
  weights = weights.astype(jnp.float32)
  grads = grads.astype(jnp.float32)
  entries = influence_entries(weights, grads)
  pooled = pool_influence(entries, block, magnitude)
  b, k, g = pooled.shape[:3]
  return pooled.reshape(b, k * g, *pooled.shape[3:])


def causal_weights(
  q: jax.Array,
  k: jax.Array,
  lengths: jax.Array,
  *,
  scale: float | None = None,
  q_offset: int = 0,
  keep: jax.Array | None = None,
) -> jax.Array:
  """Causal softmax maps in float32 for queries q[:, i] at positions q_offset + i.

  Args:
    q: [B, T, N, H]; k: [B, S, K, H]; lengths: [B] int32 valid tokens (right padding).
    keep: optional bool mask broadcastable to [B, K, G, T, S]: entries to keep (the rest are
      removed and each row renormalized).
  Returns:
    A [B, K, G, T, S] float32; rows and columns at or past `lengths` are zero.
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  scale = h**-0.5 if scale is None else scale
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
  logits = (
    jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32, precision=HIGHEST)
    * scale
  )  # [B, K, G, T, S]
  rows = q_offset + jnp.arange(t)
  cols = jnp.arange(s)
  q_pos = jnp.where(rows < lengths[:, None], rows, -1)  # [B, T]; -1: right padding
  k_pos = jnp.where(cols < lengths[:, None], cols, -1)  # [B, S]
  valid = attend_mask(
    q_pos[:, None, None, :, None], k_pos[:, None, None, None, :], 0, DENSE_WINDOW
  )  # [B, 1, 1, T, S]: dense causal
  if keep is not None:
    valid = valid & keep
  logits = jnp.where(valid, logits, MASKED_LOGIT)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, K, G, T, 1]
  return jnp.where(valid, jnp.exp(logits - lse), 0.0)


@functools.partial(jax.jit, static_argnames=("block", "tile", "scale", "magnitude"))
def block_influence_tiled(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  d_out: jax.Array,
  lengths: jax.Array,
  *,
  block: int,
  tile: int = 512,
  scale: float | None = None,
  magnitude: str = "entries",
) -> jax.Array:
  """The lean path for one layer: per-block influence from q, k, v and dO, one query tile at a time.

  Query tile r (rows r*tile ... (r+1)*tile - 1) is compared with its causal key prefix only
  (keys 0 ... (r+1)*tile - 1), which holds every key its rows attend: A is recomputed from q and k
  with the row logsumexp in float32, G_ij = dO_i . V_j, and sum_n G_in A_in = dO_i . O_i is taken
  as the row sum of G A over the recomputed A (so O itself is not needed, and the dominant entry
  of a peaked row avoids cancellation, see `influence_entries`). The largest intermediate is one
  tile's [B, N, tile, T] float32.

  Args:
    q, d_out: [B, T, N, H]; k, v: [B, T, K, H]; lengths: [B] int32 (right padding).
    block: block size b; tile: query rows per step (rounded to a multiple of `block`).
    magnitude: 'entries', 'blocks' or 'signed' (see the module docstring).
  Returns:
    [B, N, ceil(T/b), ceil(T/b)] float32.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  g = n // kv_heads
  tile = max(block, min(tile, num_blocks(t, block) * block) // block * block)
  padded = num_blocks(t, tile) * tile
  pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
  q, k, v, d_out = (jnp.pad(x, pad) for x in (q, k, v, d_out))
  nb_padded = padded // block
  rows_out = []
  for r in range(padded // tile):
    rows = slice(r * tile, (r + 1) * tile)
    keys = slice(0, (r + 1) * tile)
    weights = causal_weights(
      q[:, rows], k[:, keys], lengths, scale=scale, q_offset=r * tile
    )  # [B, K, G, tile, S]
    do_g = d_out[:, rows].reshape(b, tile, kv_heads, g, h)  # [B, tile, K, G, H]
    do_v = jnp.einsum(
      "btkgh,bskh->bkgts", do_g, v[:, keys], preferred_element_type=jnp.float32, precision=HIGHEST
    )  # [B, K, G, tile, S]
    entries = influence_entries(weights, do_v)
    pooled = pool_influence(entries, block, magnitude)
    pooled = pooled.reshape(b, n, tile // block, (r + 1) * tile // block)
    rows_out.append(jnp.pad(pooled, [(0, 0), (0, 0), (0, 0), (0, nb_padded - pooled.shape[-1])]))
  nb = num_blocks(t, block)
  return jnp.concatenate(rows_out, axis=2)[:, :, :nb, :nb]
