"""Refinement of a plan on a tiny random model: measured loss never rises, the band holds."""

import numpy as np
import pytest
from flax import nnx

from moa_jax.calibration.build import CalibrationBucket
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama
from moa_jax.optimize import measured, refine
from moa_jax.plans import rules as rules_lib
from moa_jax.plans.plan import dense_plan, uniform_plan

T, SINK, BLOCK = 256, 16, 16


def _bucket(seed, config, rows=2):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, config.vocab_size, (rows, T)).astype(np.int32)
  # Copy a span from early in the sequence to the response, so that far keys matter.
  tokens[:, -16:] = tokens[:, 20:36]
  loss_mask = np.zeros((rows, T), bool)
  loss_mask[:, -16:] = True
  return CalibrationBucket(tokens, loss_mask, np.full(rows, T, np.int32))


@pytest.fixture(scope="module")
def setup():
  config = LlamaConfig.tiny(num_layers=2, max_position_embeddings=2 * T)
  return Llama(config, rngs=nnx.Rngs(1)), config


def test_refine_never_raises_the_measured_loss(setup):
  model, config = setup
  options = refine.RefineOptions(
    rounds=2, penalties=(0.0, 0.5), budget=0.5, constraint_lengths=(T, 2 * T)
  )
  start = uniform_plan(config, 0.5, T, sink=SINK, block=BLOCK)
  rules = rules_lib.candidate_rules([T], [T, 2 * T], alpha_step=64)
  validation = [measured.dense_trace(model, _bucket(1, config))]
  plan, history = refine.refine_plan(
    model,
    start,
    rules,
    {T: [refine.Linearization(_bucket(0, config), fisher_draws=2)]},
    validation,
    options,
    log=lambda _: None,
  )
  scores = [row["measured"] for row in history if row["accepted"]]
  assert scores == sorted(scores, reverse=True)  # each accepted step lowers the loss
  assert refine.validation_score(model, plan, validation) == pytest.approx(scores[-1])
  assert len(history) >= 2  # at least one candidate was measured
  for n in (T, 2 * T):
    assert 0.45 - 1e-9 <= plan.kv_density(n) <= 0.5 + 1e-9
  assert plan.provenance["refine"] == history


def test_refine_rejects_bad_input(setup):
  model, config = setup
  rules = rules_lib.candidate_rules([T], [T, 2 * T], alpha_step=64)
  with pytest.raises(ValueError, match="calibration buckets and validation"):
    refine.refine_plan(model, dense_plan(config), rules, {}, [])
  with pytest.raises(ValueError, match="rounds >= 1"):
    refine.RefineOptions(rounds=0)
  with pytest.raises(ValueError, match="first-order term or fisher_draws"):
    refine.Linearization(_bucket(0, config), first_order=False)
