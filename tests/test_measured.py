"""Measured losses with the dense prefix reused equal a full masked forward pass."""

import zlib

import numpy as np
import pytest
from flax import nnx

from moa_jax.calibration.build import CalibrationBucket, CalibrationSet
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama
from moa_jax.optimize import measured
from moa_jax.pipeline import validation_loss

T, SINK = 192, 16


@pytest.fixture(scope="module")
def setup():
  config = LlamaConfig.tiny(num_layers=3, max_position_embeddings=T)
  model = Llama(config, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(7)
  lengths = np.array([T, T - 40], np.int32)
  tokens = rng.integers(3, config.vocab_size, (2, T)).astype(np.int32)
  loss_mask = np.zeros((2, T), bool)
  for row, n in enumerate(lengths):
    tokens[row, n:] = 0
    loss_mask[row, n - 9 : n] = True
  bucket = CalibrationBucket(tokens, loss_mask, lengths)
  return model, bucket, measured.dense_trace(model, bucket)


def _full(model, bucket, windows):
  """Per-sample losses by the pipeline's full masked forward pass."""
  out = []
  for row in range(bucket.num_samples):
    one = CalibrationBucket(
      bucket.tokens[row : row + 1], bucket.loss_mask[row : row + 1], bucket.lengths[row : row + 1]
    )
    out.append(validation_loss(model, CalibrationSet({T: one}, {}), windows, SINK))
  return np.array(out)


def test_dense_trace_matches_dense_loss(setup):
  model, bucket, trace = setup
  dense = np.full((3, 4), 10 * T)
  np.testing.assert_allclose(trace.dense, _full(model, bucket, dense), rtol=1e-5)
  np.testing.assert_allclose(measured.masked_losses(model, trace, dense, SINK), trace.dense)


@pytest.mark.parametrize("case", ["one_head_late_layer", "one_group_first_layer", "random"])
def test_masked_losses_match_full_forward(setup, case):
  model, bucket, trace = setup
  rng = np.random.default_rng(zlib.crc32(case.encode()))
  windows = np.full((3, 4), T)
  if case == "one_head_late_layer":
    windows[2, 3] = 70  # first changed row 86: rows 64.. recomputed from layer 2
  elif case == "one_group_first_layer":
    windows[0, :2] = 20
  else:
    windows = rng.integers(1, T, (3, 4))
  got = measured.masked_losses(model, trace, windows, SINK)
  want = _full(model, bucket, windows)
  assert not np.allclose(want, trace.dense)  # the mask changes the loss
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_bad_windows(setup):
  model, _, trace = setup
  with pytest.raises(ValueError, match="windows must be"):
    measured.masked_losses(model, trace, np.full((2, 4), T), SINK)
  with pytest.raises(ValueError, match="at least one token"):
    measured.masked_losses(model, trace, np.zeros((3, 4), int), SINK)
