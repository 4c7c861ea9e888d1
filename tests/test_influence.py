"""Attention influence: hand-checked entries, brute-force masking, the direct vs the lean path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.profile.influence import (block_influence_from_grads, block_influence_tiled,
                                       causal_weights, influence_entries, pool_blocks)
from moa_jax.profile.probes import valid_lengths


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_hand_checked_two_tokens():
  # Row 0: A = [1, 0], nothing to renormalize: E_00 = -G_00 A_00 = -3.
  # Row 1: A = [1/4, 3/4], G = [1, 2], sum_n G_n A_n = 7/4:
  #   E_10 = -(1/4)(1 - 7/4)/(3/4) = 1/4;  E_11 = -(3/4)(2 - 7/4)/(1/4) = -3/4.
  weights = jnp.array([[1.0, 0.0], [0.25, 0.75]])
  grads = jnp.array([[3.0, 5.0], [1.0, 2.0]])
  np.testing.assert_allclose(influence_entries(weights, grads),
                             [[-3.0, 0.0], [0.25, -0.75]], rtol=1e-6)
  pooled = block_influence_from_grads(weights[None, None, None], grads[None, None, None], block=2)
  np.testing.assert_allclose(pooled, [[[[3.0 + 0.25 + 0.75]]]], rtol=1e-6)


def test_entries_equal_masking_for_a_linear_loss():
  """For L = sum G * A the first-order change is exact: compare with masking each entry."""
  t = 7
  rng = np.random.default_rng(0)
  logits = np.where(np.tril(np.ones((t, t), bool)), rng.normal(size=(t, t)) * 2, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  grads = rng.normal(size=(t, t))
  entries = np.asarray(influence_entries(jnp.asarray(weights, jnp.float32),
                                         jnp.asarray(grads, jnp.float32)))
  for i in range(1, t):
    for j in range(i + 1):
      masked = weights[i].copy()
      masked[j] = 0.0
      masked /= masked.sum()
      assert entries[i, j] == pytest.approx(grads[i] @ masked - grads[i] @ weights[i], rel=1e-4,
                                            abs=1e-5)
  assert entries[0, 0] == pytest.approx(-grads[0, 0])
  assert np.all(entries[np.triu_indices(t, 1)] == 0.0)


def test_pool_blocks_matches_loop():
  x = jax.random.normal(jax.random.key(1), (2, 11, 13))
  pooled = np.asarray(pool_blocks(x, 4))
  expected = np.zeros((2, 3, 4))
  for r in range(11):
    for c in range(13):
      expected[:, r // 4, c // 4] += np.asarray(x[:, r, c])
  np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)


def _attention_problem(seed: int, b=2, t=40, n=4, kv_heads=2, h=16):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, n, h)) * 1.5
  k = jax.random.normal(keys[1], (b, t, kv_heads, h)) * 1.5
  v = jax.random.normal(keys[2], (b, t, kv_heads, h))
  readout = jax.random.normal(keys[3], (b, t, n, h))
  lengths = jnp.array([t, t - 11][:b], jnp.int32)
  q_pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
  return q, k, v, readout, q_pos


def _downstream_loss(out, readout):
  return jnp.sum(readout * jnp.tanh(out)) + 0.3 * jnp.sum(out ** 2)


@pytest.mark.parametrize("block,tile", [(8, 16), (4, 12), (8, 64)])
def test_direct_and_tiled_paths_agree(block, tile):
  q, k, v, readout, q_pos = _attention_problem(seed=block + tile)
  b, t, n, h = q.shape
  lengths = valid_lengths(q_pos)

  weights = causal_weights(q, k, lengths)  # [B, K, G, T, T]

  def map_loss(probe):
    mixed = jnp.einsum("bkgts,bskh->btkgh", weights + probe, v, precision="highest")
    return _downstream_loss(mixed.reshape(b, t, n, h), readout)

  grads = jax.grad(map_loss)(jnp.zeros_like(weights))
  direct = block_influence_from_grads(weights, grads, block)

  def out_loss(probe):
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths)
    return _downstream_loss(out + probe, readout)

  out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths)
  d_out = jax.grad(out_loss)(jnp.zeros_like(q))
  lean = block_influence_tiled(q, k, v, d_out, lengths, block=block, tile=tile)

  nb = -(-t // block)
  assert direct.shape == lean.shape == (b, n, nb, nb)
  assert relative_error(lean, direct) < 1e-4
  upper = np.triu_indices(nb, 1)
  assert np.all(np.asarray(direct)[..., upper[0], upper[1]] == 0)
  # The padded sample's blocks past its length are empty; its real blocks are not.
  first_pad_block = -(-int(lengths[1]) // block)
  assert np.all(np.asarray(lean)[1, :, first_pad_block:] == 0)
  assert np.all(np.asarray(lean)[1, :, :first_pad_block].sum(-1) > 0)
