"""Prefill on top of the MoA cache: a chunk of T new tokens attends the cache and itself.

A call of T > 1 tokens on a cache that already holds earlier tokens (the next chunk of a long
prompt, a new turn of a conversation) lets each query head attend, by `rules.attend_mask` on
positions, the keys held by the cache *before* this chunk is written plus the chunk's own keys.
Attending before writing is what keeps a chunk longer than a head's ring exact: its early
tokens see keys of the chunk that the write will evict (`cache.write` keeps the newest).

Chunk rows follow `cache.write`'s contract: row b's real tokens are contiguous, end at index
T - 1 and continue the positions already in the cache (left padding: negative positions
first). Two implementations of one contract:
  * `chunk_reference`: per cache group, `reference_attention` over [cache slots; chunk keys].
  * `chunk_gpu`: one Pallas Triton launch per cache group. The program for (row tile, batch
    row, KV head) stacks the group's query heads (flattened rows r = token * G + head, so any
    G works), streams that head's cache slots (only the sink slots when every query of the tile
    has its whole window inside the chunk), then the chunk's key blocks the rule can reach: the
    chunk's own sink keys (early positions), the window's edge blocks (masked element-wise)
    and its interior blocks (every pair attended: no mask). Online softmax in float32, base 2.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from moa_jax.attention.cache import CacheLayout, MoACache
from moa_jax.attention.reference import reference_attention
from moa_jax.plans.rules import MASKED_LOGIT as MASKED
from moa_jax.plans.rules import attend_mask, key_block_ranges


def _check_inputs(
  q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, layout: CacheLayout
) -> None:
  b, t, n, h = q.shape
  if n != len(layout.windows):
    raise ValueError(f"q has {n} heads, the cache layout {len(layout.windows)} query heads")
  expected = (b, t, layout.num_kv_heads, h)
  if k.shape != expected or v.shape != expected:
    raise ValueError(f"k and v must be [B, T, K, H] = {expected}, got {k.shape}, {v.shape}")
  if q_pos.shape != (b, t):
    raise ValueError(f"q_pos must be [B, T] = {(b, t)}, got {q_pos.shape}")


def _group_heads(x: jax.Array, layout: CacheLayout):
  """[B, T, K * G, H] -> per cache group [B, T, K_g * G, H] (the group's query heads)."""
  b, t, _, h = x.shape
  xk = x.reshape(b, t, layout.num_kv_heads, -1, h)
  return [xk[:, :, np.asarray(g.heads)].reshape(b, t, -1, h) for g in layout.groups]


def _merge_groups(outs: list[jax.Array], layout: CacheLayout) -> jax.Array:
  """Per group [B, T, K_g, G, H] -> [B, T, K * G, H] in KV-head order."""
  inverse = np.argsort([h for group in layout.groups for h in group.heads])
  out = jnp.concatenate(outs, axis=2)[:, :, inverse]  # [B, T, K, G, H]
  return out.reshape(*out.shape[:2], -1, out.shape[-1])


def _group_windows(layout: CacheLayout) -> list[np.ndarray]:
  """Per cache group int32 [K_g, G] windows of its query heads."""
  windows = np.asarray(layout.windows, np.int32).reshape(layout.num_kv_heads, -1)
  return [windows[np.asarray(g.heads)] for g in layout.groups]


def chunk_reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  cache: MoACache,
  *,
  scale: float | None = None,
) -> jax.Array:
  """q [B, T, N, H], k/v [B, T, K, H] at positions [B, T] over the cache (not yet holding
  them) and themselves -> [B, T, N, H]; rows with nothing to attend (padding) are zero."""
  layout = cache.layout
  _check_inputs(q, k, v, q_pos, layout)
  b, t, _, h = q.shape
  outs = []
  for group, qg, win, ck, cv, cpos in zip(
    layout.groups, _group_heads(q, layout), _group_windows(layout), cache.k, cache.v, cache.pos
  ):
    heads = np.asarray(group.heads)
    keys = jnp.concatenate([ck.transpose(0, 2, 1, 3), k[:, :, heads].astype(ck.dtype)], 1)
    values = jnp.concatenate([cv.transpose(0, 2, 1, 3), v[:, :, heads].astype(cv.dtype)], 1)
    k_pos = jnp.concatenate([cpos, q_pos.astype(jnp.int32)], axis=1)  # [B, C + T]
    out = reference_attention(
      qg, keys, values, q_pos, k_pos, windows=win.reshape(-1), sink=layout.sink, scale=scale
    )  # [B, T, K_g * G, H]
    outs.append(out.reshape(b, t, len(heads), -1, h))
  return _merge_groups(outs, layout)


