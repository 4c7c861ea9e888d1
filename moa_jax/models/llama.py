"""Llama in Flax NNX, numerically as HF transformers' LlamaForCausalLM computes it.

Parameter paths and layouts mirror the HF checkpoint exactly ('model.layers.0.self_attn.q_proj'
holds `weight` [out, in]), so checkpoint I/O is a 1:1 name map with no transposes. Attention is
delegated to a pluggable `Attention` (moa_jax/attention/base.py) that receives q, k, v after
RoPE, never K/V repeated for GQA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax.attention.base import Attention, LayerCache
from moa_jax.attention.dense import DenseAttention
from moa_jax.models.config import LlamaConfig

INIT_STD = 0.02  # HF's initializer_range


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """float32 [H/2] inverse frequencies, with 'linear' / 'llama3' scaling as HF computes them."""
  h = config.head_dim
  inv_freq = 1.0 / (
    config.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h)
  )
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling_dict
  if scaling is None:
    return inv_freq
  factor = scaling["factor"]
  if scaling["rope_type"] == "linear":
    return (inv_freq / factor).astype(np.float32)
  # 'llama3': keep high frequencies, divide low ones by `factor`, interpolate in between.
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_context = scaling["original_max_position_embeddings"]
  low_freq_wavelen = old_context / low
  high_freq_wavelen = old_context / high
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate x [B, T, heads, H] by angles positions [B, T] * inv_freq [H/2] (HF's rotate_half)."""
  freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Linear(nnx.Module):
  """y = x W^T without bias; `weight` [out, in] in the HF/PyTorch layout."""

  def __init__(self, in_features: int, out_features: int, config: LlamaConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(INIT_STD)
    self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), config.param_dtype))
    self.dtype = config.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))


class Embed(nnx.Module):
  """Token embedding `weight` [V, D]; `attend` gives float32 logits against it (tied head)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(INIT_STD)
    self.weight = nnx.Param(
      init(rngs.params(), (config.vocab_size, config.hidden_size), config.param_dtype)
    )
    self.dtype = config.dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: normalise in float32, cast to the compute dtype, then scale by `weight`."""

  def __init__(self, config: LlamaConfig):
    self.weight = nnx.Param(jnp.ones((config.hidden_size,), config.param_dtype))
    self.eps = config.rms_norm_eps
    self.dtype = config.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


class LlamaAttention(nnx.Module):
  """Projections + RoPE around the pluggable attention; GQA K/V stay at K heads."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.q_proj = Linear(d, n * h, config, rngs=rngs)
    self.k_proj = Linear(d, k * h, config, rngs=rngs)
    self.v_proj = Linear(d, k * h, config, rngs=rngs)
    self.o_proj = Linear(n * h, d, config, rngs=rngs)
    self.config = config

  def __call__(
    self, x: jax.Array, positions: jax.Array, *, layer: int, attention: Attention, cache: LayerCache
  ) -> tuple[jax.Array, LayerCache]:
    cfg = self.config
    b, t, _ = x.shape
    inv_freq = rope_inv_freq(cfg)
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, N, H]
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    out, cache = attention(layer, q, k, v, positions, cache)  # [B, T, N, H]
    return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(d, f, config, rngs=rngs)
    self.up_proj = Linear(d, f, config, rngs=rngs)
    self.down_proj = Linear(f, d, config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config)
    self.self_attn = LlamaAttention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config)
    self.mlp = LlamaMLP(config, rngs=rngs)

  def __call__(self, x, positions, *, layer, attention, cache):
    attn_out, cache = self.self_attn(
      self.input_layernorm(x), positions, layer=layer, attention=attention, cache=cache
    )
    x = x + attn_out
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
  """HF's `model.*`: embeddings, decoder layers, final norm."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.embed_tokens = Embed(config, rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config)

  def __call__(self, tokens, positions, *, attention, caches):
    x = self.embed_tokens(tokens)  # [B, T, D]
    new_caches = []
    for i, layer in enumerate(self.layers):
      x, cache = layer(
        x, positions, layer=i, attention=attention, cache=None if caches is None else caches[i]
      )
      new_caches.append(cache)
    return self.norm(x), (None if caches is None else new_caches)


class Llama(nnx.Module):
  """Llama causal LM (HF LlamaForCausalLM): `model.*` plus `lm_head` (absent when tied)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.config = config
    self.model = LlamaModel(config, rngs=rngs)
    self.lm_head = (
      None
      if config.tie_word_embeddings
      else Linear(config.hidden_size, config.vocab_size, config, rngs=rngs)
    )

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    attention: Attention | None = None,
    caches: list[LayerCache] | None = None,
  ) -> tuple[jax.Array, list[LayerCache] | None]:
    """Logits for a batch.

    Args:
      tokens: [B, T] int32 token ids.
      positions: [B, T] int32 positions from each row's first real token (negative: padding).
      attention: the attention implementation (default: DenseAttention()).
      caches: one cache per layer (from `attention.init_cache`), or None for no cache.
    Returns:
      logits [B, T, V] float32 and the updated caches (None when caches is None).
    """
    x, caches = self.hidden_states(tokens, positions, attention=attention, caches=caches)
    logits = jnp.einsum(
      "btd,vd->btv", x, self.output_embedding(), preferred_element_type=jnp.float32
    )  # [B, T, V]
    return logits, caches

  def hidden_states(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    attention: Attention | None = None,
    caches: list[LayerCache] | None = None,
  ) -> tuple[jax.Array, list[LayerCache] | None]:
    """The final normed hidden states [B, T, D] (compute dtype) and the updated caches: the
    logits without the vocabulary projection, for losses read at a few positions only."""
    attention = DenseAttention() if attention is None else attention
    return self.model(tokens, positions, attention=attention, caches=caches)

  def output_embedding(self) -> jax.Array:
    """[V, D] in the compute dtype: the lm_head, or the input embedding when tied."""
    head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
    return head[...].astype(self.config.dtype)


def count_params(config: LlamaConfig) -> int:
  """Number of parameters of a Llama with this config, from shapes only (no memory used)."""
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
