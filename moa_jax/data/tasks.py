"""Synthetic long-context tasks (docs/method.md section 7): seeded, offline, sized in tokens.

Tasks (the `TASKS` registry):
  lines    LongEval line retrieval: `line <adjective-noun>: REGISTER_CONTENT is <n>` lines
           (n uniform in 1..50000), then "Tell me what is the <REGISTER_CONTENT> in line <key>?
           I need the number." Metric: the last integer of the answer.
  passkey  a five-digit pass key hidden in repeated noise sentences. Metric: the last integer.
  niah     multi-key needle in a haystack: four "special magic number" needles (one asked, three
           distractors with other keys) in random filler sentences. Metric: answer containment.
  vt       RULER-style variable tracking: two chains `VAR A = 12345.`, `VAR B = A.`, ... hidden
           in noise; name every variable holding one chain's value. Metric: set recall.
  uuid     UUID key-value retrieval from a JSON object. Metric: answer containment.

A sample's size is measured as `len(tokenizer.encode(prompt))` on the raw task text and lies
within 5% of the requested length. `depth` is the relative position of the needle (0 = start of
the context, 1 = end). Prompts end with the question and a newline; the expected answer follows
directly, so `training_text(sample)` (prompt + answer) is the text a language model trains on.
Prompts are raw task text; `moa_jax.calibration.prompts.chat_prompt_ids` renders them.
"""

from __future__ import annotations

import dataclasses
import uuid as uuid_lib
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moa_jax.data import words

Tokenizer = Any  # anything with encode(text) -> list[int]; HF tokenizers in practice
Render = Callable[[np.random.Generator, int, float], tuple[str, str, float]]