def _chunk_kernel(
  off_ref,
  start_ref,
  win_ref,
  q_ref,
  k_ref,
  v_ref,
  ck_ref,
  cv_ref,
  cpos_ref,
  o_ref,
  *,
  group: int,
  seq_len: int,
  sink: int,
  sink_slots: int,
  block_k: int,
  cache_block_k: int,
  logit_scale: float,
  precision,
):
  """One (row tile, batch row, KV head) program.

  Refs: off_ref / start_ref [] int32 (row b's left padding in the chunk; chunk token i >= off
  has position i + start), win_ref [R] int32 (window of each tile row), q_ref / o_ref [R, H]
  (rows r = token * G + head), k_ref / v_ref [T', H] (the chunk's keys, T' >= T), ck_ref /
  cv_ref [C, H] (the head's cache slots), cpos_ref [C] int32 (slot positions, -1: empty).

  Masked logits are MASKED: a row with nothing attended yet adds exp2(0) = 1 per masked key,
  which the first attended key rescales by exp2(MASKED - m) = 0; a row that attends nothing
  keeps m = MASKED and writes 0.
  """
  rows, head_dim = q_ref.shape
  capacity = ck_ref.shape[0]
  r0 = pl.program_id(0) * rows
  off = off_ref[...]
  start = start_ref[...]
  win = win_ref[...]  # [R]
  win_max = jnp.max(win)
  win_min = jnp.min(win)
  q = q_ref[...]  # [R, H]
  token = lax.div(r0 + lax.iota(jnp.int32, rows), group)  # [R] chunk index of each row
  row_pos = jnp.where((token >= off) & (token < seq_len), token + start, -1)  # [R]
  t0 = lax.div(r0, group)
  t1 = jnp.minimum(lax.div(r0 + rows - 1, group), seq_len - 1)
  first = jnp.maximum(t0, off)  # first real token of the tile (> t1: none)

  def update(carry, k, v, key_pos):
    """Online-softmax step over keys k, v [Bk, H] at key_pos [Bk] (None: all attended)."""
    acc, m, l = carry
    s = lax.dot_general(
      q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )  # [R, Bk], unscaled logits
    if key_pos is None:  # scale inside exp2's argument: one fused multiply-add per logit
      m_new = jnp.maximum(m, jnp.max(s, axis=1) * logit_scale)
      p = jnp.exp2(s * logit_scale - m_new[:, None])
    else:
      mask = attend_mask(row_pos[:, None], key_pos[None, :], sink, win[:, None])  # [R, Bk]
      s = jnp.where(mask, s * logit_scale, MASKED)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.exp2(s - m_new[:, None])
    correction = jnp.exp2(m - m_new)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    return acc * correction[:, None] + pv, m_new, l * correction + jnp.sum(p, axis=1)

  def cache_step(j, carry):
    slot = pl.multiple_of(j * cache_block_k, cache_block_k)
    return update(
      carry,
      ck_ref[pl.ds(slot, cache_block_k), :],
      cv_ref[pl.ds(slot, cache_block_k), :],
      cpos_ref[pl.ds(slot, cache_block_k)],
    )

  def chunk_keys(kb):
    key_start = pl.multiple_of(kb * block_k, block_k)
    return key_start, k_ref[pl.ds(key_start, block_k), :], v_ref[pl.ds(key_start, block_k), :]

  # The chunk's blocks: the window's [lo, hi) with interior [f0, f1) (translation invariant,
  # so read off key_block_ranges without its sink), and the chunk's own sink keys (positions
  # < sink: tokens [off, sink - start)) in blocks before lo.
  _, _, lo, f0, f1, hi = key_block_ranges(off, t0, t1, win_min, win_max, sink=0, block_k=block_k)
  sink_end = jnp.clip(sink - start, off, seq_len)
  sink_lo = lax.div(off, block_k)
  sink_hi = jnp.where(
    sink_end > off,
    jnp.clip(lax.div(sink_end + block_k - 1, block_k), sink_lo, jnp.maximum(lo, sink_lo)),
    sink_lo,
  )
  n_sink, n_lead = sink_hi - sink_lo, f0 - lo

  def masked_step(j, carry):
    kb = jnp.where(
      j < n_sink,
      sink_lo + j,
      jnp.where(j < n_sink + n_lead, lo + (j - n_sink), f1 + (j - n_sink - n_lead)),
    )
    key_start, k, v = chunk_keys(kb)
    key = key_start + lax.iota(jnp.int32, block_k)
    key_pos = jnp.where((key >= off) & (key < seq_len), key + start, -1)
    return update(carry, k, v, key_pos)

  def interior_step(kb, carry):
    _, k, v = chunk_keys(kb)
    return update(carry, k, v, None)

  # The cache: its sink slots always; its ring only when a query's window reaches before the
  # chunk's first real token.
  sink_blocks = jnp.int32(-(-sink_slots // cache_block_k))
  needs_ring = first - win_max + 1 < off
  n_cache = jnp.where(
    first > t1,
    jnp.int32(0),
    jnp.where(needs_ring, jnp.int32(capacity // cache_block_k), sink_blocks),
  )
  # (explicit int32: weakly typed Python ints here gave Triton a loop bound of another type)
  carry = (
    jnp.zeros((rows, head_dim), jnp.float32),
    jnp.full((rows,), MASKED, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )
  carry = lax.fori_loop(0, n_cache, cache_step, carry)
  carry = lax.fori_loop(0, n_sink + n_lead + hi - f1, masked_step, carry)
  acc, m, l = lax.fori_loop(f0, f1, interior_step, carry)
  attended = m > MASKED / 2  # [R]
  out = jnp.where(attended[:, None], acc / jnp.where(attended, l, 1.0)[:, None], 0.0)
  o_ref[...] = out.astype(o_ref.dtype)


def _is_power_of_two(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


@functools.partial(
  jax.jit,
  static_argnames=("scale", "block_rows", "block_k", "num_warps", "num_stages", "interpret"),
)
def chunk_gpu(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  cache: MoACache,
  *,
  scale: float | None = None,
  block_rows: int | None = None,
  block_k: int | None = None,
  num_warps: int | None = None,
  num_stages: int | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Pallas Triton chunk attention: the contract of `chunk_reference`, one launch per group.

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H] (keys after RoPE; cast to the cache's dtype, as the
      cache will store them), any G = N / K; H a power of two >= 16.
    q_pos: [B, T] int32, each row's real positions contiguous, ending at index T - 1.
    cache: the cache before this chunk is written; capacities multiples of 16.
    block_rows: query rows (tokens x G heads, flattened) per program, a power of two >= 16
      (default 128; 64 for float32). block_k: chunk keys per block, a power of two >= 16
      (default 64); cache slots go in blocks of the largest power of two <= block_k that
      divides the group's capacity. num_warps: 8 for 128-row tiles with H >= 128, else 4.
  Returns:
    [B, T, N, H] in q's dtype; padding rows are zero.
  """
  layout = cache.layout
  _check_inputs(q, k, v, q_pos, layout)
  b, t, n, h = q.shape
  g = layout.group_size
  dtype = cache.k[0].dtype
  wide = jnp.dtype(dtype).itemsize > 2
  block_rows = (64 if wide else 128) if block_rows is None else block_rows
  block_k = 64 if block_k is None else block_k
  if num_warps is None:  # as the prefill kernel's measured defaults
    num_warps = 4 if h <= 64 or block_rows <= 64 else 8
  num_stages = (2 if wide else 3) if num_stages is None else num_stages
  if not _is_power_of_two(h) or h < 16:
    raise ValueError(f"the Triton chunk kernel needs a power-of-two head_dim >= 16, got {h}")
  for name, value in (("block_rows", block_rows), ("block_k", block_k)):
    if not _is_power_of_two(value) or value < 16:
      raise ValueError(f"{name} must be a power of two >= 16, got {value}")
  scale = h**-0.5 if scale is None else scale
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

  real = jnp.sum(q_pos >= 0, axis=1).astype(jnp.int32)  # [B]
  off = t - real  # [B] left padding of each row in this chunk
  start = (q_pos[:, -1] - (t - 1)).astype(jnp.int32)  # [B] position of token 0, extrapolated
  rows_pad = -(-t * g // block_rows) * block_rows
  keys_pad = -(-t // block_k) * block_k
  outs = []
  for group, qg, win, ck, cv, cpos in zip(
    layout.groups, _group_heads(q, layout), _group_windows(layout), cache.k, cache.v, cache.pos
  ):
    heads = np.asarray(group.heads)
    kg, capacity = len(heads), group.capacity
    cache_block_k = block_k
    while capacity % cache_block_k:
      cache_block_k //= 2
    if cache_block_k < 16:
      raise ValueError(
        f"cache capacity {capacity} is not a multiple of 16: build the layout with slot_multiple=64"
      )
    rows = qg.astype(dtype).reshape(b, t, kg, g, h).transpose(0, 2, 1, 3, 4)
    rows = jnp.pad(rows.reshape(b, kg, t * g, h), ((0, 0), (0, 0), (0, rows_pad - t * g), (0, 0)))
    chunk_k, chunk_v = (
      jnp.pad(
        x[:, :, heads].astype(dtype).transpose(0, 2, 1, 3),
        ((0, 0), (0, 0), (0, keys_pad - t), (0, 0)),
      )
      for x in (k, v)
    )
    row_windows = jnp.asarray(
      np.clip(win, 0, np.iinfo(np.int32).max)[:, np.arange(rows_pad) % g], jnp.int32
    )  # [K_g, rows_pad]: row r holds head r % G
    kernel = functools.partial(
      _chunk_kernel,
      group=g,
      seq_len=t,
      sink=layout.sink,
      sink_slots=group.sink_slots,
      block_k=block_k,
      cache_block_k=cache_block_k,
      logit_scale=scale * math.log2(math.e),
      precision=precision,
    )
    per_row = pl.BlockSpec((None,), lambda i, bi, ki: (bi,))
    head_seq = lambda s: pl.BlockSpec((None, None, s, h), lambda i, bi, ki: (bi, ki, 0, 0))
    tile = pl.BlockSpec((None, None, block_rows, h), lambda i, bi, ki: (bi, ki, i, 0))
    out = pl.pallas_call(
      kernel,
      grid=(rows_pad // block_rows, b, kg),
      in_specs=[
        per_row,
        per_row,
        pl.BlockSpec((None, block_rows), lambda i, bi, ki: (ki, i)),
        tile,
        head_seq(keys_pad),
        head_seq(keys_pad),
        head_seq(capacity),
        head_seq(capacity),
        pl.BlockSpec((None, capacity), lambda i, bi, ki: (bi, 0)),
      ],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(rows.shape, q.dtype),
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="moa_chunk_prefill",
    )(off, start, row_windows, rows, chunk_k, chunk_v, ck, cv, cpos)  # [B, K_g, rows_pad, H]
    out = out[:, :, : t * g].reshape(b, kg, t, g, h).transpose(0, 2, 1, 3, 4)
    outs.append(out)  # [B, T, K_g, G, H]
  return _merge_groups(outs, layout)
