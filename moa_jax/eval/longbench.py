"""LongBench's scores, computed as LongBench's own scorer computes them.

LongBench (THUDM/LongBench, `eval.py` with `metrics.py`) scores a prediction against each of a
record's reference answers and keeps the best; for trec, triviaqa, samsum and lsht it first cuts
the prediction to its first line (after leading newlines). The metric of each dataset
(`DATASET_METRIC`) and every metric's rules follow that scorer, through the packages it uses:
ROUGE-L is the `rouge` package's `rouge-l` F (any error of the package scores 0), the code
similarity is `fuzzywuzzy`'s `fuzz.ratio` / 100 (we install `python-Levenshtein`, fuzzywuzzy's
fast backend; without it fuzzywuzzy falls back to difflib, whose matches can differ) and the
Chinese metrics segment words with `jieba`. Scores are means x 100, overall and per LongBench-E
length bucket (0-4k, 4-8k, 8k+ of a record's `length`); LongBench prints them rounded to 2
decimals, we keep them unrounded.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jieba
from fuzzywuzzy import fuzz
from rouge import Rouge

BUCKETS = ("0-4k", "4-8k", "8k+")
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

_DIGITS = re.compile(r"\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# LongBench's Chinese punctuation (it has the closing 》 but not the opening 《).
_PUNCT_ZH = (
  "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
  "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_PUNCT = frozenset(string.punctuation)
_PUNCT_ALL = _PUNCT | frozenset(_PUNCT_ZH)


def normalize_answer(text: str) -> str:
  """English answers: lower case, ASCII punctuation removed, then articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
  """Chinese answers: lower case, ASCII and Chinese punctuation and all whitespace removed."""
  return "".join("".join(ch for ch in text.lower() if ch not in _PUNCT_ALL).split())


def _f1(pred: Sequence[str], ref: Sequence[str]) -> float:
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def _words_zh(text: str) -> list[str]:
  """jieba's words (accurate mode), each normalized, empty ones dropped."""
  return [w for w in map(normalize_zh_answer, jieba.cut(text, cut_all=False)) if w]


def qa_f1(prediction: str, answer: str) -> float:
  """Token F1 of the normalized prediction and answer (whitespace tokens)."""
  return _f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh(prediction: str, answer: str) -> float:
  """Word F1 over jieba's normalized words."""
  return _f1(_words_zh(prediction), _words_zh(answer))


def rouge_l(prediction: str, answer: str) -> float:
  """The `rouge` package's ROUGE-L F (sentences split at '.', words at whitespace); 0 where
  the package raises (an empty side, or one made only of dots), as LongBench's scorer does."""
  try:
    return Rouge().get_scores([prediction], [answer], avg=True)["rouge-l"]["f"]
  except Exception:  # LongBench catches every error of the package as a score of 0
    return 0.0


def rouge_l_zh(prediction: str, answer: str) -> float:
  """ROUGE-L over jieba's words (joined by spaces, not normalized)."""
  return rouge_l(
    " ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(answer, cut_all=False))
  )


def first_code_line(prediction: str) -> str:
  """The first line (after leading newlines) that contains no '`', no '#' and no '//',
  blank or not; '' when every line has one."""
  for line in prediction.lstrip("\n").split("\n"):
    if "`" not in line and "#" not in line and "//" not in line:
      return line
  return ""


def edit_sim(prediction: str, answer: str) -> float:
  """fuzzywuzzy's `fuzz.ratio` / 100 of the first code line and the answer line."""
  return fuzz.ratio(first_code_line(prediction), answer) / 100


def classification(prediction: str, answer: str, all_classes: Sequence[str]) -> float:
  """1 / (#classes named) if the true class is among the class names in the prediction.

  A found name that is a proper part of the true class is dropped. LongBench drops them while
  walking the same list, so the entry right after a dropped one is never examined; kept as it
  is, for equal scores.
  """
  found = [c for c in all_classes if c in prediction]
  i = 0
  while i < len(found):
    if found[i] in answer and found[i] != answer:
      del found[found.index(found[i])]  # the first equal entry, as list.remove
    i += 1
  return 1.0 / len(found) if answer in found else 0.0


def _share_equal(numbers: list[str], truth: str) -> float:
  return sum(n == truth for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, answer: str) -> float:
  """Share of the integers in the prediction that equal the answer (passage_count)."""
  return _share_equal(_DIGITS.findall(prediction), answer)


