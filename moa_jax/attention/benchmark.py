"""Timing harness and plan/cache builders for the attention kernel benchmarks on a GPU.

Shared by experiments/bench_attention.py (the benchmark grid) and
experiments/gpu_check_kernels.py (launch-setting sweeps). The grid's shapes: 32 query heads,
head dim 128, bf16, sink 64; plans are per-KV-group windows of a target density, uniform or
mixed (two windows, cycled over the groups).
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.attention import cache as cache_lib
from moa_jax.plans.rules import attended_pairs, kv_density

SINK = 64
HEADS, HEAD_DIM = 32, 128
DTYPE = jnp.bfloat16
MIX = np.array([0.25, 1.75])  # relative windows of the mixed plans (2 rules per layer), cycled


def runner(fn, chain: bool = False):
  """jit of (shared, queries, eps) -> [fn(*shared, q) for q in queries]: all arrays arguments.

  chain: each query adds eps (a runtime zero) times the previous output, so the calls depend on
  each other and XLA cannot merge them into one batched matmul over the shared K/V (its dot
  merger does that to independent einsums, which would time one read of K/V for all calls).
  """

  def calls(shared, queries, eps):
    outs = []
    for q in queries:
      if chain and outs:
        q = q + eps * outs[-1].astype(q.dtype)
      outs.append(fn(*shared, q))
    return outs

  return jax.jit(calls)


def time_calls(
  fn,
  shared,
  queries,
  *,
  samples: int = 7,
  warmup: int = 2,
  chain: bool = False,
  min_sample_s: float = 5e-3,
) -> float:
  """Median seconds of one call fn(*shared, q), timed over the calls on all `queries` per sample.

  `fn` is a function or a `runner` (reused across calls with same-shaped arguments). One sample
  dispatches the jitted runner back to back (asynchronously) until it holds about
  `min_sample_s` of work, then waits once: the host's dispatch and wait (~0.25 ms per jitted
  call on the H100 machine) overlap the device work instead of adding to each sample.
  """
  run = fn if hasattr(fn, "lower") else runner(fn, chain)
  eps = jnp.zeros((), queries[0].dtype)
  for _ in range(warmup):
    jax.block_until_ready(run(shared, queries, eps))
  start = time.perf_counter()
  jax.block_until_ready(run(shared, queries, eps))
  launches = max(1, min(64, math.ceil(min_sample_s / (time.perf_counter() - start))))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(launches):
      out = run(shared, queries, eps)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / (launches * len(queries)))
  return statistics.median(times)


def normal(key, shape, i: int, dtype=DTYPE) -> jax.Array:
  """Fresh standard-normal data on the device (draw i of `key`)."""
  return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def bisect(predicate, lo: float, hi: float, iters: int = 60) -> float:
  """Smallest x in [lo, hi] with predicate(x) true (predicate monotone)."""
  for _ in range(iters):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if predicate(mid) else (mid, hi)
  return hi


def plan_windows(kind: str, density: float, n: int, groups: int) -> np.ndarray:
  """int [groups] windows ("uniform" or "mixed") whose mean attention density at n is ~density."""
  full = n * (n + 1) / 2

  def windows(c):
    rel = np.ones(groups) if kind == "uniform" else np.resize(MIX, groups)
    return np.clip(np.round(c * rel), 64, n).astype(np.int64)

  c = bisect(lambda c: attended_pairs(windows(c), SINK, n).mean() / full >= density, 1, 4 * n)
  return windows(c)


def decode_windows(kind: str, density: float, context: int, kv_heads: int) -> np.ndarray:
  """int [K] per-group windows whose KV density at `context` is ~density."""
  if density >= 1:
    return np.full(kv_heads, context)
  rel = np.ones(kv_heads) if kind == "uniform" else np.resize(MIX, kv_heads)
  windows = lambda c: np.clip(np.round(c * rel), 64, context).astype(np.int64)
  return windows(bisect(lambda c: kv_density(windows(c), SINK, context) >= density, 1, context))


def full_cache(layout, batch: int, context: int, key) -> cache_lib.MoACache:
  """A cache as it stands after `context` tokens: random K/V, the positions the ring holds."""
  last = context - 1
  k, v, pos = [], [], []
  for i, group in enumerate(layout.groups):
    slot = np.arange(group.capacity)
    ring = np.maximum(slot - group.sink_slots, 0)
    newest = last - (last - group.sink_slots - ring) % max(group.ring, 1)
    src = np.where(slot < group.sink_slots, slot, newest)
    held = (src <= last) & ((slot < group.sink_slots) | (src >= group.sink_slots))
    shape = (batch, len(group.heads), group.capacity, HEAD_DIM)
    k.append(normal(key, shape, 2 * i))
    v.append(normal(key, shape, 2 * i + 1))
    pos.append(
      jnp.asarray(np.broadcast_to(np.where(held, src, -1), (batch, group.capacity)), jnp.int32)
    )
  return cache_lib.MoACache(tuple(k), tuple(v), tuple(pos), layout)