DECILES = tuple((i + 0.5) / 10 for i in range(10))  # one depth at the centre of every decile
LENGTH_TOLERANCE = 0.05  # a sample's token count is within 5% of the requested length
_AIM = 0.015  # sizing stops early once this close
_MAX_FIT_STEPS = 8
_PROBE_UNITS = (8, 72)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One task instance.

  task: registry name; prompt: raw task text (no chat template); answer: expected answer;
  metric: name in `moa_jax.eval.metrics.METRICS`; depth: needle position in [0, 1];
  length: requested tokens; num_tokens: len(tokenizer.encode(prompt)).
  """

  task: str
  prompt: str
  answer: str
  metric: str
  depth: float
  length: int
  num_tokens: int

  @property
  def decile(self) -> int:
    """The depth decile 0..9."""
    return min(int(self.depth * 10), 9)


@dataclasses.dataclass(frozen=True)
class Task:
  """A generator: `render(rng, units, depth) -> (prompt, answer, actual depth)`.

  `units` (lines, sentences or key-value pairs) sets the length; at least `min_units`.
  """

  name: str
  metric: str
  render: Render
  min_units: int = 1


# --- task texts ------------------------------------------------------------------------------

_LINES_INTRO = (
  "Below is a record of lines I want you to remember. Each line begins with 'line <line index>'"
  " and ends with its <REGISTER_CONTENT>, a number. At the end of the record I will ask for the"
  " <REGISTER_CONTENT> of one line index.\n\n"
)
_PASSKEY_INTRO = (
  "There is an important piece of information hidden inside a lot of irrelevant text. Find it"
  " and memorize it. I will quiz you about it.\n\n"
)
_NIAH_INTRO = (
  "Some special magic numbers are hidden inside the following text. Make sure to memorize them."
  " I will quiz you about the numbers afterwards.\n\n"
)
_VT_INTRO = (
  "Memorize and track the chains of variable assignments hidden in the following text.\n\n"
)
_UUID_INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
_NOISE = (
  "The grass is green.",
  "The sky is blue.",
  "The sun is yellow.",
  "Here we go.",
  "There and back again.",
)
_VERBS = (
  "sees",
  "follows",
  "likes",
  "finds",
  "passes",
  "meets",
  "watches",
  "carries",
  "paints",
  "visits",
  "remembers",
  "greets",
)
_NIAH_NEEDLES = 4  # one asked, three distractors
_VT_CHAINS, _VT_HOPS = 2, 4  # two chains of five variables each


def _noise(n: int) -> list[str]:
  return [_NOISE[i % len(_NOISE)] for i in range(n)]


def _interleave(filler: Sequence[str], inserts: Sequence[tuple[int, str]]) -> list[str]:
  """Filler with each (position p, text) placed before filler unit p (stable for equal p)."""
  out, ordered, at = [], sorted(inserts, key=lambda x: x[0]), 0
  for i, unit in enumerate(filler):
    while at < len(ordered) and ordered[at][0] <= i:
      out.append(ordered[at][1])
      at += 1
    out.append(unit)
  out.extend(text for _, text in ordered[at:])
  return out


def _distinct_keys(rng: np.random.Generator, n: int) -> list[str]:
  if n > words.num_keys():
    raise ValueError(
      f"{n} keys requested but the word lists give only {words.num_keys()}: choose a shorter length"
    )
  return [words.key(int(i)) for i in rng.choice(words.num_keys(), size=n, replace=False)]


def _render_lines(rng: np.random.Generator, n: int, depth: float) -> tuple[str, str, float]:
  keys = _distinct_keys(rng, n)
  values = rng.integers(1, 50001, size=n)
  index = round(depth * (n - 1))
  body = "\n".join(f"line {k}: REGISTER_CONTENT is <{v}>" for k, v in zip(keys, values))
  question = f"Tell me what is the <REGISTER_CONTENT> in line {keys[index]}? I need the number."
  return f"{_LINES_INTRO}{body}\n\n{question}\n", str(values[index]), index / (n - 1)


def _render_passkey(rng: np.random.Generator, n: int, depth: float) -> tuple[str, str, float]:
  key = int(rng.integers(10000, 100000))
  at = round(depth * n)
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  body = " ".join(_interleave(_noise(n), [(at, needle)]))
  return f"{_PASSKEY_INTRO}{body}\n\nWhat is the pass key?\n", str(key), at / n


def _render_niah(rng: np.random.Generator, n: int, depth: float) -> tuple[str, str, float]:
  adjs, nns = words.adjectives(), words.nouns()
  picks = rng.integers(0, [len(adjs), len(nns), len(_VERBS), len(adjs), len(nns)], size=(n, 5))
  filler = [
    f"The {adjs[a]} {nns[b]} {_VERBS[c]} the {adjs[d]} {nns[e]}." for a, b, c, d, e in picks
  ]
  keys = _distinct_keys(rng, _NIAH_NEEDLES)
  values = rng.choice(9_000_000, size=_NIAH_NEEDLES, replace=False) + 1_000_000
  at = [round(depth * n)] + [int(p) for p in rng.integers(0, n + 1, size=_NIAH_NEEDLES - 1)]
  needles = [
    (p, f"One of the special magic numbers for {k} is: {v}.") for p, k, v in zip(at, keys, values)
  ]
  body = " ".join(_interleave(filler, needles))
  question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
  return f"{_NIAH_INTRO}{body}\n\n{question}\n", str(values[0]), at[0] / n


def _variable_names(rng: np.random.Generator, count: int) -> list[str]:
  names: list[str] = []
  while len(names) < count:
    name = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, size=5))
    if name not in names:
      names.append(name)
  return names


def _render_vt(rng: np.random.Generator, n: int, depth: float) -> tuple[str, str, float]:
  length = _VT_HOPS + 1
  names = _variable_names(rng, _VT_CHAINS * length)
  values = rng.choice(90000, size=_VT_CHAINS, replace=False) + 10000
  inserts = []
  for c in range(_VT_CHAINS):
    chain = names[c * length : (c + 1) * length]
    if c == 0:  # the asked chain starts at `depth` and spreads evenly towards the end
      spots = [round((depth + j * (1 - depth) / length) * n) for j in range(length)]
    else:
      spots = sorted(int(p) for p in rng.integers(0, n + 1, size=length))
    inserts += [(spots[0], f"VAR {chain[0]} = {values[c]}.")]
    inserts += [(spots[j], f"VAR {chain[j]} = {chain[j - 1]}.") for j in range(1, length)]
  body = " ".join(_interleave(_noise(n), inserts))
  question = f"Find all variables that are assigned the value {values[0]} in the text above."
  start = inserts[0][0]
  return f"{_VT_INTRO}{body}\n\n{question}\n", " ".join(names[:length]), start / n


def _uuid(rng: np.random.Generator) -> str:
  return str(uuid_lib.UUID(bytes=rng.bytes(16), version=4))


def _render_uuid(rng: np.random.Generator, n: int, depth: float) -> tuple[str, str, float]:
  pairs = [(_uuid(rng), _uuid(rng)) for _ in range(n)]
  index = round(depth * (n - 1))
  body = ",\n".join(f'  "{k}": "{v}"' for k, v in pairs)
  question = f'What is the value for the key "{pairs[index][0]}"?'
  return (
    f"{_UUID_INTRO}JSON data:\n{{\n{body}\n}}\n\n{question}\n",
    pairs[index][1],
    index / (n - 1),
  )


TASKS: dict[str, Task] = {
  "lines": Task("lines", "last_int", _render_lines, min_units=2),
  "passkey": Task("passkey", "last_int", _render_passkey),
  "niah": Task("niah", "contains", _render_niah),
  "vt": Task("vt", "set_recall", _render_vt),
  "uuid": Task("uuid", "contains", _render_uuid, min_units=2),
}


# --- sizing and the public API ---------------------------------------------------------------


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
  """len(tokenizer.encode(text)): the length measure of every sample."""
  return len(tokenizer.encode(text))


def _sample_rng(
  seed: int, task: str, length: int, index: int, stream: int = 0
) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index, stream])


def _fit(
  task: Task,
  tokenizer: Tokenizer,
  length: int,
  seed: int,
  index: int,
  depth: float,
  start: int,
  slope: float,
) -> tuple[int, Sample]:
  """Search the unit count whose prompt is closest to `length` tokens (secant steps)."""
  tried: dict[int, tuple[int, tuple[str, str, float]]] = {}
  units = start
  for _ in range(_MAX_FIT_STEPS):
    if units in tried:
      break
    rendered = task.render(_sample_rng(seed, task.name, length, index), units, depth)
    tried[units] = (count_tokens(tokenizer, rendered[0]), rendered)
    error = length - tried[units][0]
    if abs(error) <= _AIM * length:
      break
    units = max(task.min_units, units + round(error / slope))
  best = min(tried, key=lambda u: (abs(tried[u][0] - length), u))
  num_tokens, (prompt, answer, actual_depth) = tried[best]
  if abs(num_tokens - length) > LENGTH_TOLERANCE * length:
    raise ValueError(
      f"cannot size task {task.name!r} to {length} tokens (closest {num_tokens};"
      f" one unit is ~{slope:.0f} tokens): choose a longer length"
    )
  return best, Sample(task.name, prompt, answer, task.metric, actual_depth, length, num_tokens)


def make_samples(
  task: str,
  tokenizer: Tokenizer,
  length: int,
  num: int,
  seed: int = 0,
  depths: Sequence[float] | None = None,
  progress: bool = False,
) -> list[Sample]:
  """`num` samples of `task` whose prompts have `length` tokens (within 5%).

  Sample i has needle depth depths[i % len(depths)] (None: uniform random), and depends only
  on (seed, task, length, i), so results are reproducible and prefixes of larger sets.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  if length <= 0 or num < 0:
    raise ValueError(f"length must be positive and num non-negative, got {length}, {num}")
  if depths is not None and (not len(depths) or not all(0.0 <= d <= 1.0 for d in depths)):
    raise ValueError(f"depths must be a non-empty list of values in [0, 1], got {depths}")
  spec = TASKS[task]
  lo, hi = (spec.min_units + p for p in _PROBE_UNITS)
  probe = [
    count_tokens(tokenizer, spec.render(_sample_rng(seed, task, length, 0, stream=1), u, 0.5)[0])
    for u in (lo, hi)
  ]
  slope = max((probe[1] - probe[0]) / (hi - lo), 1e-3)  # tokens per unit
  units = max(spec.min_units, lo + round((length - probe[0]) / slope))
  samples = []
  for i in tqdm(range(num), desc=f"{task}@{length}", disable=not progress):
    depth = (
      float(_sample_rng(seed, task, length, i, stream=2).random())
      if depths is None
      else float(depths[i % len(depths)])
    )
    units, sample = _fit(spec, tokenizer, length, seed, i, depth, units, slope)
    samples.append(sample)
  return samples


def training_text(sample: Sample) -> str:
  """Prompt followed by the expected answer: one language-modelling example."""
  return sample.prompt + sample.answer


def make_training_texts(
  task: str, tokenizer: Tokenizer, length: int, num: int, seed: int = 0
) -> list[str]:
  """`num` training texts of `task` at `length` prompt tokens with uniformly random depths."""
  return [training_text(s) for s in make_samples(task, tokenizer, length, num, seed)]
