"""Attention implementations used by the profiler (the `Attention` protocol, no cache).

All of them assume right padding: a sequence's valid tokens come first and have positions
0, 1, ...; `q_pos < 0` marks the padding after them. Keys are this call's keys (cache=None).

  * `MapProbeAttention`: A = softmax(causal logits) in float32, explicitly; a probe [B, K, G, T, T]
    is added to A before A @ V, so `jax.grad` against the probes is dL/dA for every layer. The maps
    are recorded for the influence formula (direct path).
  * `OutputProbeAttention`: memory-efficient attention
    (`moa_jax.attention.fused.FusedCausalAttention`: cuDNN on GPU; on CPU `tiled_attention`)
    with a probe added to the output, so `jax.grad` against the probes is dO for every layer;
    q, k and v are recorded for the tiled pass (lean path).
  * `BlockMaskedAttention`: explicit softmax with a block mask, entries removed and rows
    renormalized; it measures the actual loss change the influence predicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from moa_jax.attention.fused import FusedCausalAttention, default_implementation, valid_lengths
from moa_jax.plans.rules import num_blocks
from moa_jax.profile.influence import HIGHEST, causal_weights

TILED = "tiled"  # OutputProbeAttention's CPU attention (`tiled_attention`)
TILE = 256  # query rows per tile on CPU: [N, 256, T] float32 maps stay cache-friendly


def lean_tile() -> int:
  """Query rows per tile of the lean path (its tiled pass and `tiled_attention`): 256 on CPU
  (about 1.7x faster there than 512 at T = 3072, benchmarks/README.md "Demo speed"), else 512."""
  return TILE if jax.default_backend() == "cpu" else 512


def lean_implementation(dtype) -> str:
  """The lean path's attention: 'tiled' on CPU (measured ~1.6x faster there than XLA's
  dot_product_attention for the backward pass, benchmarks/README.md "Demo speed"), else
  `moa_jax.attention.fused.default_implementation`."""
  return TILED if jax.default_backend() == "cpu" else default_implementation(dtype)


def _apply_weights(weights: jax.Array, v: jax.Array, dtype) -> jax.Array:
  """[B, K, G, T, S] weights, [B, S, K, H] values -> [B, T, N, H] in `dtype`."""
  b, kv_heads, g, t, _ = weights.shape
  out = jnp.einsum(
    "bkgts,bskh->btkgh", weights, v.astype(jnp.float32), precision=HIGHEST
  )  # [B, T, K, G, H]
  return out.reshape(b, t, kv_heads * g, v.shape[-1]).astype(dtype)


def _no_cache(cache) -> None:
  if cache is not None:
    raise ValueError("profiling attentions run on whole sequences: call the model with caches=None")


class MapProbeAttention:
  """A + probe[layer] before A @ V; records A per layer in `self.weights`."""

  def __init__(self, probes: Sequence[jax.Array]):
    """probes: one [B, K, G, T, T] float32 array per layer (zeros; differentiate against them)."""
    self.probes = probes
    self.weights: dict[int, jax.Array] = {}

  def __call__(self, layer, q, k, v, q_pos, cache):
    _no_cache(cache)
    weights = causal_weights(q, k, valid_lengths(q_pos))  # [B, K, G, T, T]
    self.weights[layer] = weights
    return _apply_weights(weights + self.probes[layer], v, q.dtype), None


def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, tile: int = TILE):
  """Causal attention of right-padded rows, one tile of query rows at a time against its causal
  key prefix (the softmax of `causal_weights`, which the influence pass recomputes).

  q [B, T, N, H], k/v [B, T, K, H], q_pos [B, T] (negative: padding) -> [B, T, N, H].
  """
  lengths = valid_lengths(q_pos)
  t = q.shape[1]
  outs = []
  for r in range(num_blocks(t, tile)):
    stop = min((r + 1) * tile, t)
    weights = causal_weights(q[:, r * tile : stop], k[:, :stop], lengths, q_offset=r * tile)
    outs.append(_apply_weights(weights, v[:, :stop], q.dtype))
  return jnp.concatenate(outs, axis=1)


class OutputProbeAttention:
  """Causal attention + probe[layer] on the output; records q, k, v per layer in `records`."""

  def __init__(
    self, probes: Sequence[jax.Array], implementation: str | None = None, padded: bool = True
  ):
    """probes: one [B, T, N, H] array per layer; implementation: 'tiled' (`tiled_attention`)
    or one of `FusedCausalAttention` (with `padded`)."""
    self.attention = (
      (lambda layer, q, k, v, q_pos, cache: (tiled_attention(q, k, v, q_pos), None))
      if implementation == TILED
      else FusedCausalAttention(implementation, padded)
    )
    self.probes = probes
    self.records: dict[int, tuple[jax.Array, ...]] = {}

  def __call__(self, layer, q, k, v, q_pos, cache):
    out, _ = self.attention(layer, q, k, v, q_pos, cache)
    self.records[layer] = (q, k, v)
    return out + self.probes[layer].astype(out.dtype), None


class BlockMaskedAttention:
  """Causal attention that drops the blocks where `keep[layer, head]` is False and renormalizes."""

  def __init__(self, keep: jax.Array, block: int):
    """keep: [L, N, NB, NB] bool per layer, query head, query block, key block."""
    self.keep = keep
    self.block = block

  def __call__(self, layer, q, k, v, q_pos, cache):
    _no_cache(cache)
    t, n = q.shape[1], q.shape[2]
    kv_heads = k.shape[2]
    blocks = jnp.arange(t) // self.block
    keep = self.keep[layer][:, blocks][:, :, blocks]  # [N, T, T]
    keep = keep.reshape(kv_heads, n // kv_heads, t, t)[None]  # [1, K, G, T, T]
    weights = causal_weights(q, k, valid_lengths(q_pos), keep=keep)  # [B, K, G, T, T]
    return _apply_weights(weights, v, q.dtype), None
