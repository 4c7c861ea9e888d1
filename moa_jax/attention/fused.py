"""Fused dense causal attention (cuDNN flash attention on GPU, XLA elsewhere), without a cache.

The `Attention` plug for whole sequences that start at position 0: training, and the
profiler's backward pass (`moa_jax.profile.probes`). Rows may end in right padding (positions
< 0 after the valid tokens); generation, which pads on the left and keeps a KV cache, uses
`moa_jax.attention.dense.DenseAttention` instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("cudnn", "xla", None)


def default_implementation(dtype) -> str:
  """'cudnn' on a GPU for bf16/f16 compute (cuDNN's flash attention), else 'xla'."""
  gpu = jax.default_backend() == "gpu"
  return "cudnn" if gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def valid_lengths(q_pos: jax.Array) -> jax.Array:
  """[B, T] positions (negative: padding after the valid tokens) -> [B] int32 lengths."""
  return jnp.sum(q_pos >= 0, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class FusedCausalAttention:
  """softmax(q k^T / sqrt(H)) v causally with GQA by `jax.nn.dot_product_attention`, no cache.

  implementation: 'cudnn' (GPU, bf16/f16), 'xla' or None (XLA picks).
  padded: True when rows may end in right padding (q_pos < 0): the valid lengths are passed on;
    False promises unpadded rows with positions 0..T-1 (plain causal attention).
  """

  implementation: str | None = None
  padded: bool = False

  def __post_init__(self):
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"unknown fused attention implementation {self.implementation!r}; "
        f"choose one of {IMPLEMENTATIONS}"
      )

  def __call__(
    self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, cache: None
  ) -> tuple[jax.Array, None]:
    """q [B, T, N, H], k/v [B, T, K, H], q_pos [B, T] -> ([B, T, N, H], None)."""
    del layer
    if cache is not None:
      raise ValueError(
        "FusedCausalAttention attends within one call of whole sequences: it "
        "takes no KV cache (call the model with caches=None)"
      )
    if self.implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"cuDNN attention needs bf16/f16 inputs, got {q.dtype}: set dtype=bfloat16")
    lengths = valid_lengths(q_pos) if self.padded else None
    out = jax.nn.dot_product_attention(
      q,
      k,
      v,
      is_causal=True,
      query_seq_lengths=lengths,
      key_value_seq_lengths=lengths,
      implementation=self.implementation,
    )
    return out.astype(q.dtype), None
