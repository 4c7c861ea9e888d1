"""The static per-head MoA cache and decode attention against the dense reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.attention import cache as cache_lib
from moa_jax.attention import decode as decode_lib
from moa_jax.attention import dispatch
from moa_jax.attention.reference import reference_attention
from moa_jax.plans.rules import cached_tokens, kv_density


def test_layout_sizes_and_groups():
  windows = np.array([10, 3, 40, 40, 7, 500, 1, 2])  # [N], 4 KV groups of 2 query heads
  layout = cache_lib.make_layout(windows, 4, 100, sink=5, slot_multiple=1)
  group_windows = windows.reshape(4, 2).max(-1)  # the cache holds each group's largest window
  capacity = {h: g.capacity for g in layout.groups for h in g.heads}
  assert [capacity[h] for h in range(4)] == cached_tokens(group_windows, 5, 100).tolist()
  assert [g.capacity for g in layout.groups] == sorted({15, 45, 100, 7})
  assert layout.slots() / (4 * 100) == pytest.approx(kv_density(group_windows, 5, 100))
  rounded = cache_lib.make_layout(windows, 4, 100, sink=5, slot_multiple=16)
  assert all(g.capacity % 16 == 0 and g.ring >= 1 for g in rounded.groups)


def test_prefill_write_keeps_sink_and_last_ring_positions():
  """A prompt longer than a head's cache leaves its sink and its newest `ring` positions."""
  windows = np.array([6, 6, 30, 30])  # 2 KV groups
  layout = cache_lib.make_layout(windows, 2, 64, sink=4, slot_multiple=1)
  b, t, h = 3, 40, 8
  pads = np.array([0, 9, 33])  # real lengths 40, 31, 7
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal((b, t, 2, h)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, 2, h)), jnp.float32)
  pos = jnp.asarray(np.arange(t)[None] - pads[:, None], jnp.int32)
  cache = cache_lib.write(cache_lib.init_cache(layout, b, h, jnp.float32), k, v, pos)
  for group, ck, cv, cpos in zip(layout.groups, cache.k, cache.v, cache.pos):
    for row in range(b):
      length = t - pads[row]
      held = np.asarray(cpos[row])
      expected = set(range(min(4, length))) | set(range(max(4, length - group.ring), length))
      assert set(held[held >= 0].tolist()) == expected
      for slot in np.flatnonzero(held >= 0):  # each slot holds its position's key and value
        index = held[slot] + pads[row]
        np.testing.assert_array_equal(ck[row, :, slot], k[row, index, np.asarray(group.heads)])
        np.testing.assert_array_equal(cv[row, :, slot], v[row, index, np.asarray(group.heads)])


