"""Block-sparse MoA prefill on Hopper GPUs: a Pallas Mosaic GPU kernel (wgmma, TMA, warpgroups).

One program computes 2 * block_q query rows of one query head with three warpgroups: a
producer issues TMA copies of the program's key/value blocks into a ring of `num_stages` shared
memory slots; two consumers (block_q rows each) run QK^T and PV on the tensor cores (wgmma)
and the online softmax, taking turns through a schedule barrier so that one's softmax overlaps
the other's matrix products. The key blocks are those the rule reaches: the sink blocks before
the window, then the window's blocks; each consumer masks (with `rules.attend_mask`) only the
blocks that are not fully attended for its rows.

The windows are static (one Python int per query head or per KV group, as a plan gives them)
and the rows are unpadded (positions 0..T-1): `dispatch` uses this kernel for such inputs on
sm_90 and the Triton kernel otherwise. Softmax in float32, base 2; masked logits are
MASKED_LOGIT, so a row with nothing attended yet never produces NaN. Programs are per query head
(reading the keys of KV head n // G), so every GQA ratio G = N / K runs as it is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.attention.prefill_gpu import prefill_shapes
from moa_jax.plans.rules import (
  MASKED_LOGIT,
  attend_mask,
  expand_to_query_heads,
  key_block_ranges,
  num_blocks,
)

COMPUTE_WARPGROUPS = 2


def _lookup(index, values: Sequence[int]):
  """values[index] for a traced int32 scalar index and a static table (a select chain)."""
  out = jnp.int32(values[0])
  for i, value in enumerate(values[1:], start=1):
    out = jnp.where(index == i, jnp.int32(value), out)
  return out


def _kernel(
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  scratch,
  *,
  windows: tuple[int, ...],
  group: int,
  sink: int,
  logit_scale: float,
  block_q: int,
  block_kv: int,
  num_stages: int,
):
  """One (query head, row tile of 2 * block_q, batch row) program; refs [B, T, N|K, H]."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # GPU-only module

  (qo_smem, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scratch
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  wg = lax.axis_index("wg")
  kv_head = lax.div(head, jnp.int32(group))
  win = _lookup(head, windows)
  tile0 = lax.axis_index("q_seq") * (COMPUTE_WARPGROUPS * block_q)
  tile1 = tile0 + COMPUTE_WARPGROUPS * block_q - 1
  # Key blocks of the program (rows unpadded): sink blocks [0, n_sink), window blocks [lo, hi).
  _, n_sink, lo, _, _, hi = key_block_ranges(
    jnp.int32(0), tile0, tile1, win, win, sink=sink, block_k=block_kv
  )
  n_steps = n_sink + hi - lo

  def key_block(step):
    return jnp.where(step < n_sink, step, lo + step - n_sink)

  def take_turn():
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)

  @pl.when(wg < COMPUTE_WARPGROUPS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_smem = qo_smem.at[wg]
    row0 = tile0 + wg * block_q
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, block_q), head], q_smem, q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    # Window blocks fully attended by every row of this warpgroup: [full0, full1) (the
    # warpgroup's block range lies within the program's [lo, hi)).
    *_, full0, full1, _ = key_block_ranges(
      jnp.int32(0), row0, row0 + block_q - 1, win, win, sink=sink, block_k=block_kv
    )
    first_full, end_full = n_sink + full0 - lo, n_sink + full1 - lo

    reduced = plgpu.Layout.WGMMA.reduce(1)
    m = plgpu.layout_cast(jnp.full((block_q,), MASKED_LOGIT, jnp.float32), reduced)
    l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), reduced)
    acc = plgpu.layout_cast(jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(n_steps > 0)
    def _():
      plgpu.barrier_wait(k_ready.at[0])

    pl.when(wg == 1)(take_turn)  # the second consumer starts half a step behind

    def step_fn(step, carry, masked: bool):
      acc, m, l = carry
      slot = lax.rem(step, jnp.int32(num_stages))

      def qk_product(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        take_turn()
        return acc_ref[...]

      s = pl.run_scoped(qk_product, plgpu.ACC((block_q, block_kv), jnp.float32))  # [bq, bkv]
      plgpu.barrier_arrive(k_free.at[slot])
      if masked:
        rows = row0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        keys = key_block(step) * block_kv + plgpu.broadcasted_iota(
          jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA
        )
        s = jnp.where(attend_mask(rows, keys, sink, win), s * logit_scale, MASKED_LOGIT)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      else:  # scale inside exp2's argument: one fused multiply-add per logit
        m_new = jnp.maximum(m, s.max(axis=1) * logit_scale)
        p = jnp.exp2(s * logit_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
      correction = jnp.exp2(m - m_new)
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
      l = l * correction + p.sum(axis=1)
      p = p.astype(q_ref.dtype)
      acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
      plgpu.barrier_arrive(turn)  # softmax done: the other consumer may use the tensor cores
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(turn)

      def pv_product(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])

        @pl.when(step + 1 < n_steps)
        def _():
          plgpu.barrier_wait(k_ready.at[lax.rem(step + 1, jnp.int32(num_stages))])

      acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    carry = (acc, m, l)
    carry = lax.fori_loop(0, first_full, functools.partial(step_fn, masked=True), carry)
    carry = lax.fori_loop(first_full, end_full, functools.partial(step_fn, masked=False), carry)
    acc, m, l = lax.fori_loop(end_full, n_steps, functools.partial(step_fn, masked=True), carry)
    pl.when(wg == 0)(take_turn)
    inverse = jnp.where(m > MASKED_LOGIT / 2, 1.0 / l, 0.0)  # rows with no attended key write 0
    q_smem[...] = (acc * lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(q_ref.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(row0, block_q), head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def copy(step, slot):
      keys = (batch, pl.ds(key_block(step) * block_kv, block_kv), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    for slot in range(num_stages):
      pl.when(slot < n_steps)(functools.partial(copy, slot, slot))

    @pl.loop(0, n_steps - num_stages)
    def _(i):
      slot = lax.rem(i, jnp.int32(num_stages))
      step = i + num_stages
      keys = (batch, pl.ds(key_block(step) * block_kv, block_kv), kv_head)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])


@functools.partial(
  jax.jit, static_argnames=("windows", "sink", "scale", "block_q", "block_kv", "num_stages")
)
def sparse_prefill_hopper(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  windows: tuple[int, ...],
  *,
  sink: int,
  scale: float | None = None,
  block_q: int = 64,
  block_kv: int = 128,
  num_stages: int = 2,
) -> jax.Array:
  """MoA self-attention of unpadded prompts (positions 0..T-1) on an sm_90 GPU.

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H] (keys after RoPE); bf16 or fp16; H a multiple of 64.
    windows: static per query head (N ints) or per KV group (K ints) windows in tokens.
    sink: sink tokens of every head.
    block_q: rows per consumer warpgroup (a multiple of 64); block_kv: keys per block (a
      multiple of 64); num_stages: key/value blocks in flight.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  import jax.experimental.pallas.mosaic_gpu as plgpu  # GPU-only module

  b, t, n, h, kv_heads = prefill_shapes(q, k, v)
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
      f"the Hopper kernel takes bf16 or fp16 q/k/v, got {q.dtype}, {k.dtype}, {v.dtype}"
    )
  if h % 64:
    raise ValueError(f"the Hopper kernel needs head_dim a multiple of 64, got {h}")
  if block_q % 64 or block_kv % 64 or num_stages < 2:
    raise ValueError(
      f"block_q and block_kv must be multiples of 64 and num_stages >= 2, got "
      f"{block_q}, {block_kv}, {num_stages}"
    )
  if len(windows) not in (n, kv_heads):
    raise ValueError(
      f"windows must give {n} query heads or {kv_heads} KV groups, got {len(windows)}"
    )
  per_head = tuple(int(w) for w in np.clip(expand_to_query_heads(windows, n), 0, t))
  pad_to = math.lcm(COMPUTE_WARPGROUPS * block_q, block_kv)
  t_pad = num_blocks(t, pad_to) * pad_to
  if t_pad != t:  # tail rows are sliced off; tail keys are later than every real row
    widths = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  scale = h**-0.5 if scale is None else scale
  swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  scratch = (
    (
      plgpu.SMEM((COMPUTE_WARPGROUPS, block_q, h), q.dtype, **swizzled),
      plgpu.SMEM((num_stages, block_kv, h), q.dtype, **swizzled),
      plgpu.SMEM((num_stages, block_kv, h), q.dtype, **swizzled),
    ),
    (
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),
    ),
    (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=num_stages),) * 2,
    plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
  )
  kernel = functools.partial(
    _kernel,
    windows=per_head,
    group=n // kv_heads,
    sink=sink,
    logit_scale=scale * math.log2(math.e),
    block_q=block_q,
    block_kv=block_kv,
    num_stages=num_stages,
  )

  def entry(q_ref, k_ref, v_ref, o_ref):
    pl.run_scoped(
      lambda *scoped: kernel(q_ref, k_ref, v_ref, o_ref, scoped), *scratch, collective_axes="wg"
    )

  out = plgpu.kernel(
    entry,
    out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
    grid=(n, t_pad // (COMPUTE_WARPGROUPS * block_q), b),
    grid_names=("heads", "q_seq", "batch"),
    num_threads=COMPUTE_WARPGROUPS + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v)
  return out[:, :t]
