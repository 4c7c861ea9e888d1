"""Sparse MoA prefill kernels (Pallas Triton, Mosaic GPU, Mosaic TPU) against the jnp reference.

Tests marked `gpu` run compiled on a GPU (`pytest -m gpu`) and, where they take the
`interpret` fixture, in interpret mode elsewhere (tests/conftest.py); the Mosaic TPU kernel
always runs interpreted. Interpret mode fills every output buffer with NaN before the kernel
runs (Pallas' uninitialized value; set explicitly for the TPU interpreter), so an element the
kernel never writes fails the NaN check. Inputs are fresh random draws; windows are random per
head and include 1 (a query sees only itself and the sink) and more than T (dense). GQA ratios
N / K of 1, 3, 4, 7 and 8 are covered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from moa_jax.attention import dispatch
from moa_jax.attention.prefill_gpu import launch_defaults, sparse_prefill_gpu
from moa_jax.attention.prefill_hopper import sparse_prefill_hopper
from moa_jax.attention.prefill_tpu import sparse_prefill_tpu
from moa_jax.attention.reference import blocked_attention, reference_attention

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
  ref = reference_attention(
    *(x.astype(jnp.float32) for x in (q, k, v)), pos, pos, windows=windows, sink=sink
  )
  assert out.shape == q.shape and out.dtype == q.dtype
  assert not jnp.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
  assert err < TOLERANCE[q.dtype.type], f"max abs error {err}"
  assert jnp.all(out[pos < 0] == 0), "padding rows must be zero"


CASES = [  # B, T, N, K, H, dtype, left padding per row, windows per KV group, sink
  (2, 300, 2, 2, 32, jnp.float32, [0, 37], False, 16),  # GQA ratio 1
  (2, 300, 6, 2, 16, jnp.bfloat16, [0, 50], True, 16),  # 3 (padded to 4 stacked heads)
  (1, 500, 8, 2, 128, jnp.bfloat16, [101], False, 64),  # 4
  (1, 300, 7, 1, 32, jnp.float16, [0], False, 64),  # 7 (padded to 8)
  (1, 300, 8, 1, 64, jnp.float16, [77], True, 16),  # 8
  (1, 300, 4, 4, 32, jnp.bfloat16, [20], False, 64),  # 1: 64-row tiles by default
]
GPU_CASES = [  # GPU-sized (compiled only): the same fields
  (2, 1000, 32, 8, 128, jnp.bfloat16, [0, 301], False, 64),
  (2, 1500, 16, 16, 64, jnp.float16, [0, 777], False, 64),
  (1, 1000, 8, 1, 128, jnp.float32, [100], False, 64),
  (1, 2047, 32, 4, 128, jnp.bfloat16, [0], True, 64),
  (2, 1000, 24, 8, 128, jnp.bfloat16, [0, 0], False, 64),  # ratio 3 (Llama-3.2-3B, SmolLM2)
  (1, 1777, 28, 4, 128, jnp.float16, [45], True, 64),  # ratio 7
]
GPU_CONFIGS = [  # launch settings beside the defaults: 128- and 32-key edge blocks; one loop
  dict(block_rows=128, block_k=128, edge_block_k=128, num_warps=8, num_stages=3),
  dict(block_rows=128, block_k=128, edge_block_k=32, num_warps=8, num_stages=3),
  dict(block_rows=128, block_k=128, num_warps=8, num_stages=3, single_loop=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n,kv,h,dtype,pads,per_group,sink", CASES)
def test_triton_prefill_matches_reference(b, t, n, kv, h, dtype, pads, per_group, sink, interpret):
  q, k, v, pos, windows = random_case(t + n + kv, b, t, n, kv, h, dtype, pads, per_group)
  out = sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=sink, interpret=interpret)
  check(out, q, k, v, pos, windows, sink)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n,kv,h,dtype,pads,per_group,sink", GPU_CASES)
def test_triton_prefill_gpu_sizes(b, t, n, kv, h, dtype, pads, per_group, sink):
  """Compiled: the defaults and the other launch settings (2-byte inputs) on larger shapes."""
  q, k, v, pos, windows = random_case(t + n + kv, b, t, n, kv, h, dtype, pads, per_group)
  configs = [{}] if dtype == jnp.float32 else [{}, *GPU_CONFIGS]
  for config in configs:
    out = sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=sink, **config)
    check(out, q, k, v, pos, windows, sink)


def test_launch_defaults():
  """The H100 defaults: 128 rows with GQA or beyond 16k tokens, 64 rows for G = 1 up to 16k."""
  bf16 = dict(head_dim=128, itemsize=2)
  assert launch_defaults(group=4, seq_len=16384, **bf16) == dict(
    block_rows=128, block_k=128, edge_block_k=64, num_warps=8, num_stages=3
  )
  assert launch_defaults(group=1, seq_len=16384, **bf16) == dict(
    block_rows=64, block_k=64, edge_block_k=64, num_warps=4, num_stages=3
  )
  assert launch_defaults(group=1, seq_len=32768, **bf16)["block_rows"] == 128
  assert launch_defaults(group=1, seq_len=100, head_dim=128, itemsize=4) == dict(
    block_rows=128, block_k=64, edge_block_k=64, num_warps=8, num_stages=2
  )
  assert launch_defaults(group=1, seq_len=100, block_rows=128, **bf16)["block_k"] == 128
  assert launch_defaults(group=2, seq_len=100, single_loop=True, **bf16)["edge_block_k"] == 128


@pytest.mark.gpu
@pytest.mark.parametrize(
  "single_loop,block_k,edge_block_k", [(True, 16, None), (False, 16, None), (False, 64, 16)]
)
def test_triton_prefill_small_blocks(single_loop, block_k, edge_block_k, interpret):
  """edge_block_k < block_k: edge blocks of 16 keys, interior steps of 4 edge blocks from an
  edge-block boundary, the interior's remainder masked."""
  q, k, v, pos, windows = random_case(5, 2, 160, 8, 2, 32, jnp.float32, [0, 50])
  out = sparse_prefill_gpu(
    q,
    k,
    v,
    pos,
    jnp.asarray(windows),
    sink=8,
    block_rows=64,
    block_k=block_k,
    edge_block_k=edge_block_k,
    single_loop=single_loop,
    interpret=interpret,
  )
  check(out, q, k, v, pos, windows, 8)


