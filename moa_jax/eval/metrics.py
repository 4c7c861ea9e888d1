"""Answer metrics: the synthetic tasks' and LongBench's, each `fn(prediction, answer) -> [0, 1]`.

Synthetic tasks: `last_int` (LongEval, passkey), `contains` (NIAH, UUID), `set_recall`
(variable tracking). LongBench (our implementations of its metric definitions): `qa_f1` /
`qa_f1_zh` (token F1 after normalization), `rouge_l` / `rouge_l_zh` (LCS F1), `edit_sim`
(code: 2 * LCS / total characters of the first code line, i.e. Levenshtein ratio with
substitution cost 2), `classification` (needs all_classes), `count`, `retrieval` /
`retrieval_zh`. Chinese variants use characters as tokens (LongBench segments words with jieba).
`score` takes the best over several reference answers, as LongBench does.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Hashable, Sequence

_DIGITS = re.compile(r"\d+")
_WORD = re.compile(r"\w+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_ZH = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_PUNCT = set(string.punctuation)
_PUNCT_ALL = _PUNCT | set(_PUNCT_ZH)


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
  """Length of the longest common subsequence (bit-parallel, O(len(a) * len(b) / wordsize))."""
  if not a or not b:
    return 0
  match: dict[Hashable, int] = {}
  for i, item in enumerate(a):
    match[item] = match.get(item, 0) | (1 << i)
  full = (1 << len(a)) - 1
  v = full  # zero bits of v mark LCS positions in a
  for item in b:
    u = v & match.get(item, 0)
    v = ((v + u) | (v - u)) & full
  return len(a) - bin(v).count("1")


# --- synthetic tasks -------------------------------------------------------------------------

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


# --- LongBench -------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
  """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh(text: str) -> str:
  """Lower case without punctuation (ASCII and Chinese) and without whitespace."""
  return "".join(ch for ch in text.lower() if ch not in _PUNCT_ALL and not ch.isspace())


def _f1(pred: Sequence[str], ref: Sequence[str]) -> float:
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answer: str) -> float:
  """Token F1 between normalized prediction and answer."""
  return _f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh(prediction: str, answer: str) -> float:
  """Character F1 between normalized Chinese prediction and answer."""
  return _f1(list(normalize_zh(prediction)), list(normalize_zh(answer)))


def _lcs_f1(pred: Sequence[str], ref: Sequence[str]) -> float:
  lcs = lcs_length(pred, ref)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(pred), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, answer: str) -> float:
  """ROUGE-L F1: longest common subsequence of lower-cased words."""
  return _lcs_f1(_WORD.findall(prediction.lower()), _WORD.findall(answer.lower()))


def rouge_l_zh(prediction: str, answer: str) -> float:
  """ROUGE-L F1 over the characters of normalized Chinese text."""
  return _lcs_f1(list(normalize_zh(prediction)), list(normalize_zh(answer)))


def first_code_line(prediction: str) -> str:
  """The first line that is not blank, a code fence or a comment (LongBench's code scoring)."""
  for line in prediction.lstrip("\n").split("\n"):
    if line.strip() and not line.lstrip().startswith(("`", "#", "//")):
      return line
  return ""


def edit_sim(prediction: str, answer: str) -> float:
  """Edit similarity of the first code line: 2 * LCS / (len(pred) + len(answer)) in chars."""
  line = first_code_line(prediction)
  total = len(line) + len(answer)
  return 2 * lcs_length(line, answer) / total if total else 1.0


def classification(prediction: str, answer: str, all_classes: Sequence[str]) -> float:
  """1 / (#classes named) if the true class is among the class names found in the prediction.

  A found name that is part of another found name ("positive" in "very positive") is dropped.
  """
  found = [c for c in all_classes if c in prediction]
  found = [c for c in found if not any(c != o and c in o for o in found)]
  return 1.0 / len(found) if answer in found else 0.0


def _share_equal(numbers: list[str], truth: str) -> float:
  return sum(n == truth for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, answer: str) -> float:
  """Share of the integers in the prediction that equal the answer (passage_count)."""
  return _share_equal(_DIGITS.findall(prediction), answer.strip())


def retrieval(prediction: str, answer: str) -> float:
  """Share of the integers in the prediction equal to the paragraph number in `Paragraph k`."""
  truth = re.findall(r"Paragraph (\d+)", answer)
  return _share_equal(_DIGITS.findall(prediction), truth[0]) if truth else 0.0


def retrieval_zh(prediction: str, answer: str) -> float:
  """As `retrieval` for the Chinese `段落k` answers."""
  truth = re.findall(r"段落(\d+)", answer)
  return _share_equal(_DIGITS.findall(prediction), truth[0]) if truth else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "last_int": last_int, "contains": contains, "set_recall": set_recall,
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge_l": rouge_l, "rouge_l_zh": rouge_l_zh,
    "edit_sim": edit_sim, "classification": classification, "count": count,
    "retrieval": retrieval, "retrieval_zh": retrieval_zh,
}


def score(metric: str, prediction: str, answers: str | Sequence[str], *,
          all_classes: Sequence[str] | None = None) -> float:
  """The metric's best value over the reference answers (a string is one answer)."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
  answers = [answers] if isinstance(answers, str) else list(answers)
  if not answers:
    raise ValueError("no reference answers to score against")
  if metric == "classification":
    if not all_classes:
      raise ValueError("the classification metric needs all_classes")
    return max(classification(prediction, a, all_classes) for a in answers)
  return max(METRICS[metric](prediction, a) for a in answers)
