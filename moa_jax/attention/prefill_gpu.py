"""Block-sparse MoA prefill on GPU: a Pallas kernel lowered through Triton.

One program computes one query tile for one KV head: the tile stacks the G query heads of the
group (rows r = token * G' + head), so every key/value block is loaded once for the whole group.
Triton tiles are powers of two, so a group of any other size G (GQA ratios 3, 5, 7, 24, ...) is
padded to G' (the next power of two) with copies of its last head, whose rows are dropped.
The program reads its per-row windows and the sequence's left-padding offset from int32
operands and loops only over the key blocks the rule can reach:

  1. the sink blocks that lie before the window's first block (masked element-wise),
  2. the window's blocks: the edge blocks masked element-wise, the interior blocks (every
     (query, key) pair of the tile attended) with no mask at all.

One loop walks the masked blocks (sink, leading window edge, diagonal: their indices computed
from the loop counter), a second the interior blocks, with no branch in either. The masked
loop may use smaller key blocks (`edge_block_k`) than the interior loop, so that less of the
edges' masked-out keys is computed; interior blocks then start on an edge-block boundary and
the interior's remainder (less than one interior block) joins the masked loop. With
`single_loop` one loop walks everything and branches per block on whether it needs the mask
(one software-pipeline prologue instead of two; up to 6.5% slower on the H100, so not the
default).

Softmax is online, in float32, in base 2 (log2(e) folded into the logit scale; interior blocks
take the row max on unscaled logits and scale inside exp2's argument, one fused multiply-add per
logit). Positions are
those of `moa_jax.attention.base`: within a row, token i of a sequence with `pad` left-padding
tokens has position i - pad; the mask is `rules.attend_mask` on those positions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from moa_jax.plans.rules import (
  MASKED_LOGIT,
  attend_mask,
  expand_to_query_heads,
  key_block_ranges,
  num_blocks,
)


def prefill_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int]:
  """(B, T, N, H, K) of prefill inputs q [B, T, N, H], k/v [B, T, K, H]; clear error otherwise."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if k.shape != (b, t, kv_heads, h) or v.shape != k.shape:
    raise ValueError(
      f"k and v must be [B, T, K, H] = {(b, t, kv_heads, h)}, got {k.shape}, {v.shape}"
    )
  if n % kv_heads:
    raise ValueError(f"{n} query heads are not a multiple of {kv_heads} KV heads")
  return b, t, n, h, kv_heads


