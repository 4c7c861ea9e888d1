"""Attention on a device mesh (models/sharding.py): MoA under `shard_map` over the KV heads, and
any attention under plain sharding.

`ShardedMoAAttention` runs MoA's own kernels (`dispatch.prefill_attention`,
`dispatch.decode_attention`) and its static per-head cache (`attention/cache.py`) per device:
the tensor axis splits the KV heads, each device holds the cache groups of its heads, and the
batch is split over (data, fsdp) where it divides. Every device must run one program on arrays
of one shape, so all devices hold the same local layout: local slot i has one capacity on every
device. A plan with mixed windows would leave some devices' slots mostly empty, so the heads of
a layer are dealt out by capacity (`split_heads`): sorted from the largest, round r gives one
head to each device, and slot r's capacity is that round's largest. This is the layout with the
fewest slots per device among all that give each device K / tensor heads; `balance` reports how
full it is. When the dealt heads are not the ones a device's weights produce (its contiguous
K / tensor heads), q, k, v and the output move between devices (all-gathers over the tensor
axis, a few times the size of the call's q); otherwise nothing moves.

The devices' heads have different windows, and MoA's kernels read windows from the (static)
cache layout. So each distinct set of per-device windows gets its own copy of the attention
(`lax.switch` on the device's tensor index picks it; devices with equal windows share one): a
plan with two rules per layer needs at most a few copies per layer, a uniform plan one.

`HeadShardedAttention` wraps any attention (dense, MoA's reference path, the profiler's probes)
in sharding constraints only (heads over tensor, batch over (data, fsdp)); XLA partitions it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moa_jax.attention import dispatch
from moa_jax.attention.cache import CacheGroup, CacheLayout, MoACache
from moa_jax.attention.moa import MoAAttention
from moa_jax.models.sharding import TENSOR, batch_axes


@dataclasses.dataclass(frozen=True)
class HeadShards:
  """How one layer's KV heads and their cache are split over the tensor axis (static).

  local: the layout every device holds (local KV heads 0..m-1; its `windows` are device 0's,
    each device's own are in `windows`);
  heads: [devices][m] the global KV head in local slot i of device d;
  windows: [devices][m * G] the windows of those heads' query heads, in local order;
  used: slots the heads' own capacities need, summed over devices (one batch row).
  """

  local: CacheLayout
  heads: tuple[tuple[int, ...], ...]
  windows: tuple[tuple[int, ...], ...]
  used: int

  @property
  def devices(self) -> int:
    return len(self.heads)

  @property
  def allocated(self) -> int:
    """Slots held over all devices (one batch row): devices * the local layout's slots."""
    return self.devices * self.local.slots()

  @property
  def moves_heads(self) -> bool:
    """True when some device serves KV heads its own weights do not produce."""
    m = len(self.heads[0])
    return any(set(h) != set(range(d * m, (d + 1) * m)) for d, h in enumerate(self.heads))

  def query_heads(self) -> np.ndarray:
    """int [devices, m * G] global query head of every local query head."""
    g = self.local.group_size
    heads = np.asarray(self.heads)[:, :, None] * g + np.arange(g)  # [D, m, G]
    return heads.reshape(self.devices, -1)


def split_heads(layout: CacheLayout, devices: int, *, balance: bool = True) -> HeadShards:
  """Split a layer's cache layout over `devices` along the KV heads.

  balance=True deals the heads out by capacity (see the module docstring); False keeps every
  device on its contiguous K / devices heads (sorted by capacity within the device). The dealt
  split is used only where it needs fewer slots.
  """
  k = layout.num_kv_heads
  if k % devices:
    raise ValueError(f"{devices} devices on the tensor axis do not divide {k} KV heads")
  m = k // devices
  capacity = np.zeros(k, np.int64)
  for group in layout.groups:
    capacity[list(group.heads)] = group.capacity
  contiguous = [
    sorted(range(d * m, (d + 1) * m), key=lambda h: -capacity[h]) for d in range(devices)
  ]
  order = np.argsort(-capacity, kind="stable")
  dealt = [[int(order[r * devices + d]) for r in range(m)] for d in range(devices)]
  slot_capacity = lambda split: capacity[np.asarray(split)].max(0)  # [m]
  heads = contiguous
  if balance and slot_capacity(dealt).sum() < slot_capacity(contiguous).sum():
    heads = dealt
  slots = slot_capacity(heads)
  sink_slots = layout.groups[0].sink_slots
  groups = tuple(
    CacheGroup(
      heads=tuple(int(i) for i in np.flatnonzero(slots == c)),
      sink_slots=sink_slots,
      ring=int(c) - sink_slots,
    )
    for c in sorted(set(slots.tolist()), reverse=True)
  )
  g = layout.group_size
  windows = tuple(tuple(layout.windows[h * g + i] for h in row for i in range(g)) for row in heads)
  local = CacheLayout(windows=windows[0], sink=layout.sink, num_kv_heads=m, groups=groups)
  return HeadShards(
    local=local, heads=tuple(tuple(row) for row in heads), windows=windows, used=int(capacity.sum())
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedCache:
  """One layer's MoA cache on the mesh: per local group k, v [B, devices * heads_g, C_g, H]
  (device d's block of heads is its local group) and pos [B, C_g]; `shards` and `fresh`
  (nothing written yet, as `MoACache.fresh`) are static."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pos: tuple[jax.Array, ...]
  shards: HeadShards = dataclasses.field(metadata=dict(static=True))
  fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))


class ShardedMoAAttention:
  """MoA attention (`MoAAttention`) with its kernels and cache under `shard_map` on `mesh`.

  Implements `Attention` and `init_cache` like MoAAttention; balance=False keeps every device on
  the KV heads of its own weights (no data moves, more slots where windows are mixed).
  """

  def __init__(self, attention: MoAAttention, mesh: Mesh, *, balance: bool = True):
    self.attention = attention
    self.mesh = mesh
    self.balance = balance
    self.devices = mesh.shape[TENSOR]

  def shards(self, config, max_length: int) -> list[HeadShards]:
    """Per layer the split of the cache layout at planned total length `max_length`."""
    return [
      split_heads(layout, self.devices, balance=self.balance)
      for layout in self.attention.layouts(config, max_length)
    ]

  def balance_report(self, config, max_length: int) -> dict:
    """Cache slots per batch row: needed by the heads' own capacities vs. held by the devices
    (with and without dealing heads out), over all layers."""

    def totals(shards):
      used = sum(s.used for s in shards)
      allocated = sum(s.allocated for s in shards)
      return dict(
        used_slots=used,
        allocated_slots=allocated,
        slots_per_device=allocated // self.devices,
        fill=used / allocated,
      )

    balanced = self.shards(config, max_length)
    contiguous = [
      split_heads(layout, self.devices, balance=False)
      for layout in self.attention.layouts(config, max_length)
    ]
    return dict(
      devices=self.devices,
      max_length=max_length,
      balanced=totals(balanced),
      contiguous=totals(contiguous),
      layers_moving_heads=sum(s.moves_heads for s in balanced),
    )

  def specs(self, batch: int) -> dict[str, P]:
    """PartitionSpecs of a batch of `batch` rows: heads [B, T, N, H], cache [B, heads, C, H],
    pos [B, C] and rows [B, T]."""
    rows = batch_axes(self.mesh, batch)
    return dict(
      heads=P(rows, None, TENSOR, None),
      cache=P(rows, TENSOR, None, None),
      pos=P(rows, None),
      rows=P(rows, None),
    )

  def init_cache(self, config, batch_size: int, max_length: int, dtype=None) -> list[ShardedCache]:
    """Empty sharded caches (one per layer) for requests of planned total length `max_length`."""
    dtype = config.dtype if dtype is None else dtype
    specs = self.specs(batch_size)
    place = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
    caches = []
    for shards in self.shards(config, max_length):
      shape = lambda g: (batch_size, self.devices * len(g.heads), g.capacity, config.head_dim)
      groups = shards.local.groups
      caches.append(
        ShardedCache(
          k=tuple(place(jnp.zeros(shape(g), dtype), specs["cache"]) for g in groups),
          v=tuple(place(jnp.zeros(shape(g), dtype), specs["cache"]) for g in groups),
          pos=tuple(
            place(jnp.full((batch_size, g.capacity), -1, jnp.int32), specs["pos"]) for g in groups
          ),
          shards=shards,
          fresh=True,
        )
      )
    return caches

  def memory_ratio(self, config, max_length: int) -> float:
    """Cache slots held over all devices / the dense GQA cache's (L * K * max_length)."""
    slots = sum(s.allocated for s in self.shards(config, max_length))
    return slots / (config.num_layers * config.num_kv_heads * max_length)

  # ------------------------------------------------------------------ per-device computation

  def _per_device(self, table, branch):
    """Call `branch(row)`'s function with this device's row of a static [devices, ...] table.

    One program runs on every device, so a row that differs between devices selects its
    function by `lax.switch` on the device's tensor index; devices with equal rows share one.
    """
    rows, device_branch = np.unique(np.asarray(table), axis=0, return_inverse=True)
    functions = [branch(tuple(int(w) for w in row)) for row in rows]
    if len(functions) == 1:
      return functions[0]
    index = jnp.asarray(device_branch.reshape(-1), jnp.int32)[lax.axis_index(TENSOR)]
    return lambda *args: lax.switch(index, functions, *args)

  def __call__(
    self,
    layer: int,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    cache: ShardedCache | None,
  ) -> tuple[jax.Array, ShardedCache | None]:
    """q [B, T, N, H], k/v [B, T, K, H], q_pos [B, T] -> ([B, T, N, H], updated cache)."""
    b, t, n, _ = q.shape
    specs = self.specs(b)
    moa = self.attention
    if cache is None:
      windows = moa.layer_windows(t, n)[layer].reshape(self.devices, -1)  # contiguous heads

      def prefill(windows):
        return lambda q, k, v, q_pos: dispatch.prefill_attention(
          q, k, v, q_pos, np.asarray(windows), sink=moa.sink, impl=moa.impl, interpret=moa.interpret
        )

      run = jax.shard_map(
        lambda *args: self._per_device(windows, prefill)(*args),
        mesh=self.mesh,
        check_vma=False,
        in_specs=(specs["heads"],) * 3 + (specs["rows"],),
        out_specs=specs["heads"],
      )
      return run(q, k, v, q_pos), None

    shards = cache.shards
    query_heads = shards.query_heads()  # [D, m * G] global query heads of the local heads
    kv_heads = np.asarray(shards.heads)  # [D, m]
    m, n_local = kv_heads.shape[1], n // self.devices
    moves = shards.moves_heads
    # Local index (within the device's own contiguous heads) or global index of each local head.
    kv_index = kv_heads if moves else kv_heads - np.arange(self.devices)[:, None] * m
    q_index = query_heads if moves else query_heads - np.arange(self.devices)[:, None] * n_local
    # Where each of the device's own query heads sits in the (gathered) local outputs.
    owner = np.argsort(query_heads.reshape(-1)).reshape(self.devices, n_local)
    out_index = owner if moves else np.argsort(q_index, axis=1)

    def pick(x, index):
      """Heads `index` (this device's row) of x [b, T, heads, H], gathered first if moving."""
      if moves:
        x = lax.all_gather(x, TENSOR, axis=2, tiled=True)
      index = np.asarray(index)
      if index.shape[1] == x.shape[2] and (index == np.arange(x.shape[2])).all():
        return x
      if (index == index[:1]).all():
        return jnp.take(x, jnp.asarray(index[0]), axis=2)
      return jnp.take(x, jnp.asarray(index)[lax.axis_index(TENSOR)], axis=2)

    def attend(windows):  # MoAAttention itself on the device's cache, with its heads' windows
      layout = dataclasses.replace(shards.local, windows=windows)

      def run(q, k, v, q_pos, ck, cv, cpos):
        out, local = moa(layer, q, k, v, q_pos, MoACache(ck, cv, cpos, layout, cache.fresh))
        return out, local.k, local.v, local.pos

      return run

    def step(q, k, v, q_pos, ck, cv, cpos):
      q, k, v = pick(q, q_index), pick(k, kv_index), pick(v, kv_index)
      out, ck, cv, cpos = self._per_device(shards.windows, attend)(q, k, v, q_pos, ck, cv, cpos)
      return pick(out, out_index), ck, cv, cpos

    groups = len(shards.local.groups)
    cache_specs = ((specs["cache"],) * groups,) * 2 + ((specs["pos"],) * groups,)
    run = jax.shard_map(
      step,
      mesh=self.mesh,
      check_vma=False,
      in_specs=(specs["heads"],) * 3 + (specs["rows"],) + cache_specs,
      out_specs=(specs["heads"],) + cache_specs,
    )
    out, ck, cv, cpos = run(q, k, v, q_pos, cache.k, cache.v, cache.pos)
    return out, ShardedCache(ck, cv, cpos, shards)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadShardedAttention:
  """Any `Attention` with its q, k, v and output constrained to heads over the tensor axis and
  the batch over (data, fsdp); XLA partitions the attention itself (plain sharding)."""

  attention: object
  mesh: Mesh

  def _constrain(self, x: jax.Array) -> jax.Array:
    heads = TENSOR if x.shape[2] % self.mesh.shape[TENSOR] == 0 else None
    spec = P(batch_axes(self.mesh, x.shape[0]), None, heads, None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def __call__(self, layer, q, k, v, q_pos, cache):
    q, k, v = (self._constrain(x) for x in (q, k, v))
    out, cache = self.attention(layer, q, k, v, q_pos, cache)
    return self._constrain(out), cache

  def init_cache(self, *args, **kwargs):
    return self.attention.init_cache(*args, **kwargs)


def shard_attention(attention, mesh: Mesh):
  """MoA attention under shard_map (`ShardedMoAAttention`), any other under plain sharding."""
  if isinstance(attention, MoAAttention):
    return ShardedMoAAttention(attention, mesh)
  return HeadShardedAttention(attention, mesh)