def _retrieval(pattern: str, prediction: str, answer: str) -> float:
  truth = re.findall(pattern, answer)
  if not truth:
    raise ValueError(f"answer {answer!r} names no paragraph (expected {pattern!r})")
  return _share_equal(_DIGITS.findall(prediction), truth[0])


def retrieval(prediction: str, answer: str) -> float:
  """Share of the integers in the prediction equal to k of the answer's `Paragraph k`."""
  return _retrieval(r"Paragraph (\d+)", prediction, answer)


def retrieval_zh(prediction: str, answer: str) -> float:
  """As `retrieval` for the Chinese `段落k` answers."""
  return _retrieval(r"段落(\d+)", prediction, answer)


METRICS: dict[str, Callable[..., float]] = {
  "qa_f1": qa_f1,
  "qa_f1_zh": qa_f1_zh,
  "rouge_l": rouge_l,
  "rouge_l_zh": rouge_l_zh,
  "edit_sim": edit_sim,
  "classification": classification,
  "count": count,
  "retrieval": retrieval,
  "retrieval_zh": retrieval_zh,
}

# LongBench's dataset -> metric (its eval.py's dataset2metric, in our metric names).
DATASET_METRIC: dict[str, str] = {
  "narrativeqa": "qa_f1",
  "qasper": "qa_f1",
  "multifieldqa_en": "qa_f1",
  "multifieldqa_zh": "qa_f1_zh",
  "hotpotqa": "qa_f1",
  "2wikimqa": "qa_f1",
  "musique": "qa_f1",
  "dureader": "rouge_l_zh",
  "gov_report": "rouge_l",
  "qmsum": "rouge_l",
  "multi_news": "rouge_l",
  "vcsum": "rouge_l_zh",
  "trec": "classification",
  "triviaqa": "qa_f1",
  "samsum": "rouge_l",
  "lsht": "classification",
  "passage_retrieval_en": "retrieval",
  "passage_count": "count",
  "passage_retrieval_zh": "retrieval_zh",
  "lcc": "edit_sim",
  "repobench-p": "edit_sim",
}


def dataset_metric(dataset: str) -> str:
  """The metric name of a LongBench or LongBench-E (`<name>_e`) dataset."""
  base = dataset.removesuffix("_e")
  if base not in DATASET_METRIC:
    raise ValueError(
      f"unknown LongBench dataset {dataset!r}; choose one of {sorted(DATASET_METRIC)}"
    )
  return DATASET_METRIC[base]


def score_record(record: Mapping[str, Any], prediction: str) -> float:
  """A record's LongBench score in [0, 1]: its dataset's metric, best over its answers (from 0)."""
  dataset = record["dataset"]
  metric = dataset_metric(dataset)
  answers = record["answers"]
  answers = [answers] if isinstance(answers, str) else list(answers)
  if not answers:
    raise ValueError(f"{dataset} record {record.get('_id')!r} has no reference answers")
  options = {}
  if metric == "classification":
    if not record.get("all_classes"):
      raise ValueError(f"{dataset} record {record.get('_id')!r} lacks all_classes")
    options["all_classes"] = record["all_classes"]
  if dataset.removesuffix("_e") in FIRST_LINE_DATASETS:
    prediction = prediction.lstrip("\n").split("\n")[0]
  return max([0.0] + [METRICS[metric](prediction, a, **options) for a in answers])


def length_bucket(length: int) -> str:
  """'0-4k', '4-8k' or '8k+' for a record's `length` field (LongBench-E's buckets)."""
  return BUCKETS[0] if length < 4000 else BUCKETS[1] if length < 8000 else BUCKETS[2]


def evaluate_predictions(
  records: Sequence[Mapping[str, Any]], predictions: Sequence[str]
) -> dict[str, dict[str, float]]:
  """Mean score x 100 and count, overall ('all') and per length bucket (empty buckets left out)."""
  if len(records) != len(predictions):
    raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
  groups: dict[str, list[float]] = {}
  for record, prediction in zip(records, predictions):
    value = score_record(record, prediction)
    for key in ("all", length_bucket(record["length"])):
      groups.setdefault(key, []).append(value)
  return {
    k: {"score": 100 * sum(groups[k]) / len(groups[k]), "count": len(groups[k])}
    for k in ("all",) + BUCKETS
    if k in groups
  }
