"""Decode attention over the MoA cache: one new query token per row attends its cached keys.

Two implementations of one contract, both token-exact (`rules.attend_mask` on the stored slot
positions, each query head with its own window):
  * `decode_xla`: grouped einsums per cache group (any backend, GQA without repeating K/V);
  * `decode_gpu`: a Pallas Triton split-K kernel (flash decoding): the program for (split, row,
    KV head) streams its share of that head's slots once and stacks the G query heads of the
    group (padded to 16 rows for the tensor cores); the splits are merged in float32.
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

from moa_jax.cache import CacheLayout, MoACache
from moa_jax.plans.rules import attend_mask

MASKED = -1e30
MIN_ROWS = 16  # smallest M of a Triton dot


def _group_windows(layout: CacheLayout, heads) -> jax.Array:
  """[heads_g, G] int32 windows of the query heads of the given KV heads."""
  g = layout.group_size
  return jnp.asarray([layout.windows[h * g:(h + 1) * g] for h in heads], jnp.int32)


def _split_heads(q: jax.Array, layout: CacheLayout) -> list[jax.Array]:
  """q [B, N, H] -> per cache group [B, heads_g, G, H]."""
  b, n, h = q.shape
  qk = q.reshape(b, layout.num_kv_heads, layout.group_size, h)
  return [qk[:, np.asarray(group.heads)] for group in layout.groups]


def _merge_heads(outs: list[jax.Array], layout: CacheLayout) -> jax.Array:
  """Per group [B, heads_g, G, H] -> [B, N, H] in KV-head order."""
  inverse = np.argsort([h for group in layout.groups for h in group.heads])
  out = jnp.concatenate(outs, axis=1)[:, inverse]  # [B, K, G, H]
  return out.reshape(out.shape[0], -1, out.shape[-1])


def decode_xla(q: jax.Array, q_pos: jax.Array, cache: MoACache, *,
               scale: float | None = None) -> jax.Array:
  """q [B, N, H] at positions [B] over the cache (already holding this token) -> [B, N, H]."""
  layout = cache.layout
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  outs = []
  for group, qg, k, v, pos in zip(layout.groups, _split_heads(q, layout), cache.k, cache.v,
                                  cache.pos):
    win = _group_windows(layout, group.heads)  # [Kg, G]
    mask = attend_mask(q_pos[:, None, None, None], pos[:, None, None, :], layout.sink,
                       win[None, :, :, None])  # [B, Kg, G, C]
    logits = jnp.einsum("bkgh,bkch->bkgc", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, MASKED)
    weights = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    outs.append(jnp.einsum("bkgc,bkch->bkgh", weights.astype(v.dtype), v,
                           preferred_element_type=jnp.float32).astype(q.dtype))
  return _merge_heads(outs, layout)


def _decode_kernel(qpos_ref, win_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, m_ref, l_ref, *,
                   block_k: int, blocks_per_split: int, num_blocks: int, sink: int,
                   logit_scale: float, precision):
  """One (split, row, KV head) program: q_ref [M, H] (G heads padded to M), k_ref/v_ref [C, H],
  pos_ref [C], win_ref [M]; writes the split's unnormalised o [M, H], max m [M], sum l [M]."""
  split = pl.program_id(0)
  q = q_ref[...]
  rows = q.shape[0]
  q_pos = qpos_ref[...]
  win = win_ref[...]

  def body(kb, carry):
    acc, m, l = carry
    start = pl.multiple_of(kb * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]  # [Bk, H]
    v = v_ref[pl.ds(start, block_k), :]
    key_pos = pos_ref[pl.ds(start, block_k)]  # [Bk]
    mask = attend_mask(q_pos, key_pos[None, :], sink, win[:, None])  # [M, Bk]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=precision) * logit_scale
    s = jnp.where(mask, s, MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
    correction = jnp.exp2(m - m_new)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    return acc * correction[:, None] + pv, m_new, l * correction + jnp.sum(p, axis=1)

  lo = split * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, num_blocks)
  carry = (jnp.zeros((rows, q.shape[1]), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, carry)
  o_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _decode_group_gpu(q, q_pos, win, k, v, pos, *, sink, scale, block_k, splits, num_warps,
                      num_stages, interpret):
  """q [B, Kg, G, H], win [Kg, G], k/v [B, Kg, C, H], pos [B, C] -> [B, Kg, G, H]."""
  b, kv_heads, group, h = q.shape
  capacity = k.shape[2]
  rows = max(MIN_ROWS, 1 << (group - 1).bit_length())
  if rows != group:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    win = jnp.pad(win, ((0, 0), (0, rows - group)))
  num_blocks = capacity // block_k
  blocks_per_split = -(-num_blocks // splits)
  splits = -(-num_blocks // blocks_per_split)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _decode_kernel, block_k=block_k, blocks_per_split=blocks_per_split, num_blocks=num_blocks,
      sink=sink, logit_scale=scale * math.log2(math.e), precision=precision)
  part = lambda *shape: pl.BlockSpec((None, None, None, *shape),
                                     lambda s, bi, ki: (s, bi, ki) + (0,) * len(shape))
  o, m, l = pl.pallas_call(
      kernel,
      grid=(splits, b, kv_heads),
      in_specs=[
          pl.BlockSpec((None,), lambda s, bi, ki: (bi,)),
          pl.BlockSpec((None, rows), lambda s, bi, ki: (ki, 0)),
          pl.BlockSpec((None, None, rows, h), lambda s, bi, ki: (bi, ki, 0, 0)),
          pl.BlockSpec((None, None, capacity, h), lambda s, bi, ki: (bi, ki, 0, 0)),
          pl.BlockSpec((None, None, capacity, h), lambda s, bi, ki: (bi, ki, 0, 0)),
          pl.BlockSpec((None, capacity), lambda s, bi, ki: (bi, 0)),
      ],
      out_specs=[part(rows, h), part(rows), part(rows)],
      out_shape=[jax.ShapeDtypeStruct((splits, b, kv_heads, rows, h), jnp.float32),
                 jax.ShapeDtypeStruct((splits, b, kv_heads, rows), jnp.float32),
                 jax.ShapeDtypeStruct((splits, b, kv_heads, rows), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="moa_decode",
  )(q_pos.astype(jnp.int32), win, q, k, v, pos)
  m_all = m.max(0)  # [B, Kg, M]
  weight = jnp.exp2(m - m_all[None])  # [S, B, Kg, M]
  denom = jnp.sum(weight * l, axis=0)
  out = jnp.sum(weight[..., None] * o, axis=0) / jnp.maximum(denom, 1e-30)[..., None]
  return out[:, :, :group].astype(q.dtype)


def default_splits(batch: int, kv_heads: int, num_blocks: int, target_programs: int) -> int:
  """Key splits so that splits * batch * KV heads reaches about `target_programs`."""
  return max(1, min(num_blocks, -(-target_programs // (batch * kv_heads))))


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "target_programs", "num_warps",
                                             "num_stages", "interpret"))
def decode_gpu(q: jax.Array, q_pos: jax.Array, cache: MoACache, *, scale: float | None = None,
               block_k: int = 64, target_programs: int = 528, num_warps: int = 4,
               num_stages: int = 2, interpret: bool = False) -> jax.Array:
  """Pallas Triton decode: q [B, N, H] at positions [B] over the cache -> [B, N, H].

  H must be a power of two >= 16 and cache capacities multiples of 16 (`make_layout`'s
  slot_multiple); a group whose capacity `block_k` does not divide uses the largest power of two
  below it that does. Each head's slots are split so that about `target_programs` programs run.
  """
  layout = cache.layout
  h = q.shape[-1]
  if h < 16 or h & (h - 1):
    raise ValueError(f"the Triton decode kernel needs a power-of-two head_dim >= 16, got {h}")
  scale = h ** -0.5 if scale is None else scale
  outs = []
  for group, qg, k, v, pos in zip(layout.groups, _split_heads(q, layout), cache.k, cache.v,
                                  cache.pos):
    group_block = block_k
    while group.capacity % group_block:
      group_block //= 2
    if group_block < MIN_ROWS:
      raise ValueError(f"cache capacity {group.capacity} is not a multiple of {MIN_ROWS}: build "
                       "the layout with slot_multiple=64")
    n_splits = default_splits(q.shape[0], len(group.heads), group.capacity // group_block,
                              target_programs)
    outs.append(_decode_group_gpu(
        qg, q_pos, _group_windows(layout, group.heads), k, v, pos, sink=layout.sink, scale=scale,
        block_k=group_block, splits=n_splits, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret))
  return _merge_heads(outs, layout)
