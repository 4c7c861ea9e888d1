"""The Triton decode kernel for every GQA ratio N / K (1, 3, 4, 7, 8) and its launch settings.

`gpu` tests (tests/conftest.py): compiled on a GPU, interpret mode elsewhere (outputs start as
NaN there, so an unwritten row fails); the GPU-sized cases run on the GPU only. A left-padded
prompt is written into the MoA cache (longer than some heads' caches), then each decode step
is checked against the reference over the whole history.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.attention import cache as cache_lib
from moa_jax.attention import decode as decode_lib
from moa_jax.attention.reference import reference_attention

TOLERANCE = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}  # max abs error


def check_decode(seed, b, t, n, kv, h, dtype, pads, *, steps, sink, **kernel_kw):
  rng = np.random.default_rng(seed)
  windows = rng.integers(1, t, n)
  windows[0], windows[-1] = 1, t + steps
  total = t + steps
  layout = cache_lib.make_layout(windows, kv, total, sink=sink)
  q, k, v = (jnp.asarray(rng.standard_normal((b, total, heads, h)), dtype) for heads in (n, kv, kv))
  pos = jnp.asarray(np.arange(total)[None] - np.asarray(pads)[:, None], jnp.int32)
  cache = cache_lib.write(cache_lib.init_cache(layout, b, h, dtype), k[:, :t], v[:, :t], pos[:, :t])
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  reference = jax.jit(
    lambda q, q_pos, k_pos: reference_attention(q, kf, vf, q_pos, k_pos, windows=windows, sink=sink)
  )
  for i in range(t, total):
    cache = cache_lib.write(cache, k[:, i : i + 1], v[:, i : i + 1], pos[:, i : i + 1])
    out = decode_lib.decode_gpu(q[:, i], pos[:, i], cache, **kernel_kw)
    assert out.shape == (b, n, h) and out.dtype == dtype
    assert not jnp.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
    seen = jnp.where(jnp.arange(total) <= i, pos, -1)  # the history so far
    ref = reference(q[:, i : i + 1].astype(jnp.float32), pos[:, i : i + 1], seen)[:, 0]
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
    assert err < TOLERANCE[dtype], f"step {i} {kernel_kw}: max abs error {err}"


@pytest.mark.gpu
@pytest.mark.parametrize(
  "b,n,kv,h,dtype,pads,min_split_blocks",
  [
    (2, 2, 2, 16, jnp.float32, [0, 30], 16),  # GQA ratio 1
    (2, 6, 2, 16, jnp.bfloat16, [0, 30], 16),  # 3
    (2, 6, 2, 32, jnp.float32, [5, 0], 1),  # 3, slots split (merged by XLA)
    (1, 8, 2, 32, jnp.float16, [7], 16),  # 4
    (2, 7, 1, 16, jnp.float32, [0, 41], 16),  # 7
    (1, 8, 1, 16, jnp.bfloat16, [3], 1),  # 8
  ],
)
def test_decode_gqa_ratios(b, n, kv, h, dtype, pads, min_split_blocks, interpret):
  check_decode(
    n + kv + h,
    b,
    120,
    n,
    kv,
    h,
    dtype,
    pads,
    steps=2,
    sink=4,
    block_k=16,
    target_programs=64,
    min_split_blocks=min_split_blocks,
    interpret=interpret,
  )


GPU_DECODE_CONFIGS = [  # block_k, num_warps, num_stages, target_programs, min_split_blocks
  (64, 4, 2, 528, 16),
  (128, 4, 3, 528, 16),
  (64, 4, 2, 528, 4),
  (128, 8, 2, 264, 16),
]


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize(
  "n,kv,dtype,configs",
  [
    (32, 8, jnp.float32, [None]),
    (32, 8, jnp.bfloat16, [None, *GPU_DECODE_CONFIGS]),
    (24, 8, jnp.bfloat16, [None]),  # GQA ratio 3 (Llama-3.2-3B, SmolLM2)
    (28, 4, jnp.float16, [None, GPU_DECODE_CONFIGS[2]]),  # 7
  ],
)
def test_decode_gpu_sizes(n, kv, dtype, configs):
  """Compiled, GPU-sized: 700-token prompts, D = 128, the defaults and other launch settings."""
  for config in configs:
    names = ("block_k", "num_warps", "num_stages", "target_programs", "min_split_blocks")
    kernel_kw = {} if config is None else dict(zip(names, config))
    check_decode(n + kv, 3, 700, n, kv, 128, dtype, [0, 150, 333], steps=4, sink=64, **kernel_kw)
