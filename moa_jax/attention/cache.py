"""The static per-head MoA KV cache (docs/method.md section 6).

Every KV head keeps `s` sink slots (positions 0..s-1) and a ring buffer for later positions:
position p >= s lives in slot s + (p - s) mod ring. The ring holds at least the head's window
(for GQA with per-query-head rules: the group's largest window), so after a write at position
p it holds every key p - W < j <= p the rule lets the next queries see; keys are stored after
RoPE together with their positions, so ring order never matters and the decode mask is
`rules.attend_mask` on the stored positions (-1: empty slot).

Sizes are fixed once per request from the planned total length N: capacity
min(s + W, N) slots, rounded up to `slot_multiple`. KV heads of equal capacity form one group
with arrays [B, heads, C, H], so every shape is static under jit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.plans.rules import DEFAULT_SINK


@dataclasses.dataclass(frozen=True)
class CacheGroup:
  """KV heads sharing one capacity: `heads` (KV head indices), `sink_slots` + `ring` slots."""

  heads: tuple[int, ...]
  sink_slots: int
  ring: int

  @property
  def capacity(self) -> int:
    return self.sink_slots + self.ring


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """Static layout of one layer's cache: windows per query head [N], sink, groups of KV heads."""

  windows: tuple[int, ...]
  sink: int
  num_kv_heads: int
  groups: tuple[CacheGroup, ...]

  @property
  def group_size(self) -> int:
    return len(self.windows) // self.num_kv_heads

  def slots(self) -> int:
    """Cache slots over all KV heads (one row of the batch)."""
    return sum(len(g.heads) * g.capacity for g in self.groups)


