"""Batched autoregressive generation on a KV cache: left-padded prompts, prefill in chunks,
multi-turn conversations, a jit-compiled decode loop.

The attention implementation (and so the KV cache) is a parameter: DenseAttention by default,
MoA's sparse attention with its static per-head cache plugs in unchanged. Every call of T > 1
tokens prefills on top of whatever the cache holds, so a long prompt can go in chunks of C
tokens (activation memory bounded by C) and a new turn goes on the previous turns' cache.

Pieces: `prefill` (tokens on a cache -> last logits), `decode` (sample, feed, repeat),
`Conversation` (a batch of conversations on one cache: `append` a turn, `reply`), and
`generate` (one prompt per row, one reply).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax.attention.base import Attention
from moa_jax.attention.dense import DenseAttention
from moa_jax.models.llama import Llama
from moa_jax.workdir import atomic_write_text


def left_pad(
  prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad prompts to one length.

  Returns:
    tokens [B, T] int32 (pad_id on padding) and positions [B, T] int32 counted from each row's
    first real token (-1 on padding), T = the longest prompt rounded up to `multiple` (so that
    batches of similar lengths share one compiled program).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
  t = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  positions = np.full((len(prompts), t), -1, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, t - len(prompt) :] = prompt
    positions[row, t - len(prompt) :] = np.arange(len(prompt))
  return tokens, positions


def _choose(
  logits: jax.Array, key: jax.Array, temperature: jax.Array, greedy: bool, top_k: int | None
) -> jax.Array:
  """Next tokens [B] from float32 logits [B, V]: argmax, or a sample at `temperature` (top_k)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def chunk_sizes(length: int, chunk: int | None) -> list[int]:
  """How `prefill` splits `length` tokens: one call, or a first call of the remainder (1..C
  tokens) and then calls of C tokens, so at most two program shapes and no extra padding."""
  if chunk is None or chunk >= length:
    return [length]
  if chunk < 1:
    raise ValueError(f"prefill_chunk must be >= 1, got {chunk}")
  first = length - (-(-length // chunk) - 1) * chunk
  return [first] + [chunk] * ((length - first) // chunk)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "attention", "chunk"), donate_argnames=("caches",)
)
def _prefill_jit(graphdef, state, tokens, positions, caches, *, attention, chunk):
  model = nnx.merge(graphdef, state)
  forward = lambda t, p, c: model.hidden_states(t, p, attention=attention, caches=c)
  sizes = chunk_sizes(tokens.shape[1], chunk)
  hidden, caches = forward(tokens[:, : sizes[0]], positions[:, : sizes[0]], caches)
  last = hidden[:, -1]  # [B, D]

  def step(i, carry):
    caches, _ = carry
    start = sizes[0] + i * chunk
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
    hidden, caches = forward(cut(tokens), cut(positions), caches)
    return caches, hidden[:, -1]

  if len(sizes) > 1:
    caches, last = jax.lax.fori_loop(0, len(sizes) - 1, step, (caches, last))
  logits = jnp.einsum(
    "bd,vd->bv", last, model.output_embedding(), preferred_element_type=jnp.float32
  )  # [B, V]
  return logits, caches


def prefill(
  model: Llama, tokens, positions, caches: list, *, attention: Attention, chunk: int | None = None
) -> tuple[jax.Array, list]:
  """Feed tokens [B, T] at positions [B, T] into the caches (on top of what they hold).

  Each row's real tokens are contiguous, end at index T - 1 and continue its cached positions
  (left padding: position -1). chunk: feed at most this many tokens per model call (see
  `chunk_sizes`; None: one call). The caches passed in are donated (do not reuse them).
  Returns float32 logits [B, V] of each row's last token and the updated caches.
  """
  graphdef, state = nnx.split(model)
  return _prefill_jit(
    graphdef,
    state,
    jnp.asarray(tokens, jnp.int32),
    jnp.asarray(positions, jnp.int32),
    caches,
    attention=attention,
    chunk=chunk,
  )


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "attention", "max_new_tokens", "greedy", "top_k"),
  donate_argnames=("caches",),
)
def _decode_jit(
  graphdef,
  state,
  logits,
  lengths,
  caches,
  rng,
  temperature,
  eos_ids,
  pad_id,
  *,
  attention,
  max_new_tokens,
  greedy,
  top_k,
):
  model = nnx.merge(graphdef, state)
  rng, key = jax.random.split(rng)
  token = _choose(logits, key, temperature, greedy, top_k)  # [B]
  done = jnp.isin(token, eos_ids)
  out = jnp.full((logits.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

  def keep_going(carry):
    step, *_, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def decode_step(carry):
    step, token, lengths, caches, rng, done, out = carry
    pos = jnp.where(done, -1, lengths)  # a finished row writes nothing more
    logits, caches = model(token[:, None], pos[:, None], attention=attention, caches=caches)
    rng, key = jax.random.split(rng)
    lengths = lengths + (~done).astype(jnp.int32)
    token = jnp.where(done, pad_id, _choose(logits[:, 0], key, temperature, greedy, top_k))
    out = out.at[:, step].set(token)
    return step + 1, token, lengths, caches, rng, done | jnp.isin(token, eos_ids), out

  carry = (jnp.int32(1), token, lengths, caches, rng, done, out)
  _, _, lengths, caches, _, _, out = jax.lax.while_loop(keep_going, decode_step, carry)
  return out, caches, lengths


def _check_sampling(model: Llama, max_new_tokens: int, temperature: float, top_k) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  vocab = model.config.vocab_size
  if top_k is not None and not 1 <= top_k <= vocab:
    raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")


def _check_tokens(tokens: np.ndarray, vocab: int) -> None:
  if tokens.min() < 0 or tokens.max() >= vocab:
    raise ValueError(f"token ids must be in [0, {vocab}), got {tokens.min()}..{tokens.max()}")


def _eos_array(model: Llama, eos_id) -> np.ndarray:
  eos = model.config.eos_token_ids if eos_id is None else eos_id
  return np.asarray([eos] if isinstance(eos, int) else list(eos), np.int32)


def decode(
  model: Llama,
  logits,
  lengths,
  caches: list,
  max_new_tokens: int,
  *,
  attention: Attention,
  temperature: float = 0.0,
  top_k: int | None = None,
  rng: jax.Array | None = None,
  eos_id: int | Sequence[int] | None = None,
  pad_id: int = 0,
) -> tuple[jax.Array, list, jax.Array]:
  """Sample from logits [B, V], feed each new token at position lengths [B], repeat.

  Runs until every row emitted eos or `max_new_tokens` tokens exist; a finished row feeds
  nothing more. The caches passed in are donated. Returns new tokens [B, max_new_tokens] int32
  (pad_id after a row's eos), the caches (every new token fed except each row's last) and the
  new lengths [B] int32 (tokens held per row).
  """
  _check_sampling(model, max_new_tokens, temperature, top_k)
  if any(getattr(cache, "fresh", False) for cache in caches):
    raise ValueError("decode needs caches that hold a prompt: prefill first")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _decode_jit(
    graphdef,
    state,
    logits,
    jnp.asarray(lengths, jnp.int32),
    caches,
    rng,
    jnp.float32(max(temperature, 1e-6)),
    _eos_array(model, eos_id),
    jnp.int32(pad_id),
    attention=attention,
    max_new_tokens=max_new_tokens,
    greedy=temperature == 0,
    top_k=top_k,
  )


def _cut_at_eos(rows: np.ndarray, eos_ids: np.ndarray) -> list[list[int]]:
  """Each row up to and including its first eos token."""
  results = []
  for row in rows.tolist():
    stops = [i for i, token in enumerate(row) if token in set(eos_ids.tolist())]
    results.append(row[: stops[0] + 1] if stops else row)
  return results


class Conversation:
  """B conversations on one KV cache: `append` a turn to every row, `reply`, and again.

  Args:
    model: a Llama.
    batch_size: B rows (conversations).
    max_length: the cache's size in tokens, padding included: the sum over calls of their
      padded lengths plus the tokens decoded must stay within it (for MoA also the planned
      total length that fixes every head's window).
    attention: the Attention with `init_cache` (default DenseAttention()).
    prefill_chunk: feed turns in model calls of at most this many tokens (None: one call).
    pad_id: token fed for padding; pad_multiple: turns are left-padded to a multiple of this.
  """

  def __init__(
    self,
    model: Llama,
    batch_size: int,
    max_length: int,
    *,
    attention: Attention | None = None,
    prefill_chunk: int | None = None,
    pad_id: int = 0,
    pad_multiple: int = 64,
  ):
    if batch_size < 1 or max_length < 1:
      raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
    if prefill_chunk is not None and prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    self.model = model
    self.attention = DenseAttention() if attention is None else attention
    self.max_length = max_length
    self.prefill_chunk = prefill_chunk
    self.pad_id = pad_id
    self.pad_multiple = pad_multiple
    self.caches = self.attention.init_cache(model.config, batch_size, max_length, None)
    self.lengths = np.zeros(batch_size, np.int32)  # tokens held per row (= next position)
    self.pending: list[list[int]] = [[] for _ in range(batch_size)]  # replies' last tokens
    self.slots = 0  # cache slots used, padding included
    self.logits: jax.Array | None = None  # [B, V] after the last token fed

  @property
  def batch_size(self) -> int:
    return len(self.lengths)

  def _reserve(self, tokens: int) -> None:
    if self.slots + tokens > self.max_length:
      raise ValueError(
        f"the conversation needs {self.slots + tokens} cache slots, more than "
        f"max_length={self.max_length}"
      )
    self.slots += tokens

  def append(self, turns: Sequence[Sequence[int]]) -> jax.Array:
    """Prefill one turn per row (after the row's pending reply token) on the cache.

    Returns float32 logits [B, V] of each row's last token.
    """
    if len(turns) != self.batch_size:
      raise ValueError(f"append needs one turn per row ({self.batch_size}), got {len(turns)}")
    return self._feed(
      [pending + list(turn) for pending, turn in zip(self.pending, turns)], self.pad_multiple
    )

  def _feed(self, rows: list[list[int]], multiple: int) -> jax.Array:
    tokens, positions = left_pad(rows, self.pad_id, multiple)
    _check_tokens(tokens, self.model.config.vocab_size)
    fused = isinstance(self.attention, DenseAttention) and self.attention.impl != "reference"
    if fused and (
      len({len(r) for r in rows}) > 1
      or len(set(self.lengths.tolist())) > 1
      or tokens.shape[1] != len(rows[0])
    ):
      raise ValueError(
        f"DenseAttention(impl={self.attention.impl!r}) needs rows without "
        "padding: equal lengths, a multiple of pad_multiple"
      )
    self._reserve(tokens.shape[1])
    positions = np.where(positions >= 0, positions + self.lengths[:, None], -1)
    self.logits, self.caches = prefill(
      self.model, tokens, positions, self.caches, attention=self.attention, chunk=self.prefill_chunk
    )
    self.lengths = self.lengths + np.asarray([len(r) for r in rows], np.int32)
    self.pending = [[] for _ in rows]
    return self.logits

  def reply(
    self,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    eos_id: int | Sequence[int] | None = None,
  ) -> list[list[int]]:
    """Decode up to `max_new_tokens` per row (see `decode`); right after another reply this
    continues it. Returns B lists of new tokens, each ending at (and including) its first eos."""
    _check_sampling(self.model, max_new_tokens, temperature, top_k)
    if self.logits is None:  # continue: feed the previous reply's last tokens first
      if not all(self.pending):
        raise ValueError("append a turn before the first reply")
      self._feed(self.pending, 1)
    self._reserve(max_new_tokens - 1)
    out, self.caches, self.lengths = decode(
      self.model,
      self.logits,
      self.lengths,
      self.caches,
      max_new_tokens,
      attention=self.attention,
      temperature=temperature,
      top_k=top_k,
      rng=rng,
      eos_id=eos_id,
      pad_id=self.pad_id,
    )
    self.logits, self.lengths = None, np.asarray(self.lengths)
    replies = _cut_at_eos(np.asarray(out), _eos_array(self.model, eos_id))
    self.pending = [[reply[-1]] for reply in replies]
    return replies


def generate(
  model: Llama,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  attention: Attention | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  rng: jax.Array | None = None,
  eos_id: int | Sequence[int] | None = None,
  pad_id: int = 0,
  pad_multiple: int = 64,
  prefill_chunk: int | None = None,
  max_length: int | None = None,
) -> list[list[int]]:
  """New tokens for each prompt, decoded as one left-padded batch.

  Args:
    model: a Llama.
    prompts: B lists of token ids (any lengths >= 1).
    max_new_tokens: tokens to generate per prompt (fewer if the row emits eos).
    attention: the Attention with `init_cache` (default DenseAttention()).
    temperature: 0 for greedy decoding, else softmax sampling at this temperature.
    top_k: sample only among the k most likely tokens (sampling only).
    rng: PRNG key for sampling (default jax.random.key(0)).
    eos_id: token id(s) ending a row; None: the config's eos_token_ids; (): never stop.
    pad_id: token fed for padding (and after eos).
    pad_multiple: prompts are left-padded to a multiple of this (fewer recompilations).
    prefill_chunk: prefill the prompts in model calls of at most this many tokens.
    max_length: the cache size and planned total length (default: the padded prompt length +
      max_new_tokens).
  Returns:
    B lists of new tokens, each ending at (and including) its first eos token.
  """
  _check_sampling(model, max_new_tokens, temperature, top_k)
  tokens = left_pad(prompts, pad_id, pad_multiple)[0]
  _check_tokens(tokens, model.config.vocab_size)
  padded = tokens.shape[1]
  conversation = Conversation(
    model,
    len(prompts),
    padded + max_new_tokens if max_length is None else max_length,
    attention=attention,
    prefill_chunk=prefill_chunk,
    pad_id=pad_id,
    pad_multiple=pad_multiple,
  )
  conversation.append(prompts)
  return conversation.reply(
    max_new_tokens, temperature=temperature, top_k=top_k, rng=rng, eos_id=eos_id
  )


def generate_command(config, workdir: Path | None) -> list[dict]:
  """`python -m moa_jax generate`: load a model (and a plan), generate, print, save.

  config fields: see configs/generate.py. Returns one dict per prompt (prompt, its ids, the new
  ids and their text), also written to workdir/generated.json if given.
  """
  from moa_jax import distributed, validate
  from moa_jax.attention.moa import MoAAttention
  from moa_jax.attention.sharded import shard_attention
  from moa_jax.calibration.prompts import chat_prompt_ids
  from moa_jax.models import sharding
  from moa_jax.models.loading import load_model
  from moa_jax.plans.plan import Plan

  validate.generate(config, workdir)
  mesh = sharding.config_mesh(config)  # config.mesh: the model and attention on a device mesh
  model, tokenizer, model_id = load_model(config.model, mesh=mesh)
  attention = None
  if config.plan:
    attention = MoAAttention.from_plan(Plan.load(config.plan).validate(model.config))
  if mesh is not None:
    attention = shard_attention(attention or DenseAttention(), mesh)
  prompts = [
    chat_prompt_ids(tokenizer, text) if config.chat else tokenizer(text)["input_ids"]
    for text in config.prompts
  ]
  new_tokens = generate(
    model,
    prompts,
    config.max_new_tokens,
    attention=attention,
    temperature=config.temperature,
    top_k=config.top_k or None,
    rng=jax.random.key(config.seed),
  )
  print(f"{model_id}, {'plan ' + config.plan if config.plan else 'dense attention'}")
  results = []
  for i, (text, prompt, new) in enumerate(zip(config.prompts, prompts, new_tokens)):
    result = {"prompt": text, "prompt_ids": prompt, "new_ids": new, "text": tokenizer.decode(new)}
    print(f"[{i}] {len(prompt)} prompt tokens -> {len(new)} new: {text!r} -> {result['text']!r}")
    results.append(result)
  if workdir is not None and distributed.is_writer():
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "generated.json", json.dumps(results, indent=2) + "\n")
  return results
