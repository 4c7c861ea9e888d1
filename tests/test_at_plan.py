"""The at-plan window deltas equal dO . (O(w') - O(w)) computed head by head, brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.attention.reference import reference_attention
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama
from moa_jax.profile import at_plan
from moa_jax.profile.profiler import response_loss, response_targets

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
  config = model.config
  out = np.zeros((bucket.num_samples, config.num_layers, config.num_heads, len(candidates)))
  for row in range(bucket.num_samples):
    hidden_index, weight = response_targets(bucket.loss_mask[row : row + 1])
    pos = jnp.asarray(bucket.positions()[row : row + 1])
    grads = at_plan.plan_gradients(
      model,
      jnp.asarray(bucket.tokens[row : row + 1]),
      pos,
      jnp.asarray(hidden_index),
      jnp.asarray(weight),
      jnp.asarray(windows),
      sink=SINK,
      loss=loss,
    )
    for layer in range(config.num_layers):
      d_out, q, k, v = grads[layer]
      base = reference_attention(q, k, v, pos, pos, windows=windows[layer], sink=SINK)
      for head in range(config.num_heads):
        for c, w in enumerate(candidates):
          changed = windows[layer].copy()
          changed[head] = w
          new = reference_attention(q, k, v, pos, pos, windows=changed, sink=SINK)
          delta = (new - base)[0, :, head]  # [T, H]
          out[row, layer, head, c] = float(jnp.sum(d_out[0, :, head] * delta))
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


class _Probed:
  """Windowed attention with an additive probe on every layer's output (full-model autodiff)."""

  def __init__(self, probes, windows):
    self.probes, self.windows = probes, windows

  def __call__(self, layer, q, k, v, q_pos, cache):
    out = reference_attention(q, k, v, q_pos, q_pos, windows=self.windows[layer], sink=SINK)
    return out + self.probes[layer], None


@pytest.mark.parametrize("loss", ["nll", "log_odds"])
def test_plan_gradients_match_full_autodiff(setup, loss):
  model, bucket = setup
  windows = jnp.asarray(np.random.default_rng(4).integers(1, T, (2, 6)), jnp.int32)
  hidden_index, weight = response_targets(bucket.loss_mask)
  tokens, pos = jnp.asarray(bucket.tokens), jnp.asarray(bucket.positions())
  zeros = [jnp.zeros((2, T, 6, 16)) for _ in range(2)]
  want = jax.grad(
    lambda p: response_loss(
      model, tokens, pos, jnp.asarray(hidden_index), jnp.asarray(weight), _Probed(p, windows), loss
    )
  )(zeros)
  got = at_plan.plan_gradients(
    model,
    tokens,
    pos,
    jnp.asarray(hidden_index),
    jnp.asarray(weight),
    windows,
    sink=SINK,
    loss=loss,
  )
  for layer in range(2):
    assert float(jnp.abs(want[layer]).max()) > 0
    np.testing.assert_allclose(
      got[layer][0], want[layer], rtol=1e-4, atol=1e-6 * float(jnp.abs(want[layer]).max())
    )


def test_bad_inputs(setup):
  model, bucket = setup
  with pytest.raises(ValueError, match="windows must be"):
    at_plan.window_deltas(model, bucket, np.full((3, 6), T), [10])
  with pytest.raises(ValueError, match="candidates"):
    at_plan.window_deltas(model, bucket, np.full((2, 6), T), [])
  with pytest.raises(ValueError, match="unknown profile loss"):
    at_plan.window_deltas(model, bucket, np.full((2, 6), T), [10], loss="mse")


@pytest.mark.slow
def test_fisher_term_estimates_the_expected_kl(setup):
  """The second-order term's expectation: 1/2 sum_t w_t Var_{y ~ p_t}(dz_t[y]) for the logit
  change dz = J dO of one head's output change dO (from jax.jvp), estimated with many draws."""
  model, bucket = setup
  bucket = CalibrationBucket(bucket.tokens[:1], bucket.loss_mask[:1], bucket.lengths[:1])
  windows = np.full((2, 6), 50, np.int32)
  candidates = np.array([10, T, 50], np.int32)  # 50: every head's own window
  first, second = at_plan.window_deltas(
    model, bucket, windows, candidates, sink=SINK, fisher_draws=384, seed=0, components=True
  )
  assert np.all(second >= 0) and np.abs(first).max() > 0
  hidden_index, weight = response_targets(bucket.loss_mask)
  tokens, pos = jnp.asarray(bucket.tokens), jnp.asarray(bucket.positions())
  zeros = [jnp.zeros((1, T, 6, 16)) for _ in range(2)]
  grads = at_plan.plan_gradients(
    model,
    tokens,
    pos,
    jnp.asarray(hidden_index),
    jnp.asarray(weight),
    jnp.asarray(windows),
    sink=SINK,
  )

  def logits(probes):
    out, _ = model(tokens, pos, attention=_Probed(probes, jnp.asarray(windows)))
    return jnp.take_along_axis(out, jnp.asarray(hidden_index)[..., None], axis=1)[0]  # [R, V]

  for layer, head, c in [(0, 1, 0), (1, 4, 1), (1, 0, 0)]:
    _, q, k, v = grads[layer]
    changed = windows[layer].copy()
    changed[head] = candidates[c]
    delta = reference_attention(
      q, k, v, pos, pos, windows=changed, sink=SINK
    ) - reference_attention(q, k, v, pos, pos, windows=windows[layer], sink=SINK)
    tangent = [jnp.zeros_like(z) for z in zeros]
    tangent[layer] = tangent[layer].at[:, :, head].set(delta[:, :, head])
    z, dz = jax.jvp(logits, (zeros,), (tangent,))
    p = jax.nn.softmax(z, -1)
    variance = jnp.sum(p * dz**2, -1) - jnp.sum(p * dz, -1) ** 2  # [R]
    exact = 0.5 * float(jnp.sum(jnp.asarray(weight[0]) * variance))
    assert exact > 0
    np.testing.assert_allclose(second[0, layer, head, c], exact, rtol=0.25)
  np.testing.assert_array_equal(first[..., 2], 0.0)
  np.testing.assert_array_equal(second[..., 2], 0.0)
