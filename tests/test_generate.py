"""generate: left-padded batches, the jit-compiled cached decode loop, greedy/sampling, eos."""

import jax
import numpy as np
import pytest
from flax import nnx

from moa_jax.generate import generate, left_pad

PROMPT_LENGTHS = (7, 3, 12)


@pytest.fixture(scope="module")
def prompts(tiny_config):
  rng = np.random.default_rng(11)
  return [rng.integers(3, tiny_config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def jitted_logits(model):
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, t, p: nnx.merge(graphdef, state)(t, p)[0])
  return lambda tokens, positions: np.asarray(forward(state, tokens, positions))


def teacher_forced_logits(logits_fn, sequences, length):
  """Logits [B, length, V] of a full forward (no cache) over sequences at the left of a buffer.

  Slots past each sequence get position -1, so no real token ever attends them.
  """
  tokens = np.zeros((len(sequences), length), np.int32)
  positions = np.full((len(sequences), length), -1, np.int32)
  for row, seq in enumerate(sequences):
    tokens[row, : len(seq)] = seq
    positions[row, : len(seq)] = np.arange(len(seq))
  return logits_fn(tokens, positions)


def naive_greedy(model, prompts, new_tokens):
  """Greedy decoding by recomputing the whole sequence each step (one compile: fixed buffer)."""
  logits_fn = jitted_logits(model)
  sequences = [list(p) for p in prompts]
  for _ in range(new_tokens):
    logits = teacher_forced_logits(logits_fn, sequences, max(map(len, prompts)) + new_tokens)
    for row, seq in enumerate(sequences):
      seq.append(int(logits[row, len(seq) - 1].argmax()))
  return [seq[len(p) :] for seq, p in zip(sequences, prompts)]


def test_left_pad():
  tokens, positions = left_pad([[5, 6, 7], [9]], pad_id=1)
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [1, 1, 9]])
  np.testing.assert_array_equal(positions, [[0, 1, 2], [-1, -1, 0]])
  with pytest.raises(ValueError, match="every prompt needs >= 1 token"):
    left_pad([[5], []])


def test_greedy_cached_batch_matches_recomputing_each_prompt(tiny_model, prompts):
  new = 10
  got = generate(tiny_model, prompts, new, eos_id=())
  assert [len(g) for g in got] == [new] * 3
  assert got == naive_greedy(tiny_model, prompts, new)


def test_eos_stops_only_its_row(tiny_model, prompts):
  free = generate(tiny_model, prompts, 10, eos_id=())
  eos = free[0][3]
  stopped = generate(tiny_model, prompts, 10, eos_id=eos, pad_id=0)
  for row_free, row_stopped in zip(free, stopped):
    cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
    assert row_stopped == row_free[:cut]
  assert len(stopped[0]) <= 4


def test_sampling_top_k_and_temperature(tiny_model, tiny_config, prompts):
  greedy = generate(tiny_model, prompts, 8, eos_id=())
  assert generate(tiny_model, prompts, 8, temperature=0.7, top_k=1, eos_id=()) == greedy
  key = jax.random.key(3)
  sampled = generate(tiny_model, prompts, 8, temperature=2.0, top_k=3, rng=key, eos_id=())
  assert sampled == generate(tiny_model, prompts, 8, temperature=2.0, top_k=3, rng=key, eos_id=())
  assert sampled != greedy
  assert sampled != generate(
    tiny_model, prompts, 8, temperature=2.0, top_k=3, rng=jax.random.key(4), eos_id=()
  )
  # Every sampled token is among the 3 most likely given the tokens before it.
  sequences = [p + s for p, s in zip(prompts, sampled)]
  logits = teacher_forced_logits(jitted_logits(tiny_model), sequences, max(map(len, sequences)))
  for row, (prompt, new) in enumerate(zip(prompts, sampled)):
    for i, token in enumerate(new):
      top3 = np.argsort(logits[row, len(prompt) + i - 1])[-3:]
      assert token in top3


def test_bad_arguments(tiny_model, prompts):
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
    generate(tiny_model, [[1, 256]], 2)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    generate(tiny_model, prompts, 0)
  with pytest.raises(ValueError, match=r"top_k must be in \[1, 256\]"):
    generate(tiny_model, prompts, 2, temperature=1.0, top_k=0)
