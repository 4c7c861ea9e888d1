"""Measured response loss of per-head windows on calibration samples, reusing the dense run.

The first-order profile predicts the loss change of a plan; this module measures it. A plan
changes nothing before the first layer l0 where some head's window is narrower than the
sequence, and nothing at query positions t < sink + W_min (the smallest narrowed window at or
after l0), since the query at t attends every key j <= t while t - sink < W. So a `DenseTrace`
records, once per calibration bucket, the residual stream entering every layer and every
layer's keys and values (after RoPE); `masked_losses` then recomputes only layers l0.. and rows
p0.. (p0 <= sink + W_min, rounded down to a multiple of 64), the rows before p0 attending as
keys from the trace. The result equals a full masked forward pass (`rules.attend_mask`; tests
hold it to `pipeline.validation_loss`), at a fraction of its cost for single-layer or
single-group changes (the ablations and the refinement of `moa_jax.optimize.refine`).

Shapes: B samples, T padded length, L layers, N query heads, K KV heads, H head dim, D model
dim, R response slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax.attention.reference import blocked_attention
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.plans.rules import DEFAULT_SINK, expand_to_query_heads
from moa_jax.profile.at_plan import head_loss
from moa_jax.profile.profiler import response_targets

ROW_MULTIPLE = 64  # p0 is rounded down to a multiple of this (fewer compiled shapes)


@dataclasses.dataclass(frozen=True)
class _PrefixAttention:
  """One layer's rows p0.. over the dense keys of rows < p0 (the cache) and their own keys,
  masked by the windows [N] (traced) and the sink; returns this call's (k, v) as the cache."""

  windows: jax.Array
  sink: int

  def __call__(self, layer, q, k, v, q_pos, cache):
    del layer
    k_prefix, v_prefix, prefix_pos = cache
    keys = jnp.concatenate([k_prefix, k], axis=1)  # [B, S, K, H]
    values = jnp.concatenate([v_prefix, v], axis=1)
    k_pos = jnp.concatenate([prefix_pos, q_pos], axis=1)  # [B, S]
    out = blocked_attention(q, keys, values, q_pos, k_pos, windows=self.windows, sink=self.sink)
    return out, (k, v)


@functools.partial(jax.jit, static_argnames=("graphdef", "sink"))
def _layer_rows(graphdef, state, x, positions, k_prefix, v_prefix, prefix_pos, windows, *, sink):
  """One decoder layer on rows x [B, T', D] at positions [B, T'] -> (x', k, v of those rows)."""
  layer = nnx.merge(graphdef, state)
  out, (k, v) = layer(
    x,
    positions,
    layer=0,
    attention=_PrefixAttention(windows, sink),
    cache=(k_prefix, v_prefix, prefix_pos),
  )
  return out, k, v


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _response_nll(graphdef, state, hidden, hidden_index, targets, weight):
  """Per-sample mean response cross-entropy [B] from the last layer's rows hidden [B, T', D]."""
  return head_loss(nnx.merge(graphdef, state), hidden, targets, hidden_index, weight, "nll")


@dataclasses.dataclass
class DenseTrace:
  """A bucket of calibration samples run densely: what `masked_losses` reuses.

  inputs: [L, B, T, D] residual stream entering each layer; keys, values: [L, B, T, K, H];
  positions: [B, T] (-1 on right padding); hidden_index, weight: [B, R] (`response_targets`);
  targets: [B, R] token ids read there; dense: float64 [B] dense response cross-entropy.
  """

  inputs: jax.Array
  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  hidden_index: np.ndarray
  weight: np.ndarray
  targets: np.ndarray
  dense: np.ndarray

  @property
  def length(self) -> int:
    return int(self.positions.shape[1])

  @property
  def num_samples(self) -> int:
    return int(self.positions.shape[0])


def _layers(model) -> list[tuple]:
  return [nnx.split(layer) for layer in model.model.layers]


def _model_rest(model):
  """The model without its decoder layers' weights mattering: norm and output embedding."""
  return nnx.split(model)


