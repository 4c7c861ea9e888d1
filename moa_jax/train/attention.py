"""Training-only attention: fused causal attention (cuDNN flash attention on GPU, XLA elsewhere).

Training rows start at position 0 and are never padded on the left, so plain causal attention
over the call's own tokens is exactly the dense attention the model is evaluated with; it is
never used with a KV cache (generation uses `moa_jax.attention.dense.DenseAttention`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def default_implementation() -> str | None:
  """'cudnn' on a GPU backend (bf16/f16 inputs), else None (XLA picks its own kernel)."""
  return "cudnn" if jax.default_backend() == "gpu" else None


@dataclasses.dataclass(frozen=True)
class FusedCausalAttention:
  """`Attention` plug computing softmax(q k^T / sqrt(H)) v causally with GQA, no cache.

  implementation: passed to `jax.nn.dot_product_attention` ('cudnn', 'xla' or None).
  """

  implementation: str | None = None

  def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
               cache: None) -> tuple[jax.Array, None]:
    """q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]; positions must be 0..T-1 per row."""
    del layer, q_pos
    if cache is not None:
      raise ValueError("FusedCausalAttention is for training only: it takes no KV cache")
    if self.implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"cuDNN attention needs bf16/f16 inputs, got {q.dtype}: set dtype=bfloat16")
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=self.implementation)
    return out.astype(q.dtype), None
