"""Training batches for the reference model: natural text mixed with the synthetic tasks.

Every row of a batch is `seq_len` tokens packed with documents, each starting with `<s>`:
  natural  a window of the tokenized Python standard library (`natural_tokens`),
  lines    a LongEval line-retrieval prompt in the chat template, its answer, then extra
           question/answer turns about other lines of the same record (more retrieval signal per
           token; the first turn is exactly the evaluation prompt),
  passkey, niah, vt, uuid   one chat-formatted prompt of `moa_jax.data.tasks` and its answer.
The row's last free tokens are filled with natural text, so no compute is spent on padding.
Loss weights: 1 on text, `answer_weight` on answer tokens (and their `</s>`), 0 on nothing else.
A batch depends only on (seed, step, seq_len, batch_size): training resumes on identical data.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from moa_jax.calibration import prompts
from moa_jax.calibration.prompts import answer_turn, user_turn
from moa_jax.data import tasks
from moa_jax.train.tokenizer import BOS, BOS_ID, EOS, PAD_ID

TASK_NAMES = ("lines", "passkey", "niah", "vt", "uuid")
_LINE = re.compile(r"^line (\S+): REGISTER_CONTENT is <(\d+)>$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Batch:
  """tokens, positions: int32 [B, T]; targets: int32 [B, T] (next token); weights: f32 [B, T]."""

  tokens: np.ndarray
  positions: np.ndarray
  targets: np.ndarray
  weights: np.ndarray


@dataclasses.dataclass(frozen=True)
class Doc:
  """Text segments of one document and whether each is an answer (weighted by answer_weight)."""

  segments: tuple[str, ...]
  is_answer: tuple[bool, ...]


def render_doc(rng: np.random.Generator, source: str, units: int, extra_questions: int = 0) -> Doc:
  """A chat-formatted document of task `source` with `units` units (lines, sentences, pairs);
  line retrieval adds `extra_questions` question/answer turns about other lines."""
  if source == "lines":
    return _lines_doc(rng, units, extra_questions)
  return _task_doc(rng, source, units)


def _lines_doc(rng: np.random.Generator, units: int, extra_questions: int) -> Doc:
  prompt, answer, _ = tasks.TASKS["lines"].render(rng, units, float(rng.random()))
  segments, is_answer = [BOS + user_turn(prompt), answer_turn(answer, EOS)], [False, True]
  pairs = _LINE.findall(prompt)
  question = prompt.rstrip("\n").rsplit("\n", 1)[-1]  # the question: last line of the prompt
  asked = question.split(" in line ", 1)[1].split("?", 1)[0]
  for i in rng.choice(len(pairs), size=min(extra_questions, len(pairs)), replace=False):
    key, value = pairs[int(i)]
    segments += [
      user_turn(question.replace(f" {asked}?", f" {key}?") + "\n"),
      answer_turn(value, EOS),
    ]
    is_answer += [False, True]
  return Doc(tuple(segments), tuple(is_answer))


def _task_doc(rng: np.random.Generator, task: str, units: int) -> Doc:
  prompt, answer, _ = tasks.TASKS[task].render(rng, units, float(rng.random()))
  return Doc((BOS + user_turn(prompt), answer_turn(answer, EOS)), (False, True))


class Mixture:
  """Builds packed, weighted batches from natural tokens and freshly rendered task documents.

  Args:
    tokenizer: the fast tokenizer (its Rust backend encodes whole batches in parallel).
    natural_tokens: uint16/int32 [N] tokenized natural text (documents separated by <s>).
    mix: {source: probability} over "natural" and TASK_NAMES.
    answer_weight: loss weight of answer tokens.
    min_doc: documents are at least this many tokens; smaller leftovers become natural text.
    full_row: probability that a row's first document fills the whole row.
  """

  def __init__(
    self,
    tokenizer: Any,
    natural_tokens: np.ndarray,
    mix: dict[str, float],
    *,
    answer_weight: float = 4.0,
    min_doc: int = 160,
    full_row: float = 0.5,
    seed: int = 0,
  ):
    unknown = set(mix) - {"natural", *TASK_NAMES}
    if unknown or not mix:
      raise ValueError(
        f"mix sources {sorted(unknown)} unknown; use natural, {', '.join(TASK_NAMES)}"
      )
    if len(natural_tokens) < 1 << 14:
      raise ValueError(f"only {len(natural_tokens)} natural tokens; need at least 16384")
    self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    self.natural = np.asarray(natural_tokens)
    self.sources = tuple(mix)
    self.probs = np.asarray([mix[s] for s in self.sources], np.float64)
    self.probs /= self.probs.sum()
    self.answer_weight, self.min_doc, self.full_row, self.seed = (
      answer_weight,
      min_doc,
      full_row,
      seed,
    )
    self._tokens_per_unit = {t: self._probe(t) for t in self.sources if t != "natural"}

  def _encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

  def _probe(self, task: str) -> tuple[float, float, float]:
    """(tokens of the fixed text, per unit, per extra question) of a task, from three renders."""
    rng = np.random.default_rng(12345)
    size = lambda units, questions: sum(
      map(len, self._encode(render_doc(rng, task, units, questions).segments))
    )
    low, high = size(8, 0), size(64, 0)
    per_unit = (high - low) / 56
    per_question = (size(64, 8) - high) / 8 if task == "lines" else 0.0
    return low - per_unit * 8, per_unit, per_question

  def _plan_doc(self, rng: np.random.Generator, source: str, budget: int) -> Doc | int:
    """A task document aimed at <= `budget` tokens, or the budget itself for natural text."""
    if source == "natural":
      return budget
    fixed, per_unit, per_question = self._tokens_per_unit[source]
    extra = budget // 256 if source == "lines" else 0
    units = int((0.95 * budget - fixed - 1.1 * extra * per_question) / per_unit)
    if units < tasks.TASKS[source].min_units:
      return budget
    return render_doc(rng, source, units, extra)

  def _natural(self, rng: np.random.Generator, n: int) -> np.ndarray:
    start = int(rng.integers(0, len(self.natural) - n))
    window = self.natural[start : start + n].astype(np.int32)
    window[0] = BOS_ID
    return window

  def batch(self, step: int, batch_size: int, seq_len: int) -> Batch:
    """The batch of training step `step`: [batch_size, seq_len] rows plus the next-token target."""
    rng = np.random.default_rng([self.seed, step, seq_len, batch_size])
    length = seq_len + 1  # one extra token gives the last position's target
    plans: list[list[Doc | int]] = []
    for _ in range(batch_size):
      row, free = [], length
      while free >= self.min_doc:
        size = (
          free
          if (not row and rng.random() < self.full_row)
          else int(rng.integers(self.min_doc, free + 1))
        )
        row.append(
          self._plan_doc(rng, self.sources[rng.choice(len(self.sources), p=self.probs)], size)
        )
        free -= size
      plans.append(row)
    docs = [d for row in plans for d in row if isinstance(d, Doc)]
    encoded = iter(self._encode([s for d in docs for s in d.segments]))
    tokens = np.full((batch_size, length), PAD_ID, np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for b, row in enumerate(plans):
      at = 0
      for doc in row:
        if isinstance(doc, int):
          ids, wts = self._natural(rng, doc), np.ones(doc, np.float32)
        else:
          parts = [next(encoded) for _ in doc.segments]
          ids = np.concatenate([np.asarray(p, np.int32) for p in parts])
          wts = np.concatenate(
            [
              np.full(len(p), self.answer_weight if a else 1.0, np.float32)
              for p, a in zip(parts, doc.is_answer)
            ]
          )
        if at + len(ids) > length:  # a rare over-long render: replace it with natural text
          ids, wts = self._natural(rng, length - at), np.ones(length - at, np.float32)
        tokens[b, at : at + len(ids)], weights[b, at : at + len(ids)] = ids, wts
        at += len(ids)
      if at < length:
        tokens[b, at:], weights[b, at:] = self._natural(rng, length - at), 1.0
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))
    # The weight of predicting token t+1 belongs to that token; <s> is never a target.
    target_w = weights[:, 1:] * (tokens[:, 1:] != BOS_ID)
    return Batch(tokens[:, :-1], np.array(positions), tokens[:, 1:], target_w)


def line_retrieval_probe(
  tokenizer: Any, seq_len: int, lengths: Sequence[int], num: int, seed: int = 1
) -> tuple[np.ndarray, list[tuple[int, int, list[int]]]]:
  """Held-out single-question line-retrieval prompts for teacher-forced accuracy in training.

  `num` chat-formatted prompts of each of `lengths` tokens (each < seq_len) with their answers,
  right-padded with <pad> into tokens [num * len(lengths), seq_len], and per row
  (row, first answer position, answer ids): greedy decoding gives the answer exactly iff the
  argmax at positions first-1 .. first+len-2 equals the answer ids.
  """
  rows, spans = [], []
  for length in lengths:
    for s in tasks.make_samples("lines", tokenizer, length, num, seed=seed):
      prompt = prompts.chat_prompt_ids(tokenizer, s.prompt)
      answer = prompts.answer_ids(tokenizer, answer_turn(s.answer, EOS))
      if len(prompt) + len(answer) > seq_len:
        raise ValueError(f"probe length {length} does not fit in {seq_len} tokens")
      spans.append((len(rows), len(prompt), answer))
      rows.append(prompt + answer)
  tokens = np.full((len(rows), seq_len), PAD_ID, np.int32)
  for i, ids in enumerate(rows):
    tokens[i, : len(ids)] = ids
  return tokens, spans


def prefetch(
  make: Callable[[int], Batch], steps: Iterator[int], *, workers: int = 4, depth: int = 8
) -> Iterator[tuple[int, Batch]]:
  """Yields (step, make(step)) in step order, with up to `depth` batches built ahead by
  `workers` threads (the tokenizer's Rust encoder runs outside the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    ahead: collections.deque = collections.deque()
    try:
      for step in steps:
        ahead.append((step, pool.submit(make, step)))
        if len(ahead) >= depth:
          step, future = ahead.popleft()
          yield step, future.result()
      while ahead:
        step, future = ahead.popleft()
        yield step, future.result()
    finally:
      for _, future in ahead:
        future.cancel()
