"""The at-plan window deltas equal dO . (O(w') - O(w)) computed head by head, brute force."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.attention.reference import reference_attention
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama
from moa_jax.profile import at_plan
from moa_jax.profile.profiler import response_targets

T, SINK = 160, 8


@pytest.fixture(scope="module")
def setup():
  config = LlamaConfig.tiny(num_layers=2, num_heads=6, num_kv_heads=2, max_position_embeddings=T)
  model = Llama(config, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(11)
  lengths = np.array([T, T - 37], np.int32)
  tokens = rng.integers(3, config.vocab_size, (2, T)).astype(np.int32)
  loss_mask = np.zeros((2, T), bool)
  for row, n in enumerate(lengths):
    tokens[row, n:] = 0
    loss_mask[row, n - 12 : n] = True
  return model, CalibrationBucket(tokens, loss_mask, lengths)


def _brute_force(model, bucket, windows, candidates, loss):
  """[S, L, N, C] by reference attention with one head's window changed at a time."""
  graphdef, state = nnx.split(model)
  config = model.config
  out = np.zeros((bucket.num_samples, config.num_layers, config.num_heads, len(candidates)))
  for row in range(bucket.num_samples):
    hidden_index, weight = response_targets(bucket.loss_mask[row : row + 1])
    pos = jnp.asarray(bucket.positions()[row : row + 1])
    d_outs, records = at_plan._plan_grads(
      graphdef,
      state,
      jnp.asarray(bucket.tokens[row : row + 1]),
      pos,
      jnp.asarray(hidden_index),
      jnp.asarray(weight),
      jnp.asarray(windows),
      sink=SINK,
      loss=loss,
    )
    for layer in range(config.num_layers):
      q, k, v = records[layer]
      base = reference_attention(q, k, v, pos, pos, windows=windows[layer], sink=SINK)
      for head in range(config.num_heads):
        for c, w in enumerate(candidates):
          changed = windows[layer].copy()
          changed[head] = w
          new = reference_attention(q, k, v, pos, pos, windows=changed, sink=SINK)
          delta = (new - base)[0, :, head]  # [T, H]
          out[row, layer, head, c] = float(jnp.sum(d_outs[layer][0, :, head] * delta))
  return out


@pytest.mark.parametrize("loss", ["nll", "log_odds"])
def test_window_deltas_match_brute_force(setup, loss):
  model, bucket = setup
  rng = np.random.default_rng(3)
  windows = rng.integers(1, T + 20, (2, 6)).astype(np.int32)  # some beyond T: dense heads
  windows[0, 0] = T
  candidates = np.array([1, 5, 40, 64, 100, T], np.int32)
  got = at_plan.window_deltas(model, bucket, windows, candidates, sink=SINK, loss=loss, tile=64)
  want = _brute_force(model, bucket, np.minimum(windows, T), candidates, loss)
  assert np.abs(want).max() > 1e-4  # the changes move the loss
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-6 * np.abs(want).max())
  same = candidates[None, None, :] == np.minimum(windows, T)[..., None]  # [L, N, C]
  np.testing.assert_array_equal(got[:, same], 0.0)  # moving to its own window changes nothing


def test_bad_inputs(setup):
  model, bucket = setup
  with pytest.raises(ValueError, match="windows must be"):
    at_plan.window_deltas(model, bucket, np.full((3, 6), T), [10])
  with pytest.raises(ValueError, match="candidates"):
    at_plan.window_deltas(model, bucket, np.full((2, 6), T), [])
  with pytest.raises(ValueError, match="unknown profile loss"):
    at_plan.window_deltas(model, bucket, np.full((2, 6), T), [10], loss="mse")
