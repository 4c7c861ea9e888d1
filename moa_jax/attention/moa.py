"""The MoA `Attention` backend: sparse prefill kernel, static per-head cache, token-exact decode."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from moa_jax.attention import cache as cache_lib
from moa_jax.attention import chunk as chunk_lib
from moa_jax.attention import dispatch
from moa_jax.attention.cache import MoACache
from moa_jax.plans.rules import DEFAULT_SINK, expand_to_query_heads

Windows = np.ndarray | Callable[[int], np.ndarray]


class MoAAttention:
  """MoA attention for every layer of a model (implements `Attention` and `init_cache`).

  Args:
    windows: int [L, N] (per query head) or [L, K] (per KV group) windows in tokens, or a
      function of the planned total length n returning them (e.g. `Plan.windows`).
    sink: sink tokens of every head.
    impl: "triton", "mosaic" or "reference" (default: by backend, see `dispatch`).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    slot_multiple: cache capacities are rounded up to this (the GPU decode kernel's block).

  Without a cache, a call of T tokens uses the windows at n = T. `init_cache` fixes the windows
  at the planned total length `max_length` and stores them in each layer's cache layout; calls
  with a cache use those. With a cache, T = 1 decodes (write, then `decode_attention`) and
  T > 1 prefills on top of whatever the cache holds (a fresh prompt, the next chunk of one, a
  new turn): the chunk attends the cache and itself (`attention/chunk.py`), then is
  written. Positions must continue each row's cached positions.
  """

  def __init__(
    self,
    windows: Windows,
    *,
    sink: int = DEFAULT_SINK,
    impl: str | None = None,
    interpret: bool = False,
    slot_multiple: int = 64,
  ):
    self.windows = windows if callable(windows) else np.asarray(windows, np.int64)
    if not callable(windows) and self.windows.ndim != 2:
      raise ValueError(f"windows must be [layers, heads], got shape {self.windows.shape}")
    self.sink = sink
    self.impl = impl
    self.interpret = interpret
    self.slot_multiple = slot_multiple

  @classmethod
  def from_plan(cls, plan, **kwargs) -> MoAAttention:
    """Windows and sink of a `moa_jax.plans.plan.Plan` (windows at each request's length)."""
    return cls(plan.windows, sink=plan.sink, **kwargs)

  def layer_windows(self, length: int, num_heads: int) -> np.ndarray:
    """int64 [L, N] windows of every query head at planned total length `length`."""
    windows = np.asarray(self.windows(length) if callable(self.windows) else self.windows)
    if windows.ndim != 2 or num_heads % windows.shape[1]:
      raise ValueError(f"windows of shape {windows.shape} do not fit {num_heads} query heads")
    return expand_to_query_heads(windows, num_heads).astype(np.int64)

  def __call__(
    self,
    layer: int,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    cache: MoACache | None,
  ) -> tuple[jax.Array, MoACache | None]:
    """q [B, T, N, H], k/v [B, T, K, H], q_pos [B, T] -> ([B, T, N, H], updated cache)."""
    t, n = q.shape[1], q.shape[2]
    if cache is None:
      windows = self.layer_windows(t, n)[layer]
      return self._prefill(q, k, v, q_pos, windows), None
    if t > 1:
      return self._chunk(q, k, v, q_pos, cache), cache_lib.write(cache, k, v, q_pos)
    cache = cache_lib.write(cache, k, v, q_pos)
    out = dispatch.decode_attention(
      q[:, 0], q_pos[:, 0], cache, impl=self.impl, interpret=self.interpret
    )
    return out[:, None], cache

  def _chunk(self, q, k, v, q_pos, cache: MoACache) -> jax.Array:
    """T > 1 tokens over the cache before they are written. A fresh cache (nothing written:
    a new request, positions from 0) takes the sparse prefill kernel; on top of earlier tokens
    the chunk kernel on GPU, the reference elsewhere (TPU: no chunk kernel yet)."""
    if cache.fresh:
      return self._prefill(q, k, v, q_pos, np.asarray(cache.layout.windows))
    impl = dispatch.default_impl() if self.impl is None else self.impl
    if impl in ("mosaic_gpu", "triton"):
      return chunk_lib.chunk_gpu(q, k, v, q_pos, cache, interpret=self.interpret)
    return chunk_lib.chunk_reference(q, k, v, q_pos, cache)

  def _prefill(self, q, k, v, q_pos, windows):
    return dispatch.prefill_attention(
      q, k, v, q_pos, windows, sink=self.sink, impl=self.impl, interpret=self.interpret
    )

  def layouts(self, config, max_length: int) -> list[cache_lib.CacheLayout]:
    """Per layer the cache layout at planned total length `max_length`."""
    windows = self.layer_windows(max_length, config.num_heads)
    return [
      cache_lib.make_layout(
        w, config.num_kv_heads, max_length, sink=self.sink, slot_multiple=self.slot_multiple
      )
      for w in windows
    ]

  def init_cache(self, config, batch_size: int, max_length: int, dtype=None) -> list[MoACache]:
    """Empty MoA caches (one per layer) for requests of planned total length `max_length`."""
    dtype = config.dtype if dtype is None else dtype
    return [
      cache_lib.init_cache(layout, batch_size, config.head_dim, dtype)
      for layout in self.layouts(config, max_length)
    ]

  def memory_ratio(self, config, max_length: int) -> float:
    """Cache slots over all layers / the dense GQA cache's (L * K * max_length): KV density."""
    slots = sum(layout.slots() for layout in self.layouts(config, max_length))
    return slots / (config.num_layers * config.num_kv_heads * max_length)
