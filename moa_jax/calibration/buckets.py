"""Calibration buckets straight from the task suite and from long documents.

Besides `build.build_calibration` (records of {context, question} cut to fit, answered by the
model), two sources sized in the model's own tokens, so nothing needs cutting:
  * `task_bucket`: seeded samples of a synthetic task (`moa_jax.data.tasks`) in the chat
    template; the response is the task's expected answer ('reference') or the dense model's
    greedy answer ('model');
  * `document_bucket`: the last `length` tokens of long documents (`moa_jax.data.longtext`);
    the response is each document's own last `target_tokens` ('reference') or the model's
    greedy continuation of the context before them ('model').
A bucket is right padded to `length` tokens (`CalibrationBucket`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moa_jax.calibration import prompts
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.data import longtext, tasks

ANSWERS = ("reference", "model")


def _check_answers(answers: str) -> None:
  if answers not in ANSWERS:
    raise ValueError(f"unknown calibration answers {answers!r}; choose one of {ANSWERS}")


def _model_answers(
  model,
  tokenizer,
  prompt_ids: Sequence[list[int]],
  max_new_tokens: int,
  stop: bool,
  batch_size: int,
) -> list[list[int]]:
  from moa_jax.generate import generate  # the model package is only needed for model answers

  eos = prompts.stop_ids(tokenizer, model.config.eos_token_ids) if stop else ()
  out = []
  for start in range(0, len(prompt_ids), batch_size):
    out += generate(model, prompt_ids[start : start + batch_size], max_new_tokens, eos_id=eos)
  return [o if o else [tokenizer.eos_token_id] for o in out]


def pack(
  samples: Sequence[tuple[list[int], list[int]]], length: int, pad_id: int = 0
) -> CalibrationBucket:
  """(prompt ids, response ids) pairs -> a bucket right padded to `length` tokens."""
  if not samples:
    raise ValueError("a calibration bucket needs at least one sample")
  tokens = np.full((len(samples), length), pad_id, np.int32)
  loss_mask = np.zeros((len(samples), length), bool)
  lengths = np.zeros(len(samples), np.int32)
  for row, (prompt, response) in enumerate(samples):
    sample = list(prompt) + list(response)
    if len(sample) > length or not prompt or not response:
      raise ValueError(
        f"sample {row}: prompt {len(prompt)} + response {len(response)} tokens "
        f"must be non-empty and fit the length {length}"
      )
    tokens[row, : len(sample)] = sample
    loss_mask[row, len(prompt) : len(sample)] = True
    lengths[row] = len(sample)
  return CalibrationBucket(tokens, loss_mask, lengths)


def task_bucket(
  model,
  tokenizer,
  task: str,
  length: int,
  num: int,
  *,
  seed: int,
  answers: str = "reference",
  max_new_tokens: int = 16,
  template: str = "auto",
  depths: Sequence[float] | None = None,
  fill: float = 0.9,
  batch_size: int = 4,
) -> CalibrationBucket:
  """`num` samples of `task` in the chat template (needle depths spread evenly over 0.05..0.95
  by default), the raw prompt sized to `fill` of what the template and max_new_tokens leave of
  `length`, with the expected answer or the model's greedy answer (up to max_new_tokens) as the
  response."""
  _check_answers(answers)
  depths = tuple(np.linspace(0.05, 0.95, num)) if depths is None else tuple(depths)
  overhead = len(prompts.chat_prompt_ids(tokenizer, "", template))
  samples = tasks.make_samples(
    task, tokenizer, int(fill * (length - overhead - max_new_tokens)), num, seed=seed, depths=depths
  )
  prompt_ids = [prompts.chat_prompt_ids(tokenizer, s.prompt, template) for s in samples]
  if answers == "reference":
    responses = [prompts.answer_ids(tokenizer, s.answer) for s in samples]
  else:
    responses = _model_answers(model, tokenizer, prompt_ids, max_new_tokens, True, batch_size)
  return pack(list(zip(prompt_ids, responses)), length, _pad_id(tokenizer))


def document_bucket(
  model,
  tokenizer,
  documents: Sequence[longtext.Document],
  length: int,
  *,
  target_tokens: int = 64,
  answers: str = "reference",
  batch_size: int = 4,
) -> CalibrationBucket:
  """Each document's last `length` tokens: the context, then its own last `target_tokens`
  ('reference') or the model's greedy continuation of that many tokens ('model')."""
  _check_answers(answers)
  windows = [longtext.scored_window(tokenizer, d, length, target_tokens) for d in documents]
  contexts = [c for c, _ in windows]
  if answers == "reference":
    responses = [t for _, t in windows]
  else:
    responses = _model_answers(model, tokenizer, contexts, target_tokens, False, batch_size)
  return pack(list(zip(contexts, responses)), length, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
