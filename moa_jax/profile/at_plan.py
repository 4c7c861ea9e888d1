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
exists beyond a tile. The backward pass runs one layer at a time (each layer recomputed from
its input), so memory stays at one layer's activations plus every layer's input.

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
from moa_jax.profile.profiler import LOSSES, response_targets


class _ProbeAttention:
  """Windowed attention of one layer (windows [N], traced) plus an additive probe on its output
  (None: no probe); records q, k, v."""

  def __init__(self, windows: jax.Array, sink: int, probe: jax.Array | None):
    self.windows, self.sink, self.probe = windows, sink, probe
    self.record: tuple[jax.Array, ...] = ()

  def __call__(self, layer, q, k, v, q_pos, cache):
    del layer, cache
    out = blocked_attention(q, k, v, q_pos, windows=self.windows, sink=self.sink)
    self.record = (q, k, v)
    return (out if self.probe is None else out + self.probe.astype(out.dtype)), None


@functools.partial(jax.jit, static_argnames=("graphdef", "sink"))
def _layer_forward(graphdef, state, x, positions, windows, *, sink):
  layer = nnx.merge(graphdef, state)
  return layer(x, positions, layer=0, attention=_ProbeAttention(windows, sink, None), cache=None)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "sink"))
def _layer_backward(graphdef, state, x, positions, windows, g_out, *, sink):
  """One layer's (dL/dx, dO, q, k, v) from dL/d(its output) g_out [B, T, D]: the layer is
  recomputed here, so only one layer's activations exist at a time."""
  config = nnx.merge(graphdef, state).self_attn.config
  b, t = positions.shape

  def run(x, probe):
    attention = _ProbeAttention(windows, sink, probe)
    out = nnx.merge(graphdef, state)(x, positions, layer=0, attention=attention, cache=None)[0]
    return out, attention.record

  probe = jnp.zeros((b, t, config.num_heads, config.head_dim), x.dtype)
  _, vjp, record = jax.vjp(run, x, probe, has_aux=True)
  g_x, d_out = vjp(g_out)
  return g_x, d_out, *record


def head_loss(model, hidden, targets, hidden_index, weight, loss: str = "nll") -> jax.Array:
  """float32 [B]: each row's weighted response loss (`profiler.response_loss`'s per row) from
  the last decoder layer's output hidden [B, T, D] (before the final norm)."""
  picked = model.model.norm(jnp.take_along_axis(hidden, hidden_index[..., None], axis=1))
  logits = jnp.einsum(
    "brd,vd->brv", picked, model.output_embedding(), preferred_element_type=jnp.float32
  )  # [B, R, V]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if loss == "log_odds":
    logits = jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], -jnp.inf, logits)
  return jnp.sum(weight * (jax.nn.logsumexp(logits, axis=-1) - target_logits), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "loss"))
def _head_grad(graphdef, state, hidden, targets, hidden_index, weight, *, loss):
  model = nnx.merge(graphdef, state)
  return jax.grad(lambda h: head_loss(model, h, targets, hidden_index, weight, loss).sum())(hidden)


def _forward(model, tokens, positions, windows, sink: int) -> list[jax.Array]:
  """Every layer's input and the last layer's output [B, T, D] under the windows [L, N]."""
  xs = [model.model.embed_tokens(tokens)]
  for layer, w in zip(model.model.layers, windows):
    graphdef, state = nnx.split(layer)
    xs.append(_layer_forward(graphdef, state, xs[-1], positions, w, sink=sink))
  return xs


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _response_logits(graphdef, state, hidden, hidden_index):
  model = nnx.merge(graphdef, state)
  picked = model.model.norm(jnp.take_along_axis(hidden, hidden_index[..., None], axis=1))
  return jnp.einsum(
    "brd,vd->brv", picked, model.output_embedding(), preferred_element_type=jnp.float32
  )  # [B, R, V]


