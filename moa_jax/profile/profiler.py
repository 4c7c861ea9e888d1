"""Profile a model: E_bar[L, N, NB, NB] per length from calibration samples (docs/method.md 2).

The loss is the next-token cross-entropy (or, optionally, the negative log-odds) on response
tokens only, averaged over each sample's response tokens; a batch's loss is the sum of its
samples' losses, so every sample's gradient is its own. E_bar is the per-sample block value of
E (by `magnitude`: sum of |E|, |sum of E| or sum of E, see influence.py) averaged over samples,
in float32.

Paths (both give dL/dA through `jax.grad`, see influence.py):
  'direct': probes on the maps A of every layer; holds [L, B, N, T, T]: small inputs only.
  'lean': probes on every layer's attention output give dO in one backward pass through a
    memory-efficient attention (cuDNN on GPU for bf16/f16, query tiles on CPU, XLA otherwise);
    then a tiled pass per layer recomputes A and G = dO V^T one query tile at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.calibration.build import CalibrationBucket, CalibrationSet
from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.plans.rules import num_blocks
from moa_jax.profile.influence import MAGNITUDES, block_influence_from_grads, block_influence_tiled
from moa_jax.profile.probes import (
  TILED,
  MapProbeAttention,
  OutputProbeAttention,
  lean_implementation,
  lean_tile,
  valid_lengths,
)

PATHS = ("lean", "direct")


def response_targets(
  loss_mask: np.ndarray,
  width: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Where the loss is read: hidden index t - 1 predicts token t for every response token t.

  Args:
    loss_mask: [B, T] bool, True on response tokens (never on token 0).
    width: number of slots R (default: the most response tokens of any row).
  Returns:
    hidden_index [B, R] int32 and weight [B, R] float32 (1 / the row's response count, 0 on
    unused slots), so that sum(weight * cross_entropy) is the sum of per-row mean losses.
  """
  loss_mask = np.asarray(loss_mask, bool)
  if loss_mask[:, 0].any():
    raise ValueError("loss_mask marks token 0 as a response token: it has no preceding token")
  counts = loss_mask.sum(-1)
  width = int(counts.max()) if width is None else width
  if width < counts.max():
    raise ValueError(f"width {width} is smaller than a row's {counts.max()} response tokens")
  hidden_index = np.zeros((len(loss_mask), max(width, 1)), np.int32)
  weight = np.zeros(hidden_index.shape, np.float32)
  for row, mask in enumerate(loss_mask):
    targets = np.flatnonzero(mask)
    hidden_index[row, : len(targets)] = targets - 1
    weight[row, : len(targets)] = 1.0 / max(len(targets), 1)
  return hidden_index, weight


LOSSES = ("nll", "log_odds")


