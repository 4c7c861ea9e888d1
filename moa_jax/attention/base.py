"""The attention plug: the one seam between the Llama model and every attention variant.

The model computes queries, keys and values (RoPE already applied) and hands them to an
`Attention` object together with the query positions, the layer index and that layer's cache.
Dense attention with a dense KV cache, MoA's sparse kernels with the static per-head cache, and
the profiler's probes are all implementations of this protocol; the model never changes.

Einsum letters used across moa_jax: B batch, T query length, S key length, N query heads,
K key/value heads, G query heads per KV head (N = K * G), H head dim, D model dim, V vocab.
Positions are int32 token indices counted from each sequence's first real token; a negative
position marks left padding (queries) or an empty cache slot (keys).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

LayerCache = Any  # a pytree owned by the Attention implementation (None: no cache)


class Attention(Protocol):
  """Attention for one layer.

  Args:
    layer: layer index (a Python int).
    q: [B, T, N, H] queries after RoPE.
    k, v: [B, T, K, H] this call's keys (after RoPE) and values.
    q_pos: [B, T] int32 positions of this call's tokens (negative: padding).
    cache: this layer's cache, or None to attend only within this call (causal).
  Returns:
    out: [B, T, N, H] in q's dtype, and the updated layer cache (None when cache is None).
  """

  def __call__(
    self,
    layer: int,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    cache: LayerCache,
  ) -> tuple[jax.Array, LayerCache]: ...
