"""Pure-jnp attention with the MoA rule mask: `reference_attention`, the reference every kernel
is tested against, and `blocked_attention`, the same computation in query blocks (the CPU path
of `dispatch`: no T x S float32 map)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moa_jax.plans.rules import (
  DEFAULT_SINK,
  DENSE_WINDOW,
  MASKED_LOGIT,
  attend_mask,
  expand_to_query_heads,
)


def reference_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  k_pos: jax.Array,
  *,
  windows=None,
  sink: int = DEFAULT_SINK,
  scale: float | None = None,
) -> jax.Array:
  """Softmax attention where query t sees key j iff `attend_mask` allows it.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (GQA, K/V never repeated).
    q_pos: [B, T] int32; k_pos: [B, S] or, for per-head caches, [B, K, S] int32.
    windows: None for dense causal attention, else int [N] (per query head) or [K] windows.
    sink: sink tokens kept by every head (ignored when windows is None).
    scale: logit scale, default 1/sqrt(H).
  Returns:
    [B, T, N, H] in q's dtype; rows with nothing to attend (padding) are zero.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  g = n // kv_heads
  scale = h**-0.5 if scale is None else scale
  if windows is None:
    win, sink = jnp.full((n,), DENSE_WINDOW, jnp.int32), 0
  else:
    win = expand_to_query_heads(jnp.asarray(windows, jnp.int32), n)
  win = win.reshape(kv_heads, g)[None, :, :, None, None]  # [1, K, G, 1, 1]
  if k_pos.ndim == 2:
    k_pos = jnp.broadcast_to(k_pos[:, None, :], (b, kv_heads, k_pos.shape[-1]))
  mask = attend_mask(q_pos[:, None, None, :, None], k_pos[:, :, None, None, :], sink, win)
  qg = q.reshape(b, t, kv_heads, g, h)  # [B, T, K, G, H]
  logits = (
    jnp.einsum(
      "btkgh,bskh->bkgts",
      qg,
      k,
      preferred_element_type=jnp.float32,
      precision=jax.lax.Precision.HIGHEST,
    )
    * scale
  )  # [B, K, G, T, S]
  logits = jnp.where(mask, logits, MASKED_LOGIT)
  weights = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
  out = jnp.einsum(
    "bkgts,bskh->btkgh", weights, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )  # [B, T, K, G, H]
  return out.reshape(b, t, n, h).astype(q.dtype)


def blocked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  k_pos: jax.Array | None = None,
  *,
  windows=None,
  sink: int = DEFAULT_SINK,
  scale: float | None = None,
  block_q: int = 256,
) -> jax.Array:
  """`reference_attention` one block of `block_q` query rows at a time (the CPU path).

  The same numbers (each row's softmax sees the same attended keys; only float32 summation
  order may differ), but no [T, S] float32 map exists beyond one block's [block_q, S].

  Args:
    q, k, v, windows, sink, scale: as `reference_attention`.
    q_pos: [B, T] int32 query positions.
    k_pos: [B, S] or [B, K, S] key positions; None for self-attention over this call's tokens
      (k_pos = q_pos, positions increasing along each row where >= 0): block i then reads only
      the keys up to its last row, the later ones being causally masked.
    block_q: query rows per block (256: 1.3-1.4x faster than 512 on 2 CPU cores at T = 3072,
      benchmarks/README.md "Demo speed").
  Returns:
    [B, T, N, H] in q's dtype.
  """
  if block_q < 1:
    raise ValueError(f"block_q must be positive, got {block_q}")
  kwargs = dict(windows=windows, sink=sink, scale=scale)
  t = q.shape[1]
  outs = []
  for start in range(0, t, block_q):
    stop = min(start + block_q, t)
    if k_pos is None:  # keys after `stop` are later than every query of the block
      key, value, key_pos = k[:, :stop], v[:, :stop], q_pos[:, :stop]
    else:
      key, value, key_pos = k, v, k_pos
    outs.append(
      reference_attention(q[:, start:stop], key, value, q_pos[:, start:stop], key_pos, **kwargs)
    )
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
