"""First-order loss change of moving one head to another window, linearized at any plan.

MoA's profile (influence.py) linearizes the loss at the dense model, one attention entry at a
time, and sums entries: accurate for small changes of a dense model, but a plan at KV density
0.5 removes much of the attention of many heads at once. This profile linearizes at a given
plan P (per-head windows w_h; P = dense gives MoA's starting point) and is exact in each head's
output:

For query row i of head h, with full-softmax weights a_ij = softmax_j(z_i) over the causal row,
S(w) = {j <= i: j < sink or i - j < w} the keys a window w attends, and G_ij = dO_i . v_j (dO:
the loss gradient at the head's output under P, from one backward pass through P):

    O_i(w) = sum_{j in S(w)} a_ij v_j / sum_{j in S(w)} a_ij       (the head output with w)
    dL_h(w) ~= sum_i dO_i . (O_i(w) - O_i(w_h))
             = sum_i [P_i(w) / M_i(w) - P_i(w_h) / M_i(w_h)],
    P_i(w) = sum_{j in S(w)} a_ij G_ij,   M_i(w) = sum_{j in S(w)} a_ij.

So widening (restoring keys P masks) and narrowing are both covered, and a change that moves
much of a row's mass is renormalized exactly rather than entry by entry. Heads of one layer are
additive exactly at first order (their outputs add through o_proj), heads of different layers
to first order. The sums over S(w) are prefix sums along the keys of each row (sink part, then
the window's suffix), read at every candidate window; one query tile at a time, so no T x S map
exists beyond a tile. The backward pass recomputes attention (jax.checkpoint), so memory stays
at q, k, v per layer.

Shapes: B batch, T tokens, L layers, N query heads, K KV heads, G = N / K, H head dim, C
candidate windows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax.attention.reference import blocked_attention
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.plans.rules import DEFAULT_SINK, MASKED_LOGIT, expand_to_query_heads
from moa_jax.profile.influence import HIGHEST
from moa_jax.profile.profiler import LOSSES, response_loss, response_targets


class _WindowProbeAttention:
  """Windowed attention (recomputed in the backward pass) + probe[layer] on the output; records
  q, k, v per layer."""

  def __init__(self, probes, windows: jax.Array, sink: int):
    self.probes, self.windows, self.sink = probes, windows, sink
    self.records: dict[int, tuple[jax.Array, ...]] = {}

  def __call__(self, layer, q, k, v, q_pos, cache):
    del cache
    sink = self.sink
    attend = jax.checkpoint(
      lambda q, k, v, pos, w: blocked_attention(q, k, v, pos, windows=w, sink=sink)
    )
    out = attend(q, k, v, q_pos, self.windows[layer])
    self.records[layer] = (q, k, v)
    return out + self.probes[layer].astype(out.dtype), None


@functools.partial(jax.jit, static_argnames=("graphdef", "sink", "loss"))
def _plan_grads(graphdef, state, tokens, positions, hidden_index, weight, windows, *, sink, loss):
  """dO [B, T, N, H] per layer under the windows [L, N], and every layer's q, k, v."""
  config = nnx.merge(graphdef, state).config
  b, t = tokens.shape
  zeros = [
    jnp.zeros((b, t, config.num_heads, config.head_dim), config.dtype)
    for _ in range(config.num_layers)
  ]

  def loss_fn(probes):
    attention = _WindowProbeAttention(probes, windows, sink)
    model = nnx.merge(graphdef, state)
    value = response_loss(model, tokens, positions, hidden_index, weight, attention, loss)
    return value, [attention.records[layer] for layer in range(config.num_layers)]

  return jax.grad(loss_fn, has_aux=True)(zeros)


def _window_sums(cum: jax.Array, rows: jax.Array, windows: jax.Array, sink: int) -> jax.Array:
  """Sums over S(w) of a row's entries, from their inclusive prefix sums along the keys.

  cum: [B, K, G, R, S]; rows: [R] query positions; windows: [K, G, C] -> [B, K, G, R, C].
  S(w) = the keys j <= i with j < sink (the prefix up to min(sink, i + 1)) or j > i - w.
  """
  b, k, g, r, s = cum.shape

  def at(index):  # cum at per-row key indices (0 before key 0); index broadcasts to [B..R, X]
    index = jnp.broadcast_to(index, (b, k, g, r, index.shape[-1]))
    return jnp.where(index >= 0, jnp.take_along_axis(cum, jnp.clip(index, 0, s - 1), -1), 0.0)

  i = rows[:, None]  # [R, 1]
  sink_part = at(jnp.minimum(sink, i + 1) - 1)  # [B, K, G, R, 1]
  start = jnp.maximum(sink, i - windows[:, :, None, :] + 1)  # [K, G, R, C] first window key
  return sink_part + jnp.where(start <= i, at(i) - at(start - 1), 0.0)