def dense_trace(model, bucket: CalibrationBucket) -> DenseTrace:
  """Run a bucket densely (one batch) and record what masked runs reuse."""
  tokens = jnp.asarray(bucket.tokens)
  positions = jnp.asarray(bucket.positions())
  hidden_index, weight = response_targets(bucket.loss_mask)
  targets = np.take_along_axis(bucket.tokens, hidden_index + 1, axis=1)
  b, t = tokens.shape
  config = model.config
  x = model.model.embed_tokens(tokens)
  empty_kv = jnp.zeros((b, 0, config.num_kv_heads, config.head_dim), x.dtype)
  empty_pos = jnp.zeros((b, 0), jnp.int32)
  dense = jnp.full((config.num_heads,), t, jnp.int32)
  inputs, keys, values = [], [], []
  for graphdef, state in _layers(model):
    inputs.append(x)
    x, k, v = _layer_rows(
      graphdef, state, x, positions, empty_kv, empty_kv, empty_pos, dense, sink=0
    )
    keys.append(k)
    values.append(v)
  graphdef, state = _model_rest(model)
  nll = _response_nll(
    graphdef, state, x, jnp.asarray(hidden_index), jnp.asarray(targets), jnp.asarray(weight)
  )
  return DenseTrace(
    jnp.stack(inputs),
    jnp.stack(keys),
    jnp.stack(values),
    positions,
    hidden_index,
    weight,
    targets,
    np.asarray(nll, np.float64),
  )


def _first_changed(windows: np.ndarray, length: int, sink: int) -> tuple[int, int] | None:
  """(first layer l0 with a window that masks anything, first row it can change), or None."""
  masks = sink + windows < length  # [L, N]: query rows t >= sink + W lose keys
  if not masks.any():
    return None
  l0 = int(np.argmax(masks.any(-1)))
  row = int((sink + windows[l0:])[masks[l0:]].min())
  return l0, row


def masked_losses(model, trace: DenseTrace, windows, sink: int = DEFAULT_SINK) -> np.ndarray:
  """float64 [B]: each sample's mean response cross-entropy with per-head windows.

  windows: int [L, N] (per query head) or [L, K] (per KV group), tokens; a window >= T - sink
  changes nothing. Only layers and rows a window can change are recomputed (module docstring).
  """
  config = model.config
  windows = np.asarray(windows, np.int64)
  if windows.ndim != 2 or windows.shape[0] != config.num_layers:
    raise ValueError(f"windows must be [{config.num_layers}, heads], got {windows.shape}")
  windows = expand_to_query_heads(windows, config.num_heads)
  if np.any(windows < 1):
    raise ValueError("every window must be at least one token")
  t = trace.length
  changed = _first_changed(windows, t, sink)
  if changed is None:
    return trace.dense.copy()
  l0, row = changed
  first_loss_row = int(trace.hidden_index[trace.weight > 0].min())
  p0 = min(row, first_loss_row) // ROW_MULTIPLE * ROW_MULTIPLE
  if p0 >= t:
    return trace.dense.copy()
  positions = trace.positions[:, p0:]
  prefix_pos = trace.positions[:, :p0]
  x = trace.inputs[l0][:, p0:]
  clipped = np.minimum(windows, t).astype(np.int32)
  for layer, (graphdef, state) in enumerate(_layers(model)):
    if layer < l0:
      continue
    x, _, _ = _layer_rows(
      graphdef,
      state,
      x,
      positions,
      trace.keys[layer][:, :p0],
      trace.values[layer][:, :p0],
      prefix_pos,
      jnp.asarray(clipped[layer]),
      sink=sink,
    )
  graphdef, state = _model_rest(model)
  nll = _response_nll(
    graphdef,
    state,
    x,
    jnp.asarray(np.maximum(trace.hidden_index - p0, 0)),
    jnp.asarray(trace.targets),
    jnp.asarray(trace.weight),
  )
  return np.asarray(nll, np.float64)
