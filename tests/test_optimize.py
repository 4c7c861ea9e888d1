"""Tests of moa_jax/optimize: dL against brute-force masks, the MILP against enumeration, the
Pareto front and the validation choice."""

import numpy as np
import pytest

from moa_jax.optimize import loss_delta as loss_delta_lib
from moa_jax.plans import rules as rules_lib


def _brute_loss_delta(e_bar, rules, n, sink, block):
  """[L, H, R] from one N x N mask per rule built with `attend_mask`: sum of (1 - kept fraction of
  the block's causal entries) * E_bar over the causal blocks."""
  pos = np.arange(n)
  causal = rules_lib.attend_mask(pos[:, None], pos[None, :], 0, n + 1)
  nb = rules_lib.num_blocks(n, block)
  out = np.zeros(e_bar.shape[:2] + (len(rules),))
  for i, rule in enumerate(rules):
    mask = rules_lib.attend_mask(pos[:, None], pos[None, :], sink, rule.window(n, block))
    for r in range(nb):
      for c in range(r + 1):
        rows, cols = slice(r * block, (r + 1) * block), slice(c * block, (c + 1) * block)
        keep = mask[rows, cols].sum() / causal[rows, cols].sum()
        out[..., i] += (1 - keep) * e_bar[..., r, c]
  return out


@pytest.mark.parametrize("n,block,sink", [
    (96, 8, 8), (101, 8, 5), (64, 16, 0), (77, 16, 40), (6, 8, 3), (40, 8, 100)])
def test_loss_delta_matches_brute_force(n, block, sink):
  rng = np.random.default_rng(n + block + sink)
  nb = rules_lib.num_blocks(n, block)
  e_bar = rng.exponential(size=(2, 3, nb, nb))
  rules = [rules_lib.ElasticRule(float(a), float(b))
           for a, b in zip(rng.integers(-n, n, 12), rng.choice(np.arange(9) / 8, 12))]
  rules += [rules_lib.ElasticRule(0.0, 1.0), rules_lib.ElasticRule(-10.0 * n, 0.0)]
  got = loss_delta_lib.loss_delta(e_bar, rules, n, sink, block)
  np.testing.assert_allclose(got, _brute_loss_delta(e_bar, rules, n, sink, block), rtol=1e-10)
  assert np.all(got[..., -2] < 1e-12)  # the dense rule drops nothing


def test_loss_delta_rejects_bad_input():
  e_bar = np.ones((1, 1, 4, 4))
  rule = [rules_lib.ElasticRule(0.0, 0.5)]
  with pytest.raises(ValueError, match="shape"):
    loss_delta_lib.loss_delta(e_bar, rule, 300, 64, 64)
  with pytest.raises(ValueError, match="NaN"):
    loss_delta_lib.loss_delta(np.full((1, 1, 4, 4), np.nan), rule, 256, 64, 64)