def response_loss(
  model,
  tokens: jax.Array,
  positions: jax.Array,
  hidden_index: jax.Array,
  weight: jax.Array,
  attention,
  loss: str = "nll",
) -> jax.Array:
  """Sum over rows of the mean response-token loss (logits only where the loss reads).

  loss: 'nll', the cross-entropy -log p(y) (MoA's profile loss); or 'log_odds', the negative
    log-odds log(1 - p(y)) - log p(y) = logsumexp over v != y of z_v - z_y. Its gradient is the
    cross-entropy's divided by 1 - p(y), so it does not vanish where the model is confident: a
    first-order profile on 'nll' sees almost nothing of a head whose removal turns a confident
    answer wrong (benchmarks/README.md, "Profile loss").
  Args:
    tokens, positions: [B, T] int32 (right padding: positions -1 after the valid tokens).
    hidden_index, weight: [B, R] from `response_targets`.
  Returns:
    a float32 scalar.
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown profile loss {loss!r}; choose one of {LOSSES}")
  hidden, _ = model.hidden_states(tokens, positions, attention=attention)  # [B, T, D]
  head = model.output_embedding()  # [V, D]
  picked = jnp.take_along_axis(hidden, hidden_index[..., None], axis=1)  # [B, R, D]
  logits = jnp.einsum("brd,vd->brv", picked, head, preferred_element_type=jnp.float32)
  targets = jnp.take_along_axis(tokens, hidden_index + 1, axis=1)  # [B, R]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, R]
  if loss == "nll":
    rest = logits
  else:
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]  # [B, R, V]
    rest = jnp.where(is_target, -jnp.inf, logits)
  return jnp.sum(weight * (jax.nn.logsumexp(rest, axis=-1) - target_logits))


@functools.partial(jax.jit, static_argnames=("graphdef", "block", "magnitude", "loss"))
def _direct_batch(
  graphdef, state, tokens, positions, hidden_index, weight, *, block, magnitude, loss
):
  """[L, N, NB, NB] per-block influence summed over the batch, through probes on the maps."""
  config: LlamaConfig = nnx.merge(graphdef, state).config
  b, t = tokens.shape
  k, g = config.num_kv_heads, config.group_size
  zeros = [jnp.zeros((b, k, g, t, t), jnp.float32) for _ in range(config.num_layers)]

  def loss_fn(probes):
    attention = MapProbeAttention(probes)
    model = nnx.merge(graphdef, state)
    value = response_loss(model, tokens, positions, hidden_index, weight, attention, loss)
    return value, attention.weights

  grads, weights = jax.grad(loss_fn, has_aux=True)(zeros)
  return jnp.stack(
    [
      block_influence_from_grads(weights[layer], grads[layer], block, magnitude).sum(0)
      for layer in range(config.num_layers)
    ]
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "implementation", "padded", "loss"))
def output_grads(
  graphdef,
  state,
  tokens,
  positions,
  hidden_index,
  weight,
  *,
  implementation=None,
  padded=True,
  loss="nll",
):
  """One backward pass: dO [B, T, N, H] and q, k, v of every layer (lists over layers).

  padded=False promises that no row has padding (attention then needs no sequence lengths).
  """
  config: LlamaConfig = nnx.merge(graphdef, state).config
  b, t = tokens.shape
  shape = (b, t, config.num_heads, config.head_dim)
  zeros = [jnp.zeros(shape, config.dtype) for _ in range(config.num_layers)]

  def loss_fn(probes):
    attention = OutputProbeAttention(probes, implementation, padded)
    model = nnx.merge(graphdef, state)
    value = response_loss(model, tokens, positions, hidden_index, weight, attention, loss)
    return value, [attention.records[layer] for layer in range(config.num_layers)]

  return jax.grad(loss_fn, has_aux=True)(zeros)


@functools.partial(jax.jit, static_argnames=("block", "tile", "magnitude"))
def _layer_influence(q, k, v, d_out, lengths, *, block, tile, magnitude):
  return block_influence_tiled(
    q, k, v, d_out, lengths, block=block, tile=tile, magnitude=magnitude
  ).sum(0)


def batch_influence(
  model,
  tokens,
  positions,
  hidden_index,
  weight,
  *,
  block: int = 64,
  path: str = "lean",
  tile: int | None = None,
  implementation: str | None = None,
  magnitude: str = "entries",
  loss: str = "nll",
) -> jax.Array:
  """Per-block influence summed over one batch: [L, N, NB, NB] float32 (not yet averaged).

  Args:
    tokens, positions: [B, T] int32, right padded (positions -1 on padding).
    hidden_index, weight: [B, R] from `response_targets`.
    magnitude: 'entries' (sum of |E|, MoA's profile), 'blocks' (|sum of E| per sample) or
      'signed' (sum of E, the first-order loss change of masking); see influence.py.
    loss: 'nll' or 'log_odds' (see `response_loss`).
  """
  if path not in PATHS:
    raise ValueError(f"unknown influence path {path!r}; choose one of {PATHS}")
  if magnitude not in MAGNITUDES:
    raise ValueError(f"unknown influence magnitude {magnitude!r}; choose one of {MAGNITUDES}")
  if loss not in LOSSES:
    raise ValueError(f"unknown profile loss {loss!r}; choose one of {LOSSES}")
  graphdef, state = nnx.split(model)
  padded = bool(np.any(np.asarray(positions) < 0))
  tokens, positions, hidden_index, weight = sharding.shard_batch(  # on the model's mesh, if any
    model, tokens, positions, hidden_index, weight
  )
  if path == "direct":
    return _direct_batch(
      graphdef,
      state,
      tokens,
      positions,
      hidden_index,
      weight,
      block=block,
      magnitude=magnitude,
      loss=loss,
    )
  implementation = implementation or lean_implementation(model.config.dtype)
  tile = tile or lean_tile()
  padded = padded or implementation == TILED  # tiled attention always masks: one compile
  d_outs, records = output_grads(
    graphdef,
    state,
    tokens,
    positions,
    hidden_index,
    weight,
    implementation=implementation,
    padded=padded,
    loss=loss,
  )
  lengths = valid_lengths(jnp.asarray(positions))
  return jnp.stack(
    [
      _layer_influence(
        *records[layer], d_outs[layer], lengths, block=block, tile=tile, magnitude=magnitude
      )
      for layer in range(len(d_outs))
    ]
  )


def _buckets(samples) -> Mapping[int, CalibrationBucket]:
  return samples.buckets if isinstance(samples, CalibrationSet) else samples


def profile_model(
  model,
  config: LlamaConfig,
  samples: CalibrationSet | Mapping[int, CalibrationBucket],
  lengths: Sequence[int] | None = None,
  block: int = 64,
  path: str = "lean",
  *,
  batch_size: int = 1,
  tile: int | None = None,
  implementation: str | None = None,
  magnitude: str = "entries",
  loss: str = "nll",
  progress: bool = True,
) -> dict[int, np.ndarray]:
  """E_bar per profile length: {N: float32 [L, num_heads, ceil(N/block), ceil(N/block)]}.

  Args:
    model: a moa_jax Llama; config: its LlamaConfig.
    samples: calibration buckets by length (a CalibrationSet or {N: CalibrationBucket}).
    lengths: the lengths to profile (default: every bucket).
    block: block size b; path: 'lean' or 'direct'; batch_size: samples per step (the last
      batch of a bucket is filled with weightless copies, so one compile serves a bucket).
    tile: query rows per step of the lean path's tiled pass (default: `lean_tile()`).
    implementation: attention for the lean path's backward ('tiled', 'cudnn', 'xla'; default by
      device, `lean_implementation`).
    magnitude: per-sample block value averaged: 'entries' (sum of |E|, MoA's profile as
      published), 'blocks' (|sum of E|) or 'signed' (sum of E, for validation); see influence.py.
    loss: the loss differentiated: 'nll' (MoA's) or 'log_odds' (see `response_loss`).
  """
  if config != model.config:
    raise ValueError("profile_model: `config` is not the model's config")
  buckets = _buckets(samples)
  lengths = sorted(buckets) if lengths is None else list(lengths)
  missing = [n for n in lengths if n not in buckets or buckets[n].num_samples == 0]
  if missing:
    raise ValueError(f"no calibration samples at length(s) {missing}; have {sorted(buckets)}")
  total = sum(-(-buckets[n].num_samples // batch_size) for n in lengths)
  bar = tqdm(total=total, desc="profile", unit="batch", disable=not progress)
  result = {}
  for n in lengths:
    bucket = buckets[n]
    bar.set_postfix(length=n)
    width = int(bucket.loss_mask.sum(-1).max())
    nb = num_blocks(bucket.tokens.shape[1], block)
    total_influence = jnp.zeros((config.num_layers, config.num_heads, nb, nb), jnp.float32)
    for start in range(0, bucket.num_samples, batch_size):
      rows = np.arange(start, start + batch_size)
      real = rows < bucket.num_samples
      rows = np.where(real, rows, start)  # fill with weightless copies of a real row
      hidden_index, weight = response_targets(bucket.loss_mask[rows], width)
      weight = weight * real[:, None]
      total_influence += batch_influence(
        model,
        jnp.asarray(bucket.tokens[rows]),
        jnp.asarray(bucket.positions()[rows]),
        jnp.asarray(hidden_index),
        jnp.asarray(weight),
        block=block,
        path=path,
        tile=tile,
        implementation=implementation,
        magnitude=magnitude,
        loss=loss,
      )
      bar.update()
    result[n] = sharding.to_host(total_influence / bucket.num_samples).astype(np.float32)
  bar.close()
  return result
