"""Brute-force checks of moa_jax/plans/rules.py: every derived quantity against the N x N mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.plans import rules


def _dense_mask(window: int, sink: int, n: int) -> np.ndarray:
  """[n, n] bool: the token-exact rule mask over positions 0..n-1, from `attend_mask`."""
  pos = np.arange(n)
  return rules.attend_mask(pos[:, None], pos[None, :], sink, window)


def _brute_layout(window: int, sink: int, n: int, block: int) -> np.ndarray:
  """[NB, NB] layout from the dense mask: SKIP if no entry is attended, FULL if every entry of an
  off-diagonal block is attended, PARTIAL otherwise (diagonal blocks are always masked)."""
  mask = _dense_mask(window, sink, n)
  nb = rules.num_blocks(n, block)
  layout = np.empty((nb, nb), np.int8)
  for r in range(nb):
    for c in range(nb):
      tile = mask[r * block : (r + 1) * block, c * block : (c + 1) * block]
      if not tile.any():
        layout[r, c] = rules.SKIP
      elif tile.all() and r > c:
        layout[r, c] = rules.FULL
      else:
        layout[r, c] = rules.PARTIAL
  return layout


def _random_cases(rng: np.random.Generator, count: int):
  """(window, sink, n, block) tuples: n below, at and off a block multiple; windows 0..n+extra."""
  for _ in range(count):
    block = int(rng.choice([4, 8, 16]))
    n = int(rng.choice([1, block - 1, block, 3 * block, 5 * block + int(rng.integers(1, block))]))
    n = max(n, 1)
    sink = int(rng.choice([0, 1, block // 2, block, block + 3, n + 5]))
    window = int(rng.integers(0, n + 2 * block))
    yield window, sink, n, block


def test_attend_mask_matches_definition():
  rng = np.random.default_rng(0)
  q = rng.integers(-3, 40, size=500)
  k = rng.integers(-3, 40, size=500)
  sink, window = 5, 7
  expected = [(0 <= kk <= qq) and (kk < sink or qq - kk < window) for qq, kk in zip(q, k)]
  np.testing.assert_array_equal(rules.attend_mask(q, k, sink, window), expected)


def test_block_layout_matches_brute_force():
  rng = np.random.default_rng(1)
  for window, sink, n, block in _random_cases(rng, 300):
    got = rules.block_layout(window, sink, n, block)
    np.testing.assert_array_equal(
      got, _brute_layout(window, sink, n, block), err_msg=f"w={window} s={sink} n={n} b={block}"
    )


def test_block_layout_broadcasts_over_heads():
  rng = np.random.default_rng(2)
  n, block, sink = 83, 8, 10
  windows = rng.integers(1, n + 1, size=(3, 5))
  got = rules.block_layout(windows, sink, n, block)
  assert got.shape == (3, 5, 11, 11)
  for index in np.ndindex(windows.shape):
    np.testing.assert_array_equal(got[index], _brute_layout(int(windows[index]), sink, n, block))


def test_attended_pairs_and_densities_match_brute_force():
  rng = np.random.default_rng(3)
  for window, sink, n, _ in _random_cases(rng, 300):
    mask = _dense_mask(window, sink, n)
    assert rules.attended_pairs(window, sink, n) == mask.sum()
    # The decode cache must hold every key the last query attends: sink plus ring buffer.
    assert rules.cached_tokens(window, sink, n) == mask[n - 1].sum()
  n, sink = 77, 6
  windows = rng.integers(1, n + 1, size=(4, 3))
  masks = np.stack([_dense_mask(int(w), sink, n) for w in windows.ravel()])
  expected_attention = masks.sum() / windows.size / (n * (n + 1) / 2)
  expected_kv = masks[:, n - 1].sum() / windows.size / n
  assert rules.attention_density(windows, sink, n) == pytest.approx(expected_attention, rel=1e-12)
  assert rules.kv_density(windows, sink, n) == pytest.approx(expected_kv, rel=1e-12)


def test_window_size_clamps_to_block_and_length():
  n = 1000
  assert rules.window_size(-5000, 0.5, n) == 64  # negative raw window: one block minimum
  assert rules.window_size(100, 2.0, n) == n  # beyond the length: the whole sequence
  assert rules.window_size(0, 0.29, 100, block=8) == 29  # floor must not lose 29 to rounding
  assert rules.window_size(-10, 0.5, 40) == 40  # n < block: the minimum is n itself
  assert rules.window_size(10, 0.5, 1000) == 510
  windows = rules.window_size(np.array([[-1024.0], [0.0]]), np.array([0.5, 1.0]), 4096)
  np.testing.assert_array_equal(windows, [[1024, 3072], [2048, 4096]])
  assert rules.ElasticRule(1024.0, 0.0).window(512) == 512
  with pytest.raises(ValueError, match="positive"):
    rules.window_size(0, 1.0, 0)


def test_candidate_rules_paper_grid():
  profile, constraint = (2048, 4096, 8192), (2048, 4096, 8192, 16384)
  grid = rules.candidate_rules(profile, constraint)
  assert len(grid) == 48
  assert len(set(grid)) == 48
  assert rules.ElasticRule(0.0, 0.0) not in grid
  for rule in grid:
    assert rule.alpha + rule.beta * 2048 > 0
    assert rule.alpha + rule.beta * 8192 <= 8192
    assert rule.alpha in np.arange(-2048, 8193, 1024)
    assert rule.beta * 8 == int(rule.beta * 8)
  assert rules.ElasticRule(-1024.0, 1.0) in grid and rules.ElasticRule(8192.0, 0.0) in grid
  coarse = rules.candidate_rules(profile, constraint, alpha_step=2048, betas=(0.0, 0.5, 1.0))
  assert set(coarse) < set(grid)
  with pytest.raises(ValueError, match="at least one"):
    rules.candidate_rules([], constraint)


def test_expand_to_query_heads_gqa_order():
  per_group = np.array([[1, 2], [3, 4]])
  expected = [[1, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4]]
  np.testing.assert_array_equal(rules.expand_to_query_heads(per_group, 6), expected)
  np.testing.assert_array_equal(rules.expand_to_query_heads(jnp.asarray(per_group), 6), expected)
  np.testing.assert_array_equal(rules.expand_to_query_heads((5, 6), 4), [5, 5, 6, 6])
  assert rules.expand_to_query_heads(per_group, 2) is per_group  # already per query head
  with pytest.raises(ValueError, match="groups"):
    rules.expand_to_query_heads(per_group, 5)


@pytest.mark.parametrize("sink,block", [(64, 64), (0, 32), (100, 32)])
def test_key_block_ranges_are_the_rule_layout(sink, block):
  """Without padding, with tiles of one block: the key blocks a tile visits (sink, then window)
  are exactly the non-SKIP blocks of the layout for the tile's largest window; interior
  (unmasked) blocks are FULL for every window of the tile, and every FULL block past the sink
  is interior."""
  n, rng = 700, np.random.default_rng(sink + block)
  windows = np.sort(rng.integers(1, n + 10, (5, 3)), axis=-1)  # [K, G]: one tile per group
  nb = rules.num_blocks(n, block)
  t0 = np.arange(nb) * block
  ranges = rules.key_block_ranges(
    0,
    t0[None],
    np.minimum(t0 + block - 1, n - 1)[None],
    windows.min(-1)[:, None],
    windows.max(-1)[:, None],
    sink=sink,
    block_k=block,
  )
  sink_lo, sink_hi, lo, f0, f1, hi = (np.broadcast_to(x, (len(windows), nb)) for x in ranges)
  layout = rules.block_layout(windows, sink, n, block)  # [K, G, NB, NB]
  for g in range(windows.shape[0]):
    for r in range(nb):
      visited = [*range(sink_lo[g, r], sink_hi[g, r]), *range(lo[g, r], hi[g, r])]
      assert len(set(visited)) == len(visited)
      assert set(visited) == set(np.flatnonzero(layout[g, -1, r] != rules.SKIP))
      interior = set(range(f0[g, r], f1[g, r]))
      all_full = set(np.flatnonzero((layout[g, :, r] == rules.FULL).all(0)))
      assert interior <= all_full
      assert {c for c in all_full if c * block >= sink} <= interior


def test_key_block_ranges_skip_padding():
  """A tile of pure left padding visits nothing; a later tile starts at the first real token."""
  ranges = rules.key_block_ranges(
    jnp.int32(300), jnp.int32(0), jnp.int32(127), 50, 50, sink=64, block_k=64
  )
  sink_lo, sink_hi, lo, f0, f1, hi = (int(x) for x in ranges)
  assert sink_hi - sink_lo == 0 and hi - lo == 0
  ranges = rules.key_block_ranges(
    jnp.int32(300), jnp.int32(1024), jnp.int32(1151), 2000, 2000, sink=64, block_k=64
  )
  sink_lo, sink_hi, lo, f0, f1, hi = (int(x) for x in ranges)
  assert (lo, hi, f0, f1) == (300 // 64, 1151 // 64 + 1, 5, 16)
  assert sink_hi == sink_lo  # the window already covers the sink