def make_layout(
  windows, num_kv_heads: int, max_length: int, *, sink: int = DEFAULT_SINK, slot_multiple: int = 64
) -> CacheLayout:
  """Layout for query-head windows [N] at planned total length `max_length`.

  Each KV head caches its group's largest window; capacity = min(sink + W, max_length) rounded
  up to a multiple of `slot_multiple` (never past max_length rounded up).
  """
  windows = np.asarray(windows, np.int64)
  num_heads = windows.shape[-1]
  if windows.ndim != 1 or num_heads % num_kv_heads:
    raise ValueError(
      f"windows must be [N] with N a multiple of {num_kv_heads}, got {windows.shape}"
    )
  if max_length <= 0 or sink < 0 or slot_multiple <= 0:
    raise ValueError(
      f"need max_length > 0, sink >= 0, slot_multiple > 0; got {max_length}, "
      f"{sink}, {slot_multiple}"
    )
  group_windows = windows.reshape(num_kv_heads, -1).max(-1)  # [K]
  sink_slots = min(sink, max_length)
  round_up = lambda x: -(-x // slot_multiple) * slot_multiple
  capacity = np.minimum(
    round_up(np.minimum(sink_slots + group_windows, max_length)), round_up(max_length)
  )
  groups = tuple(
    CacheGroup(
      heads=tuple(int(h) for h in np.flatnonzero(capacity == c)),
      sink_slots=sink_slots,
      ring=int(c) - sink_slots,
    )
    for c in sorted(set(capacity.tolist()))
  )
  return CacheLayout(
    windows=tuple(int(w) for w in windows), sink=sink, num_kv_heads=num_kv_heads, groups=groups
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoACache:
  """One layer's MoA cache (a pytree; `layout` is static).

  k, v: per group [B, heads_g, C_g, H] keys (after RoPE) and values; pos: per group [B, C_g]
  int32 position held by each slot (-1: empty), shared by the group's heads. fresh (static):
  nothing written yet (`init_cache`); every write returns fresh=False, so a jitted call knows
  at trace time whether it prefills a fresh request or on top of earlier tokens.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pos: tuple[jax.Array, ...]
  layout: CacheLayout = dataclasses.field(metadata=dict(static=True))
  fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))


def init_cache(layout: CacheLayout, batch_size: int, head_dim: int, dtype) -> MoACache:
  """An empty cache for `layout`."""
  shape = lambda g: (batch_size, len(g.heads), g.capacity, head_dim)
  return MoACache(
    k=tuple(jnp.zeros(shape(g), dtype) for g in layout.groups),
    v=tuple(jnp.zeros(shape(g), dtype) for g in layout.groups),
    pos=tuple(jnp.full((batch_size, g.capacity), -1, jnp.int32) for g in layout.groups),
    layout=layout,
    fresh=True,
  )


def slot_of(pos: jax.Array, group: CacheGroup) -> jax.Array:
  """Slot holding position `pos` (>= 0) in a group's cache."""
  ring_slot = group.sink_slots + (pos - group.sink_slots) % max(group.ring, 1)
  return jnp.where(pos < group.sink_slots, pos, ring_slot)


def write(cache: MoACache, k: jax.Array, v: jax.Array, pos: jax.Array) -> MoACache:
  """Store this call's keys/values [B, T, K, H] at positions [B, T].

  Each row's new positions must be contiguous and end at index T - 1 (left padding: negative
  positions first). A slot takes the newest new key that maps to it, else keeps its old one;
  so a prompt longer than a head's cache leaves the sink and the last `ring` positions.
  """
  if k.shape[1] == 1:
    return _append(cache, k[:, 0], v[:, 0], pos[:, 0])
  t = k.shape[1]
  last = pos[:, -1]  # [B] newest position of each row
  first = last - jnp.sum(pos >= 0, axis=1) + 1  # [B] oldest new position
  new_k, new_v, new_pos = [], [], []
  for group, ck, cv, cpos in zip(cache.layout.groups, cache.k, cache.v, cache.pos):
    slot = jnp.arange(group.capacity)[None, :]  # [1, C]
    ring_slot = jnp.maximum(slot - group.sink_slots, 0)
    newest = last[:, None] - (last[:, None] - group.sink_slots - ring_slot) % max(group.ring, 1)
    src = jnp.where(slot < group.sink_slots, slot, newest)  # [B, C] position for each slot
    lowest = jnp.where(slot < group.sink_slots, 0, group.sink_slots)
    fresh = (src >= jnp.maximum(first[:, None], lowest)) & (src <= last[:, None])  # [B, C]
    index = jnp.clip(src - last[:, None] + t - 1, 0, t - 1)  # [B, C] index into this call
    heads = jnp.asarray(group.heads)

    def gather(x, old):  # x [B, T, K, H] -> [B, heads, C, H], merged with the old slots
      taken = jnp.take_along_axis(x[:, :, heads], index[:, :, None, None], axis=1)
      return jnp.where(fresh[:, None, :, None], taken.transpose(0, 2, 1, 3).astype(old.dtype), old)

    new_k.append(gather(k, ck))
    new_v.append(gather(v, cv))
    new_pos.append(jnp.where(fresh, src, cpos).astype(jnp.int32))
  return MoACache(tuple(new_k), tuple(new_v), tuple(new_pos), cache.layout)


def _append(cache: MoACache, k: jax.Array, v: jax.Array, pos: jax.Array) -> MoACache:
  """Store one token per row: k, v [B, K, H] at positions [B] (negative: nothing written)."""
  rows = jnp.arange(k.shape[0])
  new_k, new_v, new_pos = [], [], []
  for group, ck, cv, cpos in zip(cache.layout.groups, cache.k, cache.v, cache.pos):
    slot = jnp.where(pos >= 0, slot_of(pos, group), group.capacity)  # out of range: dropped
    heads = jnp.asarray(group.heads)
    new_k.append(ck.at[rows, :, slot].set(k[:, heads].astype(ck.dtype), mode="drop"))
    new_v.append(cv.at[rows, :, slot].set(v[:, heads].astype(cv.dtype), mode="drop"))
    new_pos.append(cpos.at[rows, slot].set(pos.astype(jnp.int32), mode="drop"))
  return MoACache(tuple(new_k), tuple(new_v), tuple(new_pos), cache.layout)
