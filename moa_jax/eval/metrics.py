"""Answer metrics of the synthetic tasks, each `fn(prediction, answer) -> [0, 1]`.

`last_int` (LongEval, passkey), `contains` (NIAH, UUID), `set_recall` (variable tracking).
LongBench's metrics are in `moa_jax.eval.longbench`, computed as LongBench's own scorer does.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_DIGITS = re.compile(r"\d+")
_WORD = re.compile(r"\w+")


def last_int(prediction: str, answer: str) -> float:
  """1 if the last integer in the prediction equals the answer's integer (LongEval)."""
  found = _DIGITS.findall(prediction)
  return float(bool(found) and int(found[-1]) == int(answer))


def contains(prediction: str, answer: str) -> float:
  """1 if the answer string occurs in the prediction."""
  return float(answer.strip() in prediction)


def set_recall(prediction: str, answer: str) -> float:
  """Fraction of the answer's whitespace-separated items found as words of the prediction."""
  expected = set(answer.split())
  return len(expected & set(_WORD.findall(prediction))) / len(expected) if expected else 0.0


METRICS: dict[str, Callable[[str, str], float]] = {
  "last_int": last_int,
  "contains": contains,
  "set_recall": set_recall,
}


def score(metric: str, prediction: str, answer: str) -> float:
  """The named metric of a prediction against its answer."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
  return METRICS[metric](prediction, answer)