def _is_power_of_two(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _prefill_kernel(
  off_ref,
  win_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  *,
  group: int,
  block_k: int,
  edge_block_k: int,
  num_q_blocks: int,
  seq_len: int,
  sink: int,
  logit_scale: float,
  precision,
  single_loop: bool,
):
  """One (query tile, batch row, KV head) program.

  Refs: off_ref [] int32 (left padding of this row), win_ref [R] int32 (window of each tile
  row), q_ref / o_ref [Tq, G, H] (R = Tq * G rows), k_ref / v_ref [S, H].

  Masked logits are set to MASKED_LOGIT. A row that has attended nothing yet has
  m = MASKED_LOGIT, so its masked entries contribute exp2(0) = 1; the first attended key rescales
  them by exp2(MASKED_LOGIT - m) = 0, and a row that never attends anything keeps
  m = MASKED_LOGIT and writes 0.
  """
  tile_tokens, _, head_dim = q_ref.shape
  rows = tile_tokens * group
  q_block = num_q_blocks - 1 - pl.program_id(0)  # heaviest tiles first
  t0 = q_block * tile_tokens  # first and last real token index of the tile (the rows past
  t1 = jnp.minimum(t0 + tile_tokens - 1, seq_len - 1)  # seq_len are sliced off)
  off = off_ref[...]
  win = win_ref[...]  # [R]
  win_max = jnp.max(win)
  win_min = jnp.min(win)

  q = q_ref[...].reshape(rows, head_dim)  # [R, H]
  row_pos = t0 + lax.div(lax.iota(jnp.int32, rows), group) - off  # [R]

  def apply_mask(s, start):
    key_idx = start + lax.iota(jnp.int32, s.shape[1])
    key_pos = jnp.where(key_idx < seq_len, key_idx - off, -1)  # [Bk]
    mask = attend_mask(row_pos[:, None], key_pos[None, :], sink, win[:, None])  # [R, Bk]
    return jnp.where(mask, s, MASKED_LOGIT)

  def update(start, size, carry, masked):
    """Online-softmax step over keys [start, start + size); masked: bool or traced bool."""
    acc, m, l = carry
    k = k_ref[pl.ds(start, size), :]  # [Bk, H]
    v = v_ref[pl.ds(start, size), :]
    s = lax.dot_general(
      q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )  # [R, Bk], unscaled logits
    if masked is False:  # scale inside exp2's argument: one fused multiply-add per logit
      m_new = jnp.maximum(m, jnp.max(s, axis=1) * logit_scale)  # [R]
      p = jnp.exp2(s * logit_scale - m_new[:, None])
    else:
      s = s * logit_scale  # base-2 logits
      if masked is True:
        s = apply_mask(s, start)
      else:
        s = lax.cond(masked, apply_mask, lambda s, _: s, s, start)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.exp2(s - m_new[:, None])
    correction = jnp.exp2(m - m_new)
    l = l * correction + jnp.sum(p, axis=1)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
    return acc * correction[:, None] + pv, m_new, l

  carry = (
    jnp.zeros((rows, head_dim), jnp.float32),
    jnp.full((rows,), MASKED_LOGIT, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )
  if single_loop:  # one pipelined loop: the sink blocks, then the window's blocks
    sink_lo, sink_hi, lo, f0, f1, hi = key_block_ranges(
      off, t0, t1, win_min, win_max, sink=sink, block_k=block_k
    )
    n_sink = sink_hi - sink_lo

    def step(j, carry):
      kb = jnp.where(j < n_sink, sink_lo + j, lo + (j - n_sink))
      start = pl.multiple_of(kb * block_k, block_k)
      return update(start, block_k, carry, (kb < f0) | (kb >= f1))

    acc, m, l = lax.fori_loop(0, n_sink + hi - lo, step, carry)
  else:  # two loops: the masked blocks (sink, leading edge, diagonal), then the interior
    # Ranges in edge blocks; the interior [f0, f1) is walked in steps of `ratio` edge blocks
    # and its remainder [tail, f1) is masked with the diagonal blocks [f1, hi).
    sink_lo, sink_hi, lo, f0, f1, hi = key_block_ranges(
      off, t0, t1, win_min, win_max, sink=sink, block_k=edge_block_k
    )
    ratio = block_k // edge_block_k
    n_interior = lax.div(f1 - f0, ratio)
    tail = f0 + n_interior * ratio
    n_sink, n_lead = sink_hi - sink_lo, f0 - lo

    def masked_step(j, carry):
      lead_or_tail = jnp.where(j < n_sink + n_lead, lo + (j - n_sink), tail + (j - n_sink - n_lead))
      kb = jnp.where(j < n_sink, sink_lo + j, lead_or_tail)
      start = pl.multiple_of(kb * edge_block_k, edge_block_k)
      return update(start, edge_block_k, carry, True)

    def interior_step(i, carry):
      start = pl.multiple_of(f0 * edge_block_k + i * block_k, edge_block_k)
      return update(start, block_k, carry, False)

    carry = lax.fori_loop(0, n_sink + n_lead + hi - tail, masked_step, carry)
    acc, m, l = lax.fori_loop(0, n_interior, interior_step, carry)
  attended = m > MASKED_LOGIT / 2  # [R]
  out = jnp.where(attended[:, None], acc / jnp.where(attended, l, 1.0)[:, None], 0.0)  # [R, H]
  o_ref[...] = out.reshape(tile_tokens, group, head_dim).astype(o_ref.dtype)


def launch_defaults(
  *,
  group: int,
  head_dim: int,
  seq_len: int,
  itemsize: int,
  single_loop: bool = False,
  block_rows: int | None = None,
) -> dict:
  """Launch settings measured fastest on the H100 (benchmarks/attention_notes.md).

  A given block_rows is kept and the other settings follow from it.

  2-byte inputs: 128 rows, 128-key blocks, 64-key edge blocks, 8 warps, 3 stages. Without GQA
  (G = 1) and T <= 16k: 64 rows, 64-key blocks, 4 warps (at 16k faster at attention density
  0.125, equal at 0.25; at 32k 128 rows win). float32: 64-key blocks and 2 stages (a 128-key,
  3-stage pipeline exceeds the H100's shared memory). 4 warps for H <= 64 or 64 rows;
  single_loop: edge blocks = block_k.
  """
  wide = itemsize > 2
  if block_rows is None:
    block_rows = 64 if group == 1 and not wide and seq_len <= 16384 else 128
  block_k = 64 if wide or block_rows <= 64 else 128
  return dict(
    block_rows=block_rows,
    block_k=block_k,
    edge_block_k=block_k if single_loop else min(64, block_k),
    num_warps=4 if head_dim <= 64 or block_rows <= 64 else 8,
    num_stages=2 if wide else 3,
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "sink",
    "scale",
    "block_rows",
    "block_k",
    "edge_block_k",
    "num_warps",
    "num_stages",
    "single_loop",
    "interpret",
  ),
)
def sparse_prefill_gpu(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  windows: jax.Array,
  *,
  sink: int,
  scale: float | None = None,
  block_rows: int | None = None,
  block_k: int | None = None,
  edge_block_k: int | None = None,
  num_warps: int | None = None,
  num_stages: int | None = None,
  single_loop: bool = False,
  interpret: bool = False,
) -> jax.Array:
  """MoA self-attention of a prompt: query t attends key j iff `attend_mask` allows it.

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H] (keys after RoPE); bf16, fp16 or fp32. N = K * G (any
      G); H a power of two >= 16.
    q_pos: [B, T] int32 positions, left padded: row b's token i has position i - pad_b
      (negative on the pad_b padding tokens).
    windows: int [N] (per query head) or [K] (per KV group) windows in tokens, may be traced.
    sink: sink tokens of every head.
    block_rows: query rows per program (tokens x G' stacked heads, G' = G rounded up to a
      power of two), a power of two >= 16 * G'.
    block_k: keys per block, a power of two >= 16.
    edge_block_k: keys per block of the masked loop (two loops only), a power of two >= 16
      that divides block_k.
    single_loop: walk the sink and window blocks in one loop, masking a block only when it is
      an edge block (a branch per block); False: a loop over the masked blocks, then one over
      the interior blocks.
    None picks `launch_defaults` (measured fastest on the H100).
  Returns:
    [B, T, N, H] in q's dtype; padding rows are zero.
  """
  b, t, n, h, kv_heads = prefill_shapes(q, k, v)
  group = n // kv_heads
  stacked = 1 << (group - 1).bit_length()  # G': the group padded to a power of two
  defaults = launch_defaults(
    group=stacked,
    head_dim=h,
    seq_len=t,
    itemsize=q.dtype.itemsize,
    single_loop=single_loop,
    block_rows=block_rows,
  )
  block_rows = defaults["block_rows"]
  block_k = defaults["block_k"] if block_k is None else block_k
  if edge_block_k is None:
    edge_block_k = block_k if single_loop else min(defaults["edge_block_k"], block_k)
  num_warps = defaults["num_warps"] if num_warps is None else num_warps
  num_stages = defaults["num_stages"] if num_stages is None else num_stages
  if not _is_power_of_two(h) or h < 16:
    raise ValueError(f"the Triton kernel needs a power-of-two head_dim >= 16, got {h}")
  if not _is_power_of_two(block_k) or block_k < 16:
    raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
  if not _is_power_of_two(edge_block_k) or not 16 <= edge_block_k <= block_k:
    raise ValueError(
      f"edge_block_k must be a power of two in [16, block_k = {block_k}], got {edge_block_k}"
    )
  if single_loop and edge_block_k != block_k:
    raise ValueError("single_loop walks one block size: leave edge_block_k at block_k")
  if not _is_power_of_two(block_rows) or block_rows < 16 * stacked:
    raise ValueError(
      f"block_rows must be a power of two >= 16 * G' = {16 * stacked} (G' = "
      f"{stacked}: {group} query heads per KV head rounded up), got {block_rows}"
    )
  tile_tokens = block_rows // stacked
  scale = h**-0.5 if scale is None else scale
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

  win = expand_to_query_heads(jnp.asarray(windows, jnp.int32), n)
  win = jnp.clip(win, 0, t).reshape(kv_heads, group)  # [K, G]
  if stacked != group:  # G -> G': copies of each group's last head (same key blocks)
    widths = ((0, 0), (0, 0), (0, 0), (0, stacked - group), (0, 0))
    q = jnp.pad(q.reshape(b, t, kv_heads, group, h), widths, mode="edge")
    q = q.reshape(b, t, kv_heads * stacked, h)
    win = jnp.pad(win, ((0, 0), (0, stacked - group)), mode="edge")  # [K, G']
  pad_to = max(tile_tokens, block_k)
  t_pad = num_blocks(t, pad_to) * pad_to
  if t_pad != t:  # pad the tail; tail keys are masked in the kernel, tail rows sliced off
    widths = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  # Left padding of each row, read off its last real token: pad_b = (T - 1) - q_pos[b, T - 1].
  offsets = ((t - 1) - q_pos[:, t - 1]).astype(jnp.int32)  # [B]
  row_windows = jnp.tile(win, (1, tile_tokens))  # [K, R]: row r holds head r % G'

  num_q_blocks = t_pad // tile_tokens
  kernel = functools.partial(
    _prefill_kernel,
    group=stacked,
    block_k=block_k,
    edge_block_k=edge_block_k,
    num_q_blocks=num_q_blocks,
    seq_len=t,
    sink=sink,
    logit_scale=scale * math.log2(math.e),
    precision=precision,
    single_loop=single_loop,
  )
  tile = pl.BlockSpec(
    (None, tile_tokens, stacked, h), lambda i, bi, ki: (bi, num_q_blocks - 1 - i, ki, 0)
  )
  full_kv = pl.BlockSpec((None, t_pad, None, h), lambda i, bi, ki: (bi, 0, ki, 0))
  out = pl.pallas_call(
    kernel,
    grid=(num_q_blocks, b, kv_heads),
    in_specs=[
      pl.BlockSpec((None,), lambda i, bi, ki: (bi,)),
      pl.BlockSpec((None, block_rows), lambda i, bi, ki: (ki, 0)),
      tile,
      full_kv,
      full_kv,
    ],
    out_specs=tile,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="moa_sparse_prefill",
  )(offsets, row_windows, q, k, v)
  out = out[:, :t].reshape(b, t, kv_heads, stacked, h)[:, :, :, :group]
  return out.reshape(b, t, n, h)