@pytest.mark.parametrize(
  "b,t,n,kv,h,dtype,pads,mode,max_window",
  [
    (2, 300, 6, 2, 64, jnp.bfloat16, [0, 101], "tpu", True),  # GQA ratio 3
    (1, 300, 7, 1, 32, jnp.float32, [50], "hlo", False),  # 7
    (1, 300, 4, 4, 32, jnp.float32, [0], "hlo", True),  # 1
  ],
)
def test_mosaic_prefill_matches_reference(b, t, n, kv, h, dtype, pads, mode, max_window):
  q, k, v, pos, windows = random_case(t + kv, b, t, n, kv, h, dtype, pads)
  mode = pltpu.InterpretParams(uninitialized_memory="nan") if mode == "tpu" else True
  out = sparse_prefill_tpu(
    q,
    k,
    v,
    pos,
    jnp.asarray(windows),
    sink=64,
    interpret=mode,
    max_window=int(windows.max()) if max_window else None,
  )
  check(out, q, k, v, pos, windows, 64)


def test_dispatch():
  assert dispatch.default_impl() == "reference"  # CI runs on the CPU
  q, k, v, pos, windows = random_case(9, 1, 130, 4, 2, 16, jnp.float32, [3])
  for impl in ("triton", "mosaic", "reference"):
    out = dispatch.prefill_attention(q, k, v, pos, windows, sink=8, impl=impl, interpret=True)
    check(out, q, k, v, pos, windows, 8)
  with pytest.raises(ValueError, match="no CPU interpret mode"):
    dispatch.prefill_attention(q, k, v, pos, windows, sink=8, impl="mosaic_gpu", interpret=True)
  assert [dispatch.gpu_impl(cc) for cc in ("9.0", "8.0", "10.0", None)] == [
    "mosaic_gpu",
    "triton",
    "triton",
    "triton",
  ]
  with pytest.raises(ValueError, match="unknown attention impl"):
    dispatch.prefill_attention(q, k, v, pos, windows, sink=8, impl="cuda")


def test_triton_prefill_rejects_bad_shapes():
  q, k, v, pos, windows = random_case(1, 1, 64, 6, 2, 16, jnp.float32, [0])
  with pytest.raises(ValueError, match=r"block_rows must be .* >= 16 \* G' = 64"):
    sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=4, block_rows=32, interpret=True)
  q, k, v, pos, windows = random_case(1, 1, 64, 4, 2, 24, jnp.float32, [0])
  with pytest.raises(ValueError, match="head_dim"):
    sparse_prefill_gpu(q, k, v, pos, jnp.asarray(windows), sink=4, interpret=True)
  q, k, v, pos, windows = random_case(1, 1, 64, 4, 2, 32, jnp.float32, [0])
  with pytest.raises(ValueError, match="edge_block_k"):
    sparse_prefill_gpu(
      q, k, v, pos, jnp.asarray(windows), sink=4, block_k=32, edge_block_k=64, interpret=True
    )