def run_decode(decode_fn, dtype, windows, kv, *, steps, slot_multiple, tolerance, n=8):
  """Prefill a left-padded batch into the cache, then decode step by step against the
  reference over the whole history (windows per query head or per KV group)."""
  b, t, h, sink = 3, 50, 16, 4
  total = t + steps
  layout = cache_lib.make_layout(
    np.asarray(windows).repeat(n // len(windows)), kv, total, sink=sink, slot_multiple=slot_multiple
  )
  pads = np.array([0, 13, 41])
  rng = np.random.default_rng(len(windows) + steps)
  q, k, v = (jnp.asarray(rng.standard_normal((b, total, heads, h)), dtype) for heads in (n, kv, kv))
  pos = jnp.asarray(np.arange(total)[None] - pads[:, None], jnp.int32)
  cache = cache_lib.write(cache_lib.init_cache(layout, b, h, dtype), k[:, :t], v[:, :t], pos[:, :t])
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  reference = jax.jit(
    lambda q, q_pos, k_pos: reference_attention(
      q, kf, vf, q_pos, k_pos, windows=jnp.asarray(windows), sink=sink
    )
  )
  for i in range(t, total):
    cache = cache_lib.write(cache, k[:, i : i + 1], v[:, i : i + 1], pos[:, i : i + 1])
    out = decode_fn(q[:, i], pos[:, i], cache)
    assert out.shape == (b, n, h) and out.dtype == dtype and not jnp.isnan(out).any()
    seen = jnp.where(jnp.arange(total) <= i, pos, -1)  # the history so far
    ref = reference(q[:, i : i + 1].astype(jnp.float32), pos[:, i : i + 1], seen)[:, 0]
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
    assert err < tolerance, f"step {i}: max abs error {err}"


@pytest.mark.parametrize(
  "windows,kv,dtype",
  [
    ([1, 9, 30, 70, 5, 5, 200, 12], 2, jnp.float32),  # per query head, prompt > some caches
    ([7, 40], 2, jnp.bfloat16),  # per KV group
  ],
)
def test_xla_decode_matches_reference(windows, kv, dtype):
  tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
  run_decode(
    decode_lib.decode_xla, dtype, windows, kv, steps=12, slot_multiple=1, tolerance=tolerance
  )


@pytest.mark.parametrize(
  "windows,kv,n,dtype,min_split_blocks",
  [
    ([1, 9, 30, 70, 5, 5, 200, 12], 2, 8, jnp.float32, 16),  # one split: output in the kernel
    ([3, 3, 3, 3, 25, 25, 25, 25], 8, 8, jnp.float16, 1),  # split slots, merged by XLA
    ([5, 40, 5, 40], 4, 16, jnp.float32, 1),  # groups of non-adjacent KV heads, N = 16 rows
    ([40, 5, 5, 40], 4, 16, jnp.float16, 16),
    ([3, 40, 7, 1, 30, 20], 2, 6, jnp.float32, 1),  # G = 3
    ([3, 40, 7, 1, 30, 20, 5], 1, 7, jnp.float32, 16),  # G = 7
  ],
)
def test_triton_decode_matches_reference(windows, kv, n, dtype, min_split_blocks):
  decode = lambda q, q_pos, cache: decode_lib.decode_gpu(
    q, q_pos, cache, target_programs=64, min_split_blocks=min_split_blocks, interpret=True
  )
  tolerance = 1e-5 if dtype == jnp.float32 else 4e-3
  run_decode(decode, dtype, windows, kv, steps=6, slot_multiple=16, tolerance=tolerance, n=n)


def test_decode_programs_balance_groups():
  """Splits follow capacity (every program streams about as many blocks), the groups with the
  longest programs come first, and the programs tile the grid without gaps."""
  layout = cache_lib.make_layout(np.repeat([100, 900, 100, 2000], 4), 4, 4096, sink=64)
  plans = decode_lib.plan_programs(layout, 16, block_k=64, target_programs=528, min_split_blocks=4)
  per_program = [p.blocks_per_split for p in plans]
  assert per_program == sorted(per_program, reverse=True)
  assert max(per_program) == 4 and plans[0].splits > 1  # min_split_blocks; largest group split
  assert all(
    p.splits * p.blocks_per_split >= p.num_blocks > (p.splits - 1) * p.blocks_per_split
    for p in plans
  )
  assert [p.first for p in plans] == list(np.cumsum([0] + [p.count(16) for p in plans[:-1]]))
  assert sorted(h for p in plans for h in p.heads) == [0, 1, 2, 3]


@pytest.mark.slow
def test_decode_dispatch():
  windows = np.array([4, 20, 9, 64])
  layout = cache_lib.make_layout(windows, 2, 80, sink=4, slot_multiple=64)
  rng = np.random.default_rng(3)
  b, t, h = 2, 70, 16
  k, v = (jnp.asarray(rng.standard_normal((b, t, 2, h)), jnp.float32) for _ in range(2))
  pos = jnp.asarray(np.arange(t)[None] - np.array([[0], [30]]), jnp.int32)
  cache = cache_lib.write(cache_lib.init_cache(layout, b, h, jnp.float32), k, v, pos)
  q = jnp.asarray(rng.standard_normal((b, 4, h)), jnp.float32)
  outs = [
    dispatch.decode_attention(q, pos[:, -1], cache, impl=impl, interpret=True)
    for impl in dispatch.IMPLS
  ]
  ref = reference_attention(q[:, None], k, v, pos[:, -1:], pos, windows=windows, sink=4)[:, 0]
  for out in outs:
    np.testing.assert_allclose(out, ref, atol=1e-5)
