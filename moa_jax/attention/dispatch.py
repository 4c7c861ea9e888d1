"""Pick the MoA kernels for the backend: Hopper GPU -> Pallas Mosaic GPU prefill, other GPUs ->
Pallas Triton, TPU -> Pallas Mosaic, CPU -> jnp (prefill in query blocks, `blocked_attention`).

`impl` names an implementation explicitly ("mosaic_gpu", "triton", "mosaic", "reference"); with
`interpret=True` the Triton and Mosaic (TPU) kernels run on the CPU (tests). "mosaic_gpu" runs
the Hopper prefill kernel where it applies (bf16/fp16, head_dim a multiple of 64, static
windows, a batch without left padding) and the Triton kernels otherwise; it has no interpret
mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.attention import decode as decode_lib
from moa_jax.attention.cache import MoACache
from moa_jax.attention.prefill_gpu import sparse_prefill_gpu
from moa_jax.attention.prefill_hopper import sparse_prefill_hopper
from moa_jax.attention.prefill_tpu import sparse_prefill_tpu
from moa_jax.attention.reference import blocked_attention

IMPLS = ("mosaic_gpu", "triton", "mosaic", "reference")
_BY_BACKEND = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}


def gpu_impl(compute_capability: str | None) -> str:
  """ "mosaic_gpu" on Hopper (sm_90: wgmma and TMA), else "triton"."""
  return "mosaic_gpu" if compute_capability == "9.0" else "triton"


def default_impl() -> str:
  """The implementation for `jax.default_backend()` (reference on CPU)."""
  impl = _BY_BACKEND.get(jax.default_backend(), "reference")
  if impl == "triton":
    return gpu_impl(getattr(jax.devices()[0], "compute_capability", None))
  return impl


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


def prefill_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  windows,
  *,
  sink: int,
  scale: float | None = None,
  impl: str | None = None,
  interpret: bool = False,
) -> jax.Array:
  """MoA self-attention of a left-padded prompt: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

  windows: int [N] (per query head) or [K] (per KV group). See `sparse_prefill_gpu`.
  """
  impl = _check(impl)
  max_window = _static_max(windows)
  if impl == "mosaic_gpu":
    if interpret:
      raise ValueError("the Mosaic GPU kernel has no CPU interpret mode; use impl='triton'")
    if max_window is not None and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 64 == 0:
      static = tuple(int(w) for w in np.asarray(windows).reshape(-1))
      hopper = lambda q, k, v, q_pos: sparse_prefill_hopper(q, k, v, static, sink=sink, scale=scale)
      triton = lambda q, k, v, q_pos: sparse_prefill_gpu(
        q, k, v, q_pos, jnp.asarray(static, jnp.int32), sink=sink, scale=scale
      )
      unpadded = jnp.all(q_pos[:, 0] == 0)  # row b's first token has position -pad_b
      return jax.lax.cond(unpadded, hopper, triton, q, k, v, q_pos)
    impl = "triton"
  windows = jnp.asarray(windows, jnp.int32)
  if impl == "triton":
    return sparse_prefill_gpu(q, k, v, q_pos, windows, sink=sink, scale=scale, interpret=interpret)
  if impl == "mosaic":
    return sparse_prefill_tpu(
      q, k, v, q_pos, windows, sink=sink, scale=scale, max_window=max_window, interpret=interpret
    )
  return blocked_attention(q, k, v, q_pos, windows=windows, sink=sink, scale=scale)


def decode_attention(
  q: jax.Array,
  q_pos: jax.Array,
  cache: MoACache,
  *,
  scale: float | None = None,
  impl: str | None = None,
  interpret: bool = False,
) -> jax.Array:
  """One query token per row, q [B, N, H] at positions [B], over the MoA cache -> [B, N, H].

  GPU ("mosaic_gpu" or "triton"): the Pallas Triton split-K kernel; TPU and CPU: grouped XLA
  einsums.
  """
  if _check(impl) in ("mosaic_gpu", "triton"):
    return decode_lib.decode_gpu(q, q_pos, cache, scale=scale, interpret=interpret)
  return decode_lib.decode_xla(q, q_pos, cache, scale=scale)