def plan_gradients(
  model,
  tokens,
  positions,
  hidden_index,
  weight,
  windows,
  *,
  sink: int,
  loss: str = "nll",
  targets=None,
) -> list[tuple[jax.Array, ...]]:
  """Per layer (dO [B, T, N, H], q, k, v) of the response loss under per-head windows [L, N]:
  a forward pass keeping each layer's input, then one layer's backward at a time. targets
  [B, R]: the labels read at hidden_index (default: the next tokens)."""
  if targets is None:
    targets = jnp.take_along_axis(tokens, hidden_index + 1, axis=1)
  xs = _forward(model, tokens, positions, windows, sink)
  graphdef, state = nnx.split(model)
  grad = _head_grad(graphdef, state, xs[-1], targets, hidden_index, weight, loss=loss)
  out = [None] * len(model.model.layers)
  for index in reversed(range(len(out))):
    graphdef, state = nnx.split(model.model.layers[index])
    grad, d_out, q, k, v = _layer_backward(
      graphdef, state, xs[index], positions, windows[index], grad, sink=sink
    )
    out[index] = (d_out, q, k, v)
  return out


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
  fisher_draws: int = 0,
  seed: int = 0,
  tile: int = 256,
  components: bool = False,
):
  """float64 [S, L, N, C]: per sample, the estimated change of its mean response loss when one
  head moves from its plan window to each candidate window, every other head at the plan.

  The first-order term is the module docstring's. With fisher_draws = M > 0 a second-order term
  is added: the expected KL of the response distributions, 1/2 sum_t w_t E_y[(g_t,y . dO)^2]
  (the Fisher quadratic form of the head's output change; g_t,y the gradient of -log p(y) at
  response slot t, w_t its weight), estimated from M draws of labels y_t ~ p_t under the plan
  with random signs e_t: 1/2 mean over draws of (sum_t e_t sqrt(w_t) g_t,y_t . dO)^2. It is
  what a change costs where the first-order term averages out (text the model predicts well)
  and is zero for answers the model is sure of.

  Args:
    windows: int [L, N] (per query head) or [L, K] (per KV group) windows of the plan P at the
      bucket's length (a window >= the length is dense).
    candidates: int [C] windows in tokens.
    loss: 'nll' or 'log_odds' (`profiler.response_loss`) for the first-order term.
    components: return (first-order, second-order) separately.
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown profile loss {loss!r}; choose one of {LOSSES}")
  if fisher_draws < 0:
    raise ValueError(f"fisher_draws must be >= 0, got {fisher_draws}")
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
  windows_j, candidates_j = jnp.asarray(windows), jnp.asarray(candidates)
  positions = bucket.positions()
  rng = np.random.default_rng(seed)

  def deltas(tokens, pos, hidden_index, weight, lengths, targets, loss):
    grads = plan_gradients(
      model, tokens, pos, hidden_index, weight, windows_j, sink=sink, loss=loss, targets=targets
    )
    return np.stack(
      [
        np.asarray(
          _layer_deltas(q, k, v, d_out, lengths, windows_j[l], candidates_j, sink=sink, tile=tile)
        )
        for l, (d_out, q, k, v) in enumerate(grads)
      ],
      1,
    )  # [B, L, N, C]

  first, second = [], []
  for row in range(bucket.num_samples):
    hidden_index, weight = response_targets(bucket.loss_mask[row : row + 1])
    tokens, pos = jnp.asarray(bucket.tokens[row : row + 1]), jnp.asarray(positions[row : row + 1])
    lengths = jnp.asarray(bucket.lengths[row : row + 1])
    first.append(
      deltas(tokens, pos, jnp.asarray(hidden_index), jnp.asarray(weight), lengths, None, loss)[0]
    )
    if fisher_draws:
      m = fisher_draws
      logits = np.asarray(
        _response_logits(
          graphdef,
          state,
          _forward(model, tokens, pos, windows_j, sink)[-1],
          jnp.asarray(hidden_index),
        ),
        np.float64,
      )[0]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)  # [R, V]
      labels = np.array([[rng.choice(probs.shape[-1], p=p) for p in probs] for _ in range(m)])
      signs = rng.choice([-1.0, 1.0], size=labels.shape) * np.sqrt(weight)  # [M, R]
      repeat = lambda x: jnp.repeat(x, m, axis=0)
      linear = deltas(
        repeat(tokens),
        repeat(pos),
        repeat(jnp.asarray(hidden_index)),
        jnp.asarray(signs, jnp.float32),
        repeat(lengths),
        jnp.asarray(labels, jnp.int32),
        "nll",
      )  # [M, L, N, C]
      second.append(0.5 * np.mean(np.square(linear.astype(np.float64)), 0))
    else:
      second.append(np.zeros_like(first[-1]))
  first, second = np.stack(first).astype(np.float64), np.stack(second)
  return (first, second) if components else first + second
