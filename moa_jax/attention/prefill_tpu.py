"""Block-sparse MoA prefill on TPU: a Pallas Mosaic kernel driven by scalar-prefetched block tables.

The grid is (batch, KV head, query tile, step). For every (batch row, KV head, query tile) the
wrapper lists, in SMEM, the key blocks the rule can reach (the sink blocks, then the window's
blocks) and whether each one is interior (every pair attended: no mask) or an edge (masked
element-wise with `rules.attend_mask`). The K/V index maps read that table, so only listed
blocks are copied into VMEM; steps past a tile's count repeat the last block index (no DMA)
and skip the compute. The query tile stacks the G query heads of the group (rows
r = head * Tq + token), so each K/V block is loaded once per group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moa_jax.attention.prefill_gpu import prefill_shapes
from moa_jax.plans.rules import (
  MASKED_LOGIT,
  attend_mask,
  expand_to_query_heads,
  key_block_ranges,
  num_blocks,
)

LANES = 128  # running max / sum kept lane-replicated, as Mosaic likes


def block_tables(
  offsets,
  windows,
  *,
  sink: int,
  seq_len: int,
  tile_tokens: int,
  block_k: int,
  num_q_blocks: int,
  max_steps: int,
):
  """Key-block lists of every (batch row, KV head, query tile).

  Args:
    offsets: [B] int32 left padding per row; windows: [K, G] int32 windows of each group.
  Returns:
    index [B, K, Q, max_steps] int32 key-block index per step (the last valid one repeated),
    full [B, K, Q, max_steps] int32 (1: interior block, no mask), count [B, K, Q] int32.
  """
  off = offsets[:, None, None, None]  # [B, 1, 1, 1]
  win_max = windows.max(-1)[None, :, None, None]  # [1, K, 1, 1]
  win_min = windows.min(-1)[None, :, None, None]
  t0 = (jnp.arange(num_q_blocks) * tile_tokens)[None, None, :, None]  # [1, 1, Q, 1]
  t1 = jnp.minimum(t0 + tile_tokens - 1, seq_len - 1)  # rows past seq_len are sliced off
  sink_lo, sink_hi, lo, f0, f1, hi = key_block_ranges(
    off, t0, t1, win_min, win_max, sink=sink, block_k=block_k
  )
  n_sink = sink_hi - sink_lo
  count = n_sink + (hi - lo)  # [B, K, Q, 1]
  step = jnp.minimum(jnp.arange(max_steps)[None, None, None, :], jnp.maximum(count - 1, 0))
  index = jnp.where(step < n_sink, sink_lo + step, lo + step - n_sink)
  full = (step >= n_sink) & (index >= f0) & (index < f1)
  return index.astype(jnp.int32), full.astype(jnp.int32), count[..., 0].astype(jnp.int32)


def _prefill_kernel(
  index_ref,
  full_ref,
  count_ref,
  off_ref,
  win_ref,  # scalar prefetch (SMEM, flattened)
  q_ref,
  k_ref,
  v_ref,  # VMEM blocks: [G, Tq, H], [Bk, H], [Bk, H]
  o_ref,  # [G, Tq, H]
  m_ref,
  l_ref,
  acc_ref,  # scratch: [R, LANES], [R, LANES], [R, H] float32
  *,
  flat,
  group: int,
  block_k: int,
  seq_len: int,
  sink: int,
  logit_scale: float,
  precision,
):
  bi, ki, qi, step = (pl.program_id(i) for i in range(4))
  at = flat(bi, ki, qi, step)
  _, tile_tokens, head_dim = q_ref.shape
  rows = group * tile_tokens

  @pl.when(step == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASKED_LOGIT, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def compute(masked: bool):
    q = q_ref[...].reshape(rows, head_dim)  # [R, H]
    kb = index_ref[at]
    s = lax.dot_general(
      q,
      k_ref[...],
      (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32,
      precision=precision,
    )
    s = s * logit_scale  # [R, Bk], base-2 logits
    if masked:
      off = off_ref[bi]
      row = lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)
      head = row // tile_tokens
      row_pos = qi * tile_tokens + row % tile_tokens - off  # [R, Bk]
      row_win = jnp.zeros((rows, block_k), jnp.int32)
      for g in range(group):
        row_win = jnp.where(head == g, win_ref[ki * group + g], row_win)
      key_idx = kb * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
      key_pos = jnp.where(key_idx < seq_len, key_idx - off, -1)
      mask = attend_mask(row_pos, key_pos, sink, row_win)
      s = jnp.where(mask, s, MASKED_LOGIT)
    m_prev = m_ref[:, :1]  # [R, 1]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.exp2(s - m_new)
    if masked:
      p = jnp.where(mask, p, 0.0)
    correction = jnp.exp2(m_prev - m_new)
    l_ref[...] = jnp.broadcast_to(
      l_ref[:, :1] * correction + p.sum(axis=1, keepdims=True), l_ref.shape
    )
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    v = v_ref[...]
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    acc_ref[...] = acc_ref[...] * correction + pv

  active = step < count_ref[flat(bi, ki, qi, steps=1)]
  is_full = full_ref[at] == 1

  @pl.when(active & is_full)
  def _full():
    compute(masked=False)

  @pl.when(active & jnp.logical_not(is_full))
  def _edge():
    compute(masked=True)

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[:, :1]
    out = jnp.where(l > 0, acc_ref[...] / jnp.maximum(l, 1e-30), 0.0)  # [R, H]
    o_ref[...] = out.reshape(group, tile_tokens, head_dim).astype(o_ref.dtype)


@functools.partial(
  jax.jit, static_argnames=("sink", "scale", "max_window", "block_q", "block_k", "interpret")
)
def sparse_prefill_tpu(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  windows: jax.Array,
  *,
  sink: int,
  scale: float | None = None,
  max_window: int | None = None,
  block_q: int = 128,
  block_k: int = 128,
  interpret=False,
) -> jax.Array:
  """MoA self-attention of a prompt on TPU (same contract as `sparse_prefill_gpu`).

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H]; q_pos: [B, T] int32, left padded (token i of a row with
      pad_b padding tokens has position i - pad_b).
    windows: int [N] or [K] windows in tokens (may be traced).
    max_window: a static upper bound on the windows; it sizes the grid's step axis to the
      blocks a tile can reach (default: every key block, correct but slower).
    block_q: query tokens per tile (a multiple of 8); block_k: keys per block (a multiple of 8).
    interpret: False on a TPU; True or `pltpu.InterpretParams()` to run on the CPU.
  Returns:
    [B, T, N, H] in q's dtype; padding rows are zero.
  """
  b, t, n, h, kv_heads = prefill_shapes(q, k, v)
  if block_q % 8 or block_k % 8:
    raise ValueError(f"block_q and block_k must be multiples of 8, got {block_q}, {block_k}")
  group = n // kv_heads
  scale = h**-0.5 if scale is None else scale
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

  pad_to = math.lcm(block_q, block_k)
  t_pad = num_blocks(t, pad_to) * pad_to
  num_q_blocks, num_k_blocks = t_pad // block_q, t_pad // block_k
  if max_window is None:
    max_steps = num_k_blocks
  else:
    reach = min(max_window, t) + block_q - 1
    max_steps = min(num_k_blocks, -(-sink // block_k) + 1 + -(-reach // block_k) + 1)

  offsets = ((t - 1) - q_pos[:, t - 1]).astype(jnp.int32)  # [B]
  win = jnp.clip(expand_to_query_heads(jnp.asarray(windows, jnp.int32), n), 0, t)  # [N]
  index, full, count = block_tables(
    offsets,
    win.reshape(kv_heads, group),
    sink=sink,
    seq_len=t,
    tile_tokens=block_q,
    block_k=block_k,
    num_q_blocks=num_q_blocks,
    max_steps=max_steps,
  )

  def head_major(x):  # [B, T, heads, H] -> [B, heads, T_pad, H]
    return jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  def flat(bi, ki, qi, s=0, steps=max_steps):  # row-major offset into the flattened tables
    return ((bi * kv_heads + ki) * num_q_blocks + qi) * steps + s

  qh = head_major(q).reshape(b, kv_heads, group, t_pad, h)
  kh, vh = head_major(k), head_major(v)
  q_spec = pl.BlockSpec(
    (None, None, group, block_q, h), lambda bi, ki, qi, s, *_: (bi, ki, 0, qi, 0)
  )
  kv_spec = pl.BlockSpec(
    (None, None, block_k, h), lambda bi, ki, qi, s, idx, *_: (bi, ki, idx[flat(bi, ki, qi, s)], 0)
  )
  rows = group * block_q
  kernel = functools.partial(
    _prefill_kernel,
    flat=flat,
    group=group,
    block_k=block_k,
    seq_len=t,
    sink=sink,
    logit_scale=scale * math.log2(math.e),
    precision=precision,
  )
  out = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(b, kv_heads, num_q_blocks, max_steps),
      in_specs=[q_spec, kv_spec, kv_spec],
      out_specs=q_spec,
      scratch_shapes=[
        pltpu.VMEM((rows, LANES), jnp.float32),
        pltpu.VMEM((rows, LANES), jnp.float32),
        pltpu.VMEM((rows, h), jnp.float32),
      ],
    ),
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
    interpret=interpret,
    name="moa_sparse_prefill_tpu",
  )(index.reshape(-1), full.reshape(-1), count.reshape(-1), offsets, win, qh, kh, vh)
  out = out.reshape(b, n, t_pad, h).transpose(0, 2, 1, 3)  # [B, T_pad, N, H]
  return out[:, :t]
