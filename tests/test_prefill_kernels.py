"""Sparse MoA prefill kernels (Pallas Triton and Mosaic, interpret mode) against the jnp reference.

Interpret mode fills every output buffer with NaN before the kernel runs (Pallas'
uninitialized value; set explicitly for the TPU interpreter), so an element the kernel never
writes fails the NaN check. Inputs are fresh random draws; windows are random per head and
include 1 (a query sees only itself and the sink) and more than T (dense).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from moa_jax.attention import dispatch
from moa_jax.attention.prefill_gpu import launch_defaults, key_block_ranges, sparse_prefill_gpu
from moa_jax.attention.prefill_hopper import sparse_prefill_hopper
from moa_jax.attention.prefill_tpu import block_tables, sparse_prefill_tpu
from moa_jax.attention.reference import reference_attention
from moa_jax.plans.rules import FULL, SKIP, block_layout

# Max abs error against the float32 reference on the same (rounded) inputs.
TOLERANCE = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


def random_case(seed, b, t, n, kv, h, dtype, pads, per_group=False):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), dtype) for heads in (n, kv, kv))
  pos = jnp.asarray(np.arange(t)[None] - np.asarray(pads)[:, None], jnp.int32)
  windows = rng.integers(1, t, kv if per_group else n)
  windows[0], windows[-1] = 1, t + 7
  return q, k, v, pos, windows


def check(out, q, k, v, pos, windows, sink):
  ref = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), pos, pos,
                            windows=windows, sink=sink)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert not jnp.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
  assert err < TOLERANCE[q.dtype.type], f"max abs error {err}"
  assert jnp.all(out[pos < 0] == 0), "padding rows must be zero"


GPU_CASES = [  # B, T, N, K, H, dtype, left padding per row, windows per KV group, sink
    (2, 1000, 4, 4, 64, jnp.float32, [0, 123], False, 64),
    (2, 1000, 8, 2, 128, jnp.bfloat16, [0, 301], False, 64),
    (1, 1000, 8, 1, 64, jnp.float16, [77], True, 16),
    (1, 600, 4, 4, 32, jnp.bfloat16, [20], False, 64),  # G = 1: 64-row tiles by default
]


@pytest.mark.parametrize("b,t,n,kv,h,dtype,pads,per_group,sink", GPU_CASES)
def test_triton_prefill_matches_reference(b, t, n, kv, h, dtype, pads, per_group, sink):
  q, k, v, pos, windows = random_case(t + n + kv, b, t, n, kv, h, dtype, pads, per_group)
  out = sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=sink, interpret=True)
  check(out, q, k, v, pos, windows, sink)


def test_launch_defaults():
  """The H100 defaults: 128 rows with GQA or beyond 16k tokens, 64 rows for G = 1 up to 16k."""
  bf16 = dict(head_dim=128, itemsize=2)
  assert launch_defaults(group=4, seq_len=16384, **bf16) == dict(
      block_rows=128, block_k=128, edge_block_k=64, num_warps=8, num_stages=3)
  assert launch_defaults(group=1, seq_len=16384, **bf16) == dict(
      block_rows=64, block_k=64, edge_block_k=64, num_warps=4, num_stages=3)
  assert launch_defaults(group=1, seq_len=32768, **bf16)["block_rows"] == 128
  assert launch_defaults(group=1, seq_len=100, head_dim=128, itemsize=4) == dict(
      block_rows=128, block_k=64, edge_block_k=64, num_warps=8, num_stages=2)
  assert launch_defaults(group=1, seq_len=100, block_rows=128, **bf16)["block_k"] == 128
  assert launch_defaults(group=2, seq_len=100, single_loop=True, **bf16)["edge_block_k"] == 128


@pytest.mark.parametrize("single_loop,block_k,edge_block_k", [
    (True, 16, None), (False, 16, None), (False, 64, 16)])
def test_triton_prefill_small_blocks(single_loop, block_k, edge_block_k):
  """edge_block_k < block_k: edge blocks of 16 keys, interior steps of 4 edge blocks from an
  edge-block boundary, the interior's remainder masked."""
  q, k, v, pos, windows = random_case(5, 2, 300, 8, 2, 32, jnp.float32, [0, 50])
  out = sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=8, block_rows=64,
                           block_k=block_k, edge_block_k=edge_block_k, single_loop=single_loop,
                           interpret=True)
  check(out, q, k, v, pos, windows, 8)


@pytest.mark.parametrize("b,t,n,kv,h,dtype,pads,interpret,max_window", [
    (2, 1000, 8, 2, 128, jnp.bfloat16, [0, 301], "tpu", True),
    (1, 1000, 8, 8, 64, jnp.float32, [50], "hlo", False),
])
def test_mosaic_prefill_matches_reference(b, t, n, kv, h, dtype, pads, interpret, max_window):
  q, k, v, pos, windows = random_case(t + kv, b, t, n, kv, h, dtype, pads)
  mode = pltpu.InterpretParams(uninitialized_memory="nan") if interpret == "tpu" else True
  out = sparse_prefill_tpu(q, k, v, pos, jnp.asarray(windows), sink=64, interpret=mode,
                           max_window=int(windows.max()) if max_window else None)
  check(out, q, k, v, pos, windows, 64)