def test_hopper_prefill_rejects_bad_inputs():
  """The Mosaic GPU kernel runs only on the GPU (no interpret mode): its input checks run here."""
  q, k, v, _, _ = random_case(2, 1, 128, 4, 2, 64, jnp.bfloat16, [0])
  with pytest.raises(ValueError, match="bf16 or fp16"):
    sparse_prefill_hopper(q.astype(jnp.float32), k, v, (8, 8), sink=4)
  with pytest.raises(ValueError, match="multiple of 64"):
    sparse_prefill_hopper(q[..., :32], k[..., :32], v[..., :32], (8, 8), sink=4)
  with pytest.raises(ValueError, match="4 query heads or 2 KV groups"):
    sparse_prefill_hopper(q, k, v, (8, 8, 8), sink=4)


@pytest.mark.parametrize(
  "dtype,windows,uses_hopper",
  [
    (jnp.bfloat16, np.array([100, 20]), True),  # static windows: Hopper or Triton at run time
    (jnp.float32, np.array([100, 20]), False),  # float32: Triton only
    (jnp.bfloat16, None, False),  # traced windows: Triton only
  ],
)
def test_mosaic_gpu_dispatch_choice(dtype, windows, uses_hopper):
  """impl="mosaic_gpu" picks between the kernels by padding (a cond) only where Hopper applies."""
  q, k, v, pos, _ = random_case(3, 2, 300, 8, 2, 64, dtype, [0, 0])

  def prefill(q, k, v, pos, traced):
    wins = traced if windows is None else windows
    return dispatch.prefill_attention(q, k, v, pos, wins, sink=16, impl="mosaic_gpu")

  jaxpr = jax.make_jaxpr(prefill)(q, k, v, pos, jnp.array([100, 20], jnp.int32))
  assert any(eqn.primitive.name == "cond" for eqn in jaxpr.eqns) == uses_hopper


HOPPER_CASES = [  # B, T, N, K, H, dtype, windows per KV group, sink (unpadded rows)
  (2, 1000, 4, 4, 64, jnp.float16, False, 64),  # GQA ratio 1
  (2, 1000, 24, 8, 128, jnp.bfloat16, False, 64),  # 3
  (1, 1500, 16, 4, 128, jnp.float16, True, 64),  # 4
  (1, 777, 7, 1, 64, jnp.bfloat16, False, 16),  # 7
  (1, 2047, 32, 4, 128, jnp.bfloat16, True, 64),  # 8
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,n,kv,h,dtype,per_group,sink", HOPPER_CASES)
def test_hopper_prefill_matches_reference(b, t, n, kv, h, dtype, per_group, sink, hopper):
  q, k, v, pos, windows = random_case(t + n, b, t, n, kv, h, dtype, [0] * b, per_group)
  out = sparse_prefill_hopper(q, k, v, tuple(int(w) for w in windows), sink=sink)
  check(out, q, k, v, pos, windows, sink)


@pytest.mark.gpu
def test_mosaic_gpu_dispatch_runs_both_kernels(hopper):
  """impl="mosaic_gpu" on a GPU: an unpadded batch through Hopper, a padded one through Triton."""
  for pads in ([0, 0], [0, 57]):
    q, k, v, pos, windows = random_case(11, 2, 700, 12, 4, 128, jnp.bfloat16, pads)
    out = jax.jit(
      lambda q, k, v, pos: dispatch.prefill_attention(
        q, k, v, pos, windows, sink=64, impl="mosaic_gpu"
      )
    )(q, k, v, pos)
    check(out, q, k, v, pos, windows, 64)


@pytest.mark.parametrize(
  "t,block_q,windows,per_head_pos",
  [
    (700, 256, np.array([1, 40, 300, 900]), False),  # self-attention, causal key prefix
    (300, 512, None, False),  # one block: the reference itself
    (333, 100, np.array([7, 700]), True),  # given key positions [B, K, S]
  ],
)
def test_blocked_attention_matches_reference(t, block_q, windows, per_head_pos):
  """Query blocks give the reference's numbers (left padding, dense and windowed heads)."""
  q, k, v, pos, _ = random_case(t, 2, t, 4, 2, 16, jnp.float32, [0, 45])
  ref = reference_attention(q, k, v, pos, pos, windows=windows, sink=8)
  k_pos = jnp.broadcast_to(pos[:, None], (2, 2, t)) if per_head_pos else None
  out = blocked_attention(q, k, v, pos, k_pos, windows=windows, sink=8, block_q=block_q)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert jnp.all(out[pos < 0] == 0)
