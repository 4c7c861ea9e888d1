"""Generation with a MoA plan: sparse prefill into the static per-head cache, then decode.

The reference path recomputes the whole sequence every step without any cache, with dense
attention under the rule mask (`reference_attention`), and picks the same greedy tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.generate import generate, left_pad
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama

SINK = 4
WINDOWS = np.array([[5, 40], [12, 3]])  # [L, K] per KV group: prompts are longer than 3, 5, 12
PROMPT_LENGTHS = (37, 20, 9)
NEW_TOKENS = 64


@functools.cache
def tiny_model():
  config = LlamaConfig.tiny()
  return Llama(config, rngs=nnx.Rngs(0)), config


def prompts():
  rng = np.random.default_rng(7)
  return [rng.integers(3, 256, n).tolist() for n in PROMPT_LENGTHS]


def reference_greedy(model, prompts, new_tokens, windows):
  """Greedy tokens by full recomputation (no cache) with the rule mask, one jit for all steps."""
  tokens, positions = left_pad(prompts)
  b, t = tokens.shape
  total = t + new_tokens
  buffer = np.zeros((b, total), np.int32)
  buffer[:, :t] = tokens
  pads = (positions < 0).sum(1)
  attention = MoAAttention(windows, sink=SINK, impl="reference")
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_token(buffer, length):  # tokens at indices < length are real (after the padding)
    idx = jnp.arange(total)[None]
    pos = jnp.where((idx >= pads[:, None]) & (idx < length), idx - pads[:, None], -1)
    logits, _ = nnx.merge(graphdef, state)(buffer, pos, attention=attention)
    return jnp.argmax(logits[:, length - 1], axis=-1).astype(jnp.int32)

  for i in range(new_tokens):
    buffer[:, t + i] = np.asarray(next_token(buffer, t + i))
  return buffer[:, t:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_moa_greedy_matches_reference(impl):
  model, _ = tiny_model()
  attention = MoAAttention(WINDOWS, sink=SINK, impl=impl, interpret=True, slot_multiple=16)
  got = generate(model, prompts(), NEW_TOKENS, attention=attention, eos_id=())
  assert got == reference_greedy(model, prompts(), NEW_TOKENS, WINDOWS)


@pytest.mark.slow
def test_moa_with_dense_windows_samples_like_dense():
  """Windows covering the whole request make MoA dense: same sampled tokens as DenseAttention."""
  model, config = tiny_model()
  dense_windows = np.full((config.num_layers, config.num_kv_heads), 10_000)
  kwargs = dict(temperature=0.8, top_k=50, rng=jax.random.key(3), eos_id=())
  got = generate(model, prompts(), 16, attention=MoAAttention(dense_windows, sink=SINK), **kwargs)
  assert got == generate(model, prompts(), 16, attention=DenseAttention(), **kwargs)


def test_moa_cache_memory_is_kv_density():
  model, config = tiny_model()
  attention = MoAAttention(WINDOWS, sink=SINK, slot_multiple=1)
  n = 200
  caches = attention.init_cache(config, 2, n)
  slots = sum(k.shape[1] * k.shape[2] for cache in caches for k in cache.k)
  expected = np.minimum(SINK + WINDOWS, n).sum()  # sink + window per KV head, every layer
  assert slots == expected
  assert attention.memory_ratio(config, n) == pytest.approx(expected / (WINDOWS.size * n))


def test_moa_windows_from_a_function_of_the_planned_length():
  """Windows given as a function of n (like Plan.windows) are fixed at the planned length."""
  _, config = tiny_model()
  attention = MoAAttention(
    lambda n: np.full((config.num_layers, config.num_heads), n // 4), sink=SINK, slot_multiple=1
  )
  caches = attention.init_cache(config, 1, 400)
  assert all(cache.layout.windows == (100,) * config.num_heads for cache in caches)
  assert caches[0].k[0].shape == (1, config.num_kv_heads, SINK + 100, config.head_dim)
  with pytest.raises(ValueError, match="do not fit"):
    MoAAttention(np.ones((2, 3), int)).layouts(config, 10)