@pytest.mark.parametrize("sink,block", [(64, 64), (0, 32), (100, 32)])
def test_block_ranges_are_the_rule_layout(sink, block):
  """Without padding, with tiles of one block: the key blocks a tile visits are exactly the
  non-SKIP blocks of the rule's layout for the group's largest window; interior (unmasked)
  blocks are FULL for every head of the group, and every FULL block past the sink is interior."""
  n, rng = 700, np.random.default_rng(sink + block)
  windows = np.sort(rng.integers(1, n + 10, (5, 3)), axis=-1)  # [K, G]
  nb = -(-n // block)
  index, full, count = (np.asarray(x) for x in block_tables(
      jnp.zeros(1, jnp.int32), jnp.asarray(windows, jnp.int32), sink=sink, seq_len=n,
      tile_tokens=block, block_k=block, num_q_blocks=nb, max_steps=nb))
  layout = block_layout(windows, sink, n, block)  # [K, G, NB, NB]
  for g in range(windows.shape[0]):
    for r in range(nb):
      visited = index[0, g, r, :count[0, g, r]]
      assert len(set(visited)) == len(visited)
      assert set(visited) == set(np.flatnonzero(layout[g, -1, r] != SKIP))
      interior = set(visited[full[0, g, r, :count[0, g, r]] == 1])
      all_full = set(np.flatnonzero((layout[g, :, r] == FULL).all(0)))
      assert interior <= all_full
      assert {c for c in all_full if c * block >= sink} <= interior


def test_block_ranges_skip_padding():
  """A tile of pure left padding visits nothing; a later tile starts at the first real token."""
  ranges = key_block_ranges(jnp.int32(300), jnp.int32(0), jnp.int32(127), 50, 50, sink=64,
                            block_k=64)
  sink_lo, sink_hi, lo, f0, f1, hi = (int(x) for x in ranges)
  assert sink_hi - sink_lo == 0 and hi - lo == 0
  ranges = key_block_ranges(jnp.int32(300), jnp.int32(1024), jnp.int32(1151), 2000, 2000,
                            sink=64, block_k=64)
  sink_lo, sink_hi, lo, f0, f1, hi = (int(x) for x in ranges)
  assert (lo, hi, f0, f1) == (300 // 64, 1151 // 64 + 1, 5, 16)
  assert sink_hi == sink_lo  # the window already covers the sink


def test_dispatch():
  assert dispatch.default_impl() == "reference"  # CI runs on the CPU
  q, k, v, pos, windows = random_case(9, 1, 130, 4, 2, 16, jnp.float32, [3])
  for impl in ("triton", "mosaic", "reference"):
    out = dispatch.prefill_attention(q, k, v, pos, windows, sink=8, impl=impl, interpret=True)
    check(out, q, k, v, pos, windows, 8)
  with pytest.raises(ValueError, match="no CPU interpret mode"):
    dispatch.prefill_attention(q, k, v, pos, windows, sink=8, impl="mosaic_gpu", interpret=True)
  assert [dispatch.gpu_impl(cc) for cc in ("9.0", "8.0", "10.0", None)] == [
      "mosaic_gpu", "triton", "triton", "triton"]
  with pytest.raises(ValueError, match="unknown attention impl"):
    dispatch.prefill_attention(q, k, v, pos, windows, sink=8, impl="cuda")


def test_triton_prefill_rejects_bad_shapes():
  q, k, v, pos, windows = random_case(1, 1, 64, 6, 2, 16, jnp.float32, [0])
  with pytest.raises(ValueError, match="power-of-two GQA group"):
    sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=4, interpret=True)
  q, k, v, pos, windows = random_case(1, 1, 64, 4, 2, 24, jnp.float32, [0])
  with pytest.raises(ValueError, match="head_dim"):
    sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=4, interpret=True)
  q, k, v, pos, windows = random_case(1, 1, 64, 4, 2, 32, jnp.float32, [0])
  with pytest.raises(ValueError, match="edge_block_k"):
    sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=4, block_k=32, edge_block_k=64,
                       interpret=True)


def test_hopper_prefill_rejects_bad_inputs():
  """The Mosaic GPU kernel runs only on the GPU (no interpret mode): its input checks run here."""
  q, k, v, _, _ = random_case(2, 1, 128, 4, 2, 64, jnp.bfloat16, [0])
  with pytest.raises(ValueError, match="bf16 or fp16"):
    sparse_prefill_hopper(q.astype(jnp.float32), k, v, (8, 8), sink=4)
  with pytest.raises(ValueError, match="multiple of 64"):
    sparse_prefill_hopper(q[..., :32], k[..., :32], v[..., :32], (8, 8), sink=4)
  with pytest.raises(ValueError, match="4 query heads or 2 KV groups"):
    sparse_prefill_hopper(q, k, v, (8, 8, 8), sink=4)


@pytest.mark.parametrize("dtype,windows,hopper", [
    (jnp.bfloat16, np.array([100, 20]), True),  # static windows: Hopper or Triton at run time
    (jnp.float32, np.array([100, 20]), False),  # float32: Triton only
    (jnp.bfloat16, None, False),  # traced windows: Triton only
])
def test_mosaic_gpu_dispatch_choice(dtype, windows, hopper):
  """impl="mosaic_gpu" picks between the kernels by padding (a cond) only where Hopper applies."""
  q, k, v, pos, _ = random_case(3, 2, 300, 8, 2, 64, dtype, [0, 0])
  def prefill(q, k, v, pos, traced):
    wins = traced if windows is None else windows
    return dispatch.prefill_attention(q, k, v, pos, wins, sink=16, impl="mosaic_gpu")
  jaxpr = jax.make_jaxpr(prefill)(q, k, v, pos, jnp.array([100, 20], jnp.int32))
  assert any(eqn.primitive.name == "cond" for eqn in jaxpr.eqns) == hopper
