"""Pick the MoA kernels for the backend: GPU -> Pallas Triton, TPU -> Pallas Mosaic, CPU -> jnp.

`impl` names an implementation explicitly ("triton", "mosaic", "reference"); with
`interpret=True` the Pallas kernels run on the CPU (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.attention import decode as decode_lib
from moa_jax.attention.prefill_gpu import sparse_prefill_gpu
from moa_jax.attention.prefill_tpu import sparse_prefill_tpu
from moa_jax.attention.reference import reference_attention
from moa_jax.cache import MoACache

IMPLS = ("triton", "mosaic", "reference")
_BY_BACKEND = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}


def default_impl() -> str:
  """The implementation for `jax.default_backend()` (reference on CPU)."""
  return _BY_BACKEND.get(jax.default_backend(), "reference")


def _check(impl: str | None) -> str:
  impl = default_impl() if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
  return impl


def _static_max(windows) -> int | None:
  """The largest window as a Python int when `windows` is concrete, else None (traced)."""
  try:
    return int(np.max(np.asarray(windows)))
  except jax.errors.TracerArrayConversionError:
    return None


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, windows, *,
                      sink: int, scale: float | None = None, impl: str | None = None,
                      interpret: bool = False) -> jax.Array:
  """MoA self-attention of a left-padded prompt: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

  windows: int [N] (per query head) or [K] (per KV group). See `sparse_prefill_gpu`.
  """
  impl = _check(impl)
  max_window = _static_max(windows)
  windows = jnp.asarray(windows, jnp.int32)
  if impl == "triton":
    return sparse_prefill_gpu(q, k, v, q_pos, windows, sink=sink, scale=scale,
                              interpret=interpret)
  if impl == "mosaic":
    return sparse_prefill_tpu(q, k, v, q_pos, windows, sink=sink, scale=scale,
                              max_window=max_window, interpret=interpret)
  return reference_attention(q, k, v, q_pos, q_pos, windows=windows, sink=sink, scale=scale)


def decode_attention(q: jax.Array, q_pos: jax.Array, cache: MoACache, *,
                     scale: float | None = None, impl: str | None = None,
                     interpret: bool = False) -> jax.Array:
  """One query token per row, q [B, N, H] at positions [B], over the MoA cache -> [B, N, H].

  GPU: the Pallas split-K kernel; TPU and CPU: grouped XLA einsums.
  """
  if _check(impl) == "triton":
    return decode_lib.decode_gpu(q, q_pos, cache, scale=scale, interpret=interpret)
  return decode_lib.decode_xla(q, q_pos, cache, scale=scale)
