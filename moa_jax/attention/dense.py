"""Dense causal attention with a dense KV cache: the baseline `Attention` implementation."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moa_jax.attention.reference import blocked_attention

IMPLS = ("reference", "xla", "cudnn")


class DenseCache(NamedTuple):
  """One layer's dense KV cache (a pytree). Slots fill left to right, the same for every row."""

  k: jax.Array  # [B, S, K, H] keys after RoPE
  v: jax.Array  # [B, S, K, H]
  pos: jax.Array  # [B, S] int32 key positions; -1 = empty slot or padding
  index: jax.Array  # [] int32 next slot to write


@dataclasses.dataclass(frozen=True)
class DenseAttention:
  """Dense causal attention; with a cache, a call of T tokens attends the cache and itself.

  impl:
    "reference": pure jnp with the causal mask on positions (any left padding, any chunk or
      turn on top of the cache: slots of padding hold position -1).
    "xla" / "cudnn": `jax.nn.dot_product_attention` (cuDNN flash attention on GPU), for batches
      without left padding (every row's tokens fill the same slots; `generate` checks this).
      A call of T > 1 tokens on a non-empty cache merges two calls (the cache, causal within
      the chunk) by their log-sum-exp, which jax returns rounded to the input dtype (bf16:
      weights off by up to ~3%); a fresh prompt and decoding are one call each.
  """

  impl: str = "reference"

  def __post_init__(self):
    if self.impl not in IMPLS:
      raise ValueError(f"unknown dense attention impl {self.impl!r}; choose one of {IMPLS}")

  def __call__(
    self,
    layer: int,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    cache: DenseCache | None,
  ) -> tuple[jax.Array, DenseCache | None]:
    """q [B, T, N, H], k/v [B, T, K, H], q_pos [B, T] -> ([B, T, N, H], updated cache)."""
    del layer  # every layer attends densely
    if self.impl == "reference":
      if cache is None:
        return blocked_attention(q, k, v, q_pos), None
      written = write_cache(cache, k, v, q_pos)
      cached = lambda: blocked_attention(q, written.k, written.v, q_pos, written.pos)
      if q.shape[1] == 1:
        return cached(), written
      fresh = lambda: blocked_attention(q, k, v, q_pos)  # empty cache: causal blocks, no S slots
      return jax.lax.cond(cache.index == 0, fresh, cached), written
    if cache is None:
      return self._fused(q, k, v, is_causal=True), None
    b, t = q_pos.shape
    if t == 1:
      cache = write_cache(cache, k, v, q_pos)
      return self._fused(q, cache.k, cache.v, kv_lengths=jnp.full((b,), cache.index)), cache
    new, new_lse = self._fused(q, k, v, is_causal=True, residual=True)  # [B, T, N, H], [B, T, N]

    def with_cache():
      old, old_lse = self._fused(
        q, cache.k, cache.v, kv_lengths=jnp.full((b,), cache.index), residual=True
      )
      top = jnp.maximum(new_lse, old_lse).astype(jnp.float32)
      w_new, w_old = jnp.exp(new_lse - top)[..., None], jnp.exp(old_lse - top)[..., None]
      merged = w_new * new.astype(jnp.float32) + w_old * old.astype(jnp.float32)
      return (merged / (w_new + w_old)).astype(q.dtype)  # [B, T, N, H]

    out = jax.lax.cond(cache.index > 0, with_cache, lambda: new)
    return out, write_cache(cache, k, v, q_pos)

  def _fused(self, q, k, v, *, is_causal=False, kv_lengths=None, residual=False):
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      is_causal=is_causal,
      implementation=self.impl,
      return_residual=residual,
      key_value_seq_lengths=None if kv_lengths is None else kv_lengths.astype(jnp.int32),
    )

  def init_cache(self, config, batch_size: int, max_length: int, dtype=None) -> list[DenseCache]:
    """Empty caches (one per layer) of `max_length` slots; dtype defaults to config.dtype."""
    dtype = config.dtype if dtype is None else dtype
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    return [
      DenseCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full((batch_size, max_length), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
      )
      for _ in range(config.num_layers)
    ]


def write_cache(cache: DenseCache, k: jax.Array, v: jax.Array, pos: jax.Array) -> DenseCache:
  """Write T new keys/values [B, T, K, H] and positions [B, T] at slots index..index+T-1."""
  t, slots = k.shape[1], cache.k.shape[1]
  if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + t > slots:
    raise ValueError(f"KV cache overflow: writing {t} tokens at slot {int(cache.index)} of {slots}")
  i = cache.index
  return DenseCache(
    k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, i, 0, 0)),
    v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, i, 0, 0)),
    pos=jax.lax.dynamic_update_slice(cache.pos, pos.astype(jnp.int32), (0, i)),
    index=i + t,
  )
