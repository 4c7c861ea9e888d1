"""Batched autoregressive generation: left-padded prompts, one prefill, a jit-compiled decode loop.

The attention implementation (and so the KV cache) is a parameter: DenseAttention by default,
MoA's sparse attention with its static per-head cache plugs in unchanged.
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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
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
    tokens[row, t - len(prompt):] = prompt
    positions[row, t - len(prompt):] = np.arange(len(prompt))
  return tokens, positions


def _choose(logits: jax.Array, key: jax.Array, temperature: jax.Array, greedy: bool,
            top_k: int | None) -> jax.Array:
  """Next tokens [B] from float32 logits [B, V]: argmax, or a sample at `temperature` (top_k)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "max_new_tokens", "greedy",
                                             "top_k"))
def _generate_jit(graphdef, state, tokens, positions, rng, temperature, eos_ids, pad_id, *,
                  attention, max_new_tokens, greedy, top_k):
  """[B, max_new_tokens] int32 new tokens; pad_id after a row's eos."""
  model = nnx.merge(graphdef, state)
  b, t = tokens.shape
  caches = attention.init_cache(model.config, b, t + max_new_tokens, None)
  logits, caches = model(tokens, positions, attention=attention, caches=caches)  # [B, T, V]
  rng, key = jax.random.split(rng)
  token = _choose(logits[:, -1], key, temperature, greedy, top_k)  # [B]
  done = jnp.isin(token, eos_ids)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

  def keep_going(carry):
    step, *_, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def decode_step(carry):
    step, token, pos, caches, rng, done, out = carry
    logits, caches = model(token[:, None], pos[:, None], attention=attention, caches=caches)
    rng, key = jax.random.split(rng)
    token = jnp.where(done, pad_id, _choose(logits[:, 0], key, temperature, greedy, top_k))
    out = out.at[:, step].set(token)
    return step + 1, token, pos + 1, caches, rng, done | jnp.isin(token, eos_ids), out

  carry = (jnp.int32(1), token, positions[:, -1] + 1, caches, rng, done, out)
  return jax.lax.while_loop(keep_going, decode_step, carry)[-1]


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             attention: Attention | None = None, temperature: float = 0.0,
             top_k: int | None = None, rng: jax.Array | None = None,
             eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
             pad_multiple: int = 64) -> list[list[int]]:
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
    pad_multiple: prompts are left-padded to a multiple of this (fewer recompilations); the
      planned total length (cache size) is the padded length + max_new_tokens.
  Returns:
    B lists of new tokens, each ending at (and including) its first eos token.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  vocab = model.config.vocab_size
  if top_k is not None and not 1 <= top_k <= vocab:
    raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
  tokens, positions = left_pad(prompts, pad_id, pad_multiple)
  if tokens.min() < 0 or tokens.max() >= vocab:
    raise ValueError(f"prompt token ids must be in [0, {vocab}), got {tokens.min()}..{tokens.max()}")
  eos = model.config.eos_token_ids if eos_id is None else eos_id
  eos_ids = np.asarray([eos] if isinstance(eos, int) else list(eos), np.int32)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  out = _generate_jit(
      graphdef, state, tokens, positions, rng, jnp.float32(max(temperature, 1e-6)), eos_ids,
      jnp.int32(pad_id), attention=DenseAttention() if attention is None else attention,
      max_new_tokens=max_new_tokens, greedy=temperature == 0, top_k=top_k)
  results = []
  for row in np.asarray(out).tolist():
    stops = [i for i, token in enumerate(row) if token in set(eos_ids.tolist())]
    results.append(row[:stops[0] + 1] if stops else row)
  return results


def generate_command(config, workdir: Path | None) -> list[dict]:
  """`python -m moa_jax generate`: load a model (and a plan), generate, print, save.

  config fields: see configs/generate.py. Returns one dict per prompt (prompt, its ids, the new
  ids and their text), also written to workdir/generated.json if given.
  """
  from moa_jax import validate
  from moa_jax.attention.moa import MoAAttention
  from moa_jax.calibration.prompts import chat_prompt_ids
  from moa_jax.models.loading import load_model
  from moa_jax.plans.plan import Plan

  validate.generate(config, workdir)
  model, tokenizer, model_id = load_model(config.model)
  attention = None
  if config.plan:
    attention = MoAAttention.from_plan(Plan.load(config.plan).validate(model.config))
  prompts = [chat_prompt_ids(tokenizer, text) if config.chat else tokenizer(text)["input_ids"]
             for text in config.prompts]
  new_tokens = generate(model, prompts, config.max_new_tokens, attention=attention,
                        temperature=config.temperature, top_k=config.top_k or None,
                        rng=jax.random.key(config.seed))
  print(f"{model_id}, {'plan ' + config.plan if config.plan else 'dense attention'}")
  results = []
  for i, (text, prompt, new) in enumerate(zip(config.prompts, prompts, new_tokens)):
    result = {"prompt": text, "prompt_ids": prompt, "new_ids": new,
              "text": tokenizer.decode(new)}
    print(f"[{i}] {len(prompt)} prompt tokens -> {len(new)} new: {text!r} -> {result['text']!r}")
    results.append(result)
  if workdir is not None:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "generated.json", json.dumps(results, indent=2) + "\n")
  return results
