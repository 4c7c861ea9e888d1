"""Decode attention over the MoA cache: one new query token per row attends its cached keys.

Two implementations of one contract, both token-exact (`rules.attend_mask` on the stored slot
positions, each query head with its own window):
  * `decode_xla`: grouped einsums per cache group (any backend, GQA without repeating K/V);
  * `decode_gpu`: one Pallas Triton launch for all cache groups (flash decoding): the program
    for (cache group, split, row, KV head) streams its share of that head's slots once and
    stacks the G query heads of the group (within 16 rows for the tensor cores); with one split
    per head it writes the output itself, else the splits are merged in float32 by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from moa_jax.attention.cache import CacheLayout, MoACache
from moa_jax.plans.rules import MASKED_LOGIT as MASKED
from moa_jax.plans.rules import attend_mask

MIN_ROWS = 16  # smallest M of a Triton dot


def _group_windows(layout: CacheLayout, heads) -> jax.Array:
  """[heads_g, G] int32 windows of the query heads of the given KV heads."""
  g = layout.group_size
  return jnp.asarray([layout.windows[h * g : (h + 1) * g] for h in heads], jnp.int32)


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


def decode_xla(
  q: jax.Array, q_pos: jax.Array, cache: MoACache, *, scale: float | None = None
) -> jax.Array:
  """q [B, N, H] at positions [B] over the cache (already holding this token) -> [B, N, H]."""
  layout = cache.layout
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  outs = []
  for group, qg, k, v, pos in zip(
    layout.groups, _split_heads(q, layout), cache.k, cache.v, cache.pos
  ):
    win = _group_windows(layout, group.heads)  # [Kg, G]
    mask = attend_mask(
      q_pos[:, None, None, None], pos[:, None, None, :], layout.sink, win[None, :, :, None]
    )  # [B, Kg, G, C]
    logits = jnp.einsum("bkgh,bkch->bkgc", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, MASKED)
    weights = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    outs.append(
      jnp.einsum(
        "bkgc,bkch->bkgh", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
      ).astype(q.dtype)
    )
  return _merge_heads(outs, layout)


@dataclasses.dataclass(frozen=True)
class _GroupPrograms:
  """Static work split of one cache group: programs first..first + splits * B * len(heads)."""

  heads: tuple[int, ...]
  block_k: int
  num_blocks: int
  blocks_per_split: int
  splits: int
  first: int

  def count(self, batch: int) -> int:
    return self.splits * batch * len(self.heads)


def _decode_kernel(
  qpos_ref,
  win_ref,
  q_ref,
  *refs,
  plans: tuple[_GroupPrograms, ...],
  batch: int,
  group: int,
  rows: int,
  sink: int,
  logit_scale: float,
  precision,
  split_out: bool,
):
  """Program p serves one (cache group, split, row, KV head), read off the static `plans`.

  q_ref [B, N', H] (N' >= rows query heads), win_ref [N'], qpos_ref [B]; per cache group
  k_ref / v_ref [B, Kg, C, H] and pos_ref [B, C]. The program loads `rows` query heads that
  contain its KV head's G heads, streams its share of that head's slots once, and stores only
  its G rows: the normalised output o [B, N', H] (split_out False), else the split's
  unnormalised o [S, B, N', H], max m [S, B, N'] and sum l [S, B, N'] (float32).

  Masked logits are MASKED: a row that attended nothing yet adds exp2(0) = 1 per masked key,
  which the first attended key rescales by exp2(MASKED - m) = 0; a row that attends nothing
  keeps m = MASKED (the split merge and the normalisation read that as empty).
  """
  cache_refs, out_refs = refs[: 3 * len(plans)], refs[3 * len(plans) :]
  program = pl.program_id(0)
  n_rows = q_ref.shape[1]
  head_dim = q_ref.shape[2]

  for index, plan in enumerate(plans):
    k_ref, v_ref, pos_ref = cache_refs[3 * index : 3 * index + 3]
    kv_heads = len(plan.heads)

    @pl.when((program >= plan.first) & (program < plan.first + plan.count(batch)))
    def _(plan=plan, k_ref=k_ref, v_ref=v_ref, pos_ref=pos_ref, kv_heads=kv_heads):
      local = program - plan.first
      split = lax.div(local, batch * kv_heads)
      b = lax.div(lax.rem(local, batch * kv_heads), kv_heads)
      head = lax.rem(local, kv_heads)  # index within the group
      kv_head = jnp.int32(plan.heads[0]) + head  # global KV head
      if plan.heads != tuple(range(plan.heads[0], plan.heads[0] + kv_heads)):
        for i, h in enumerate(plan.heads[1:], 1):
          kv_head = jnp.where(head == i, h, kv_head)
      first_row = kv_head * group
      start = jnp.minimum(first_row, n_rows - rows)
      q = q_ref[b, pl.ds(start, rows), :]  # [M, H]
      win = win_ref[pl.ds(start, rows)]  # [M]
      q_pos = qpos_ref[b]
      block_k = plan.block_k

      def body(kb, carry):
        acc, m, l = carry
        key_start = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[b, head, pl.ds(key_start, block_k), :]  # [Bk, H]
        v = v_ref[b, head, pl.ds(key_start, block_k), :]
        key_pos = pos_ref[b, pl.ds(key_start, block_k)]  # [Bk]
        mask = attend_mask(q_pos, key_pos[None, :], sink, win[:, None])  # [M, Bk]
        s = (
          lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
          )
          * logit_scale
        )
        s = jnp.where(mask, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        correction = jnp.exp2(m - m_new)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
        return acc * correction[:, None] + pv, m_new, l * correction + jnp.sum(p, axis=1)

      lo = split * plan.blocks_per_split
      hi = jnp.minimum(lo + plan.blocks_per_split, plan.num_blocks)
      carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
      )
      acc, m, l = lax.fori_loop(lo, hi, body, carry)
      row = start + lax.iota(jnp.int32, rows)
      mine = (row >= first_row) & (row < first_row + group)  # [M]
      mine_2d = jnp.broadcast_to(mine[:, None], (rows, head_dim))
      if split_out:
        o_ref, m_ref, l_ref = out_refs
        pl_triton.store(o_ref.at[split, b, pl.ds(start, rows), :], acc, mask=mine_2d)
        pl_triton.store(m_ref.at[split, b, pl.ds(start, rows)], m, mask=mine)
        pl_triton.store(l_ref.at[split, b, pl.ds(start, rows)], l, mask=mine)
      else:
        (o_ref,) = out_refs
        attended = m > MASKED / 2
        out = jnp.where(attended[:, None], acc / jnp.where(attended, l, 1.0)[:, None], 0.0)
        pl_triton.store(o_ref.at[b, pl.ds(start, rows), :], out.astype(o_ref.dtype), mask=mine_2d)


def plan_programs(
  layout: CacheLayout, batch: int, *, block_k: int, target_programs: int, min_split_blocks: int
) -> tuple[_GroupPrograms, ...]:
  """Split every cache group's slots so that all programs stream about the same number of
  key blocks: blocks per split = max(min_split_blocks, all blocks / target_programs). Groups
  with the most blocks per program come first (they start first on the GPU)."""
  blocks = []
  for group in layout.groups:
    group_block = block_k
    while group.capacity % group_block:
      group_block //= 2
    if group_block < MIN_ROWS:
      raise ValueError(
        f"cache capacity {group.capacity} is not a multiple of {MIN_ROWS}: build "
        "the layout with slot_multiple=64"
      )
    blocks.append((group, group_block, group.capacity // group_block))
  total = sum(batch * len(group.heads) * nb for group, _, nb in blocks)
  per_split = max(min_split_blocks, -(-total // target_programs))
  plans, first = [], 0
  order = sorted(blocks, key=lambda x: -min(x[2], per_split) * x[1])
  for group, group_block, nb in order:
    per = min(per_split, nb)
    splits = -(-nb // per)
    per = -(-nb // splits)  # balance the splits of this group
    plan = _GroupPrograms(
      heads=group.heads,
      block_k=group_block,
      num_blocks=nb,
      blocks_per_split=per,
      splits=splits,
      first=first,
    )
    plans.append(plan)
    first += plan.count(batch)
  return tuple(plans)


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "block_k",
    "target_programs",
    "min_split_blocks",
    "num_warps",
    "num_stages",
    "interpret",
  ),
)
def decode_gpu(
  q: jax.Array,
  q_pos: jax.Array,
  cache: MoACache,
  *,
  scale: float | None = None,
  block_k: int = 64,
  target_programs: int = 528,
  min_split_blocks: int = 16,
  num_warps: int = 4,
  num_stages: int = 3,
  interpret: bool = False,
) -> jax.Array:
  """Pallas Triton decode: q [B, N, H] at positions [B] over the cache -> [B, N, H].

  One launch serves every cache group. H must be a power of two >= 16 and cache capacities
  multiples of 16 (`make_layout`'s slot_multiple); a group whose capacity `block_k` does not
  divide uses the largest power of two below it that does. Each head's slots are split so that
  about `target_programs` programs run, none with fewer than `min_split_blocks` blocks; when no
  head is split the kernel writes the output itself, else one fused XLA op merges the splits.
  """
  layout = cache.layout
  b, n, h = q.shape
  group = layout.group_size
  if h < 16 or h & (h - 1):
    raise ValueError(f"the Triton decode kernel needs a power-of-two head_dim >= 16, got {h}")
  scale = h**-0.5 if scale is None else scale
  rows = max(MIN_ROWS, 1 << (group - 1).bit_length())  # query heads per program (dot M)
  n_rows = max(n, rows)
  windows = np.zeros(n_rows, np.int32)
  windows[:n] = layout.windows
  if n_rows != n:  # fewer query heads than one dot needs: pad (their rows are never stored)
    q = jnp.pad(q, ((0, 0), (0, n_rows - n), (0, 0)))
  plans = plan_programs(
    layout, b, block_k=block_k, target_programs=target_programs, min_split_blocks=min_split_blocks
  )
  split_out = any(plan.splits > 1 for plan in plans)
  max_splits = max(plan.splits for plan in plans)
  by_heads = {group.heads: i for i, group in enumerate(layout.groups)}
  cache_args = []
  for plan in plans:
    i = by_heads[plan.heads]
    cache_args += [cache.k[i], cache.v[i], cache.pos[i]]
  whole = lambda x: pl.BlockSpec(x.shape, lambda p, ndim=x.ndim: (0,) * ndim)
  operands = [q_pos.astype(jnp.int32), jnp.asarray(windows), q, *cache_args]
  if split_out:
    out_shape = [
      jax.ShapeDtypeStruct((max_splits, b, n_rows, h), jnp.float32),
      jax.ShapeDtypeStruct((max_splits, b, n_rows), jnp.float32),
      jax.ShapeDtypeStruct((max_splits, b, n_rows), jnp.float32),
    ]
  else:
    out_shape = [jax.ShapeDtypeStruct((b, n_rows, h), q.dtype)]
  kernel = functools.partial(
    _decode_kernel,
    plans=plans,
    batch=b,
    group=group,
    rows=rows,
    sink=layout.sink,
    logit_scale=scale * math.log2(math.e),
    precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    split_out=split_out,
  )
  outs = pl.pallas_call(
    kernel,
    grid=(sum(plan.count(b) for plan in plans),),
    in_specs=[whole(x) for x in operands],
    out_specs=[whole(x) for x in out_shape],
    out_shape=out_shape,
    compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="moa_decode",
  )(*operands)
  if split_out:
    o, m, l = outs  # [S, B, N', H], [S, B, N'], [S, B, N']
    splits_of_row = np.zeros(n_rows, np.int64)
    for plan in plans:
      for kv_head in plan.heads:
        splits_of_row[kv_head * group : (kv_head + 1) * group] = plan.splits
    written = jnp.asarray(np.arange(max_splits)[:, None, None] < splits_of_row[None, None, :])
    m = jnp.where(written, m, MASKED)  # unwritten splits hold garbage: never read them
    m_all = m.max(0)  # [B, N']
    weight = jnp.where(written, jnp.exp2(m - m_all[None]), 0.0)  # [S, B, N']
    denom = jnp.sum(weight * jnp.where(written, l, 0.0), axis=0)
    acc = jnp.sum(weight[..., None] * jnp.where(written[..., None], o, 0.0), axis=0)
    attended = (m_all > MASKED / 2)[..., None]
    out = jnp.where(attended, acc / jnp.where(attended, denom[..., None], 1.0), 0.0)
    out = out.astype(q.dtype)
  else:
    (out,) = outs
  return out[:, :n]