@functools.partial(jax.jit, static_argnames=("sink", "tile"))
def _layer_deltas(q, k, v, d_out, lengths, current, candidates, *, sink, tile):
  """[B, N, C]: sum over rows of dL of moving each head from `current` [N] to each window of
  `candidates` [C] (see the module docstring)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  g = n // kv_heads
  tile = min(tile, t)
  windows = jnp.concatenate(
    [current[:, None], jnp.broadcast_to(candidates, (n, len(candidates)))], axis=1
  ).reshape(kv_heads, g, -1)  # [K, G, 1 + C]
  total = jnp.zeros((b, kv_heads, g, windows.shape[-1]), jnp.float32)
  for start in range(0, t, tile):
    stop = min(start + tile, t)
    rows = jnp.arange(start, stop)
    qg = q[:, start:stop].reshape(b, stop - start, kv_heads, g, h)
    logits = (
      jnp.einsum(
        "btkgh,bskh->bkgts", qg, k[:, :stop], preferred_element_type=jnp.float32, precision=HIGHEST
      )
      * h**-0.5
    )  # [B, K, G, R, S]
    keys = jnp.arange(stop)
    causal = (keys[None, :] <= rows[:, None])[None, None, None]  # [1, 1, 1, R, S]
    valid = causal & (keys < lengths[:, None])[:, None, None, None, :]
    weights = jax.nn.softmax(jnp.where(valid, logits, MASKED_LOGIT), axis=-1)
    weights = jnp.where(valid, weights, 0.0)
    do_g = d_out[:, start:stop].reshape(b, stop - start, kv_heads, g, h)
    grads = jnp.einsum(
      "btkgh,bskh->bkgts",
      do_g.astype(jnp.float32),
      v[:, :stop].astype(jnp.float32),
      precision=HIGHEST,
    )  # [B, K, G, R, S] = dO_i . v_j
    mass = _window_sums(jnp.cumsum(weights, -1), rows, windows, sink)  # [B, K, G, R, 1 + C]
    proj = _window_sums(jnp.cumsum(weights * grads, -1), rows, windows, sink)
    value = proj / jnp.maximum(mass, 1e-30)  # dO_i . O_i(w)
    row_valid = (rows[None, :] < lengths[:, None])[:, None, None, :, None]  # [B, 1, 1, R, 1]
    value = jnp.where(row_valid, value, 0.0)
    total += (value - value[..., :1]).sum(-2)
  return total[..., 1:].reshape(b, n, -1)


def window_deltas(
  model,
  bucket: CalibrationBucket,
  windows,
  candidates,
  *,
  sink: int = DEFAULT_SINK,
  loss: str = "nll",
  tile: int = 256,
  progress_every: int = 0,
) -> np.ndarray:
  """float64 [S, L, N, C]: per sample, the first-order change of its mean response loss when
  one head moves from its plan window to each candidate window, every other head at the plan.

  Args:
    windows: int [L, N] (per query head) or [L, K] (per KV group) windows of the plan P at the
      bucket's length (a window >= the length is dense).
    candidates: int [C] windows in tokens.
    loss: 'nll' or 'log_odds' (`profiler.response_loss`).
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown profile loss {loss!r}; choose one of {LOSSES}")
  config = model.config
  windows = np.asarray(windows, np.int64)
  if windows.ndim != 2 or windows.shape[0] != config.num_layers:
    raise ValueError(f"windows must be [{config.num_layers}, heads], got {windows.shape}")
  t = bucket.length
  windows = np.minimum(expand_to_query_heads(windows, config.num_heads), t).astype(np.int32)
  candidates = np.minimum(np.asarray(candidates, np.int64), t).astype(np.int32)
  if candidates.ndim != 1 or not len(candidates) or windows.min() < 1 or candidates.min() < 1:
    raise ValueError("candidates must be a non-empty list of windows >= 1 (and windows >= 1)")
  graphdef, state = nnx.split(model)
  positions = bucket.positions()
  out = []
  for row in range(bucket.num_samples):
    hidden_index, weight = response_targets(bucket.loss_mask[row : row + 1])
    d_outs, records = _plan_grads(
      graphdef,
      state,
      jnp.asarray(bucket.tokens[row : row + 1]),
      jnp.asarray(positions[row : row + 1]),
      jnp.asarray(hidden_index),
      jnp.asarray(weight),
      jnp.asarray(windows),
      sink=sink,
      loss=loss,
    )
    lengths = jnp.asarray(bucket.lengths[row : row + 1])
    out.append(
      np.stack(
        [
          np.asarray(
            _layer_deltas(
              *records[l],
              d_outs[l],
              lengths,
              jnp.asarray(windows[l]),
              jnp.asarray(candidates),
              sink=sink,
              tile=tile,
            )
          )[0]
          for l in range(config.num_layers)
        ]
      )
    )
    if progress_every and (row + 1) % progress_every == 0:
      print(f"[at_plan] sample {row + 1}/{bucket.num_samples}", flush=True)
  return np.stack(out).astype(np.float64)
