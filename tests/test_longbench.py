"""LongBench: the loader and prompts on tests/data/longbench_tiny, and the scores against the
packages LongBench's scorer uses (`rouge`, `fuzzywuzzy`, `jieba`) on a large random and
adversarial set of predictions (code fences, blank lines, comments, Chinese text, empty ones)."""

import collections
import pathlib
import random
import subprocess
import sys

import jieba
import pytest
from fuzzywuzzy import fuzz
from rouge import Rouge

from moa_jax.data import longbench as longbench_data
from moa_jax.eval import longbench as lb

LONGBENCH_TINY = pathlib.Path(__file__).parent / "data" / "longbench_tiny"

WORDS = (
  "the a an cat sat on mat dog ran big red ball The Cat A sat. mat, dog! Ran? "
  "it's re-run (red) [ball] 3 42"
).split()
ZH = (
  "我 爱 北京 天安门 今天 天气 很 好 红楼梦 作者 是 曹雪芹 会议 记录 总结 ， 。 《 》 “ ” ！ ？ 、"
).split()
CODE = (
  "x = foo(1)",
  "return a + b",
  "    total += x",
  "a / b",
  "",
  "   ",
  "y=2\r",
  "print('hi')",
  "if x:",
  "",
)
JUNK = ("`", "#", "//")


def _english(rng: random.Random) -> str:
  text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14)))
  return rng.choice(["", " ", "\n", ".", "...", " . . "]) if rng.random() < 0.08 else text


def _chinese(rng: random.Random) -> str:
  text = "".join(rng.choice(ZH) for _ in range(rng.randint(0, 10)))
  return text if rng.random() > 0.1 else rng.choice(["", "。", "！？", " "])


def predictions(rng: random.Random, n: int, kind) -> list[tuple[str, str]]:
  return [(kind(rng), kind(rng)) for _ in range(n)] + [
    ("", ""),
    ("", "a"),
    ("a", ""),
    (".", "."),
    ("a.", "a"),
    ("\n\n", "x"),
  ]


def rouge_package(prediction: str, answer: str) -> float:
  """ROUGE-L F straight from the package (only rouge-l computed); 0 where it raises."""
  try:
    return Rouge(metrics=["rouge-l"]).get_scores(prediction, answer)[0]["rouge-l"]["f"]
  except ValueError:
    return 0.0


# --- metrics against the packages --------------------------------------------------------------


def test_rouge_l_is_the_rouge_package():
  pairs = predictions(random.Random(0), 400, _english)
  for prediction, answer in pairs:
    assert lb.rouge_l(prediction, answer) == rouge_package(prediction, answer), (prediction, answer)
  assert sum(lb.rouge_l(p, a) > 0 for p, a in pairs) > 200  # the set is not all zeros


def test_rouge_l_zh_is_the_rouge_package_over_jieba_words():
  for prediction, answer in predictions(random.Random(1), 150, _chinese):
    expected = rouge_package(" ".join(jieba.lcut(prediction)), " ".join(jieba.lcut(answer)))
    assert lb.rouge_l_zh(prediction, answer) == expected, (prediction, answer)


def test_rouge_l_discrepancy_of_an_lcs_f1_over_all_words():
  # An LCS-F1 over all words (our former rouge_l) scored this random pair 1/3; the rouge
  # package splits sentences at '.', counts distinct words and unions the sentences' LCS.
  prediction, answer = "a big ran. red, ball a big sat sat the", "sat on the a on ran. big red,"
  assert lb.rouge_l(prediction, answer) == pytest.approx(0.857142852, abs=1e-8)
  assert lb.rouge_l(prediction, answer) == rouge_package(prediction, answer)
  assert lb.rouge_l("", "a b") == lb.rouge_l("...", "a b") == 0.0  # the package raises: 0


def test_edit_sim_is_fuzz_ratio_of_longbench_first_line():
  """Predictions built so that the scored line is known: lines holding a backtick, '#' or '//'
  anywhere come before it, blank lines count as lines."""
  rng = random.Random(2)
  for _ in range(500):
    junk = []
    for _ in range(rng.randint(0, 3)):
      line = rng.choice(CODE)
      at = rng.randint(0, len(line))
      junk.append(line[:at] + rng.choice(JUNK + ("```python", "// c", "# c")) + line[at:])
    # Leading newlines are stripped first: a blank target needs a line before it.
    target = rng.choice(CODE if junk else [c for c in CODE if c])
    tail = [rng.choice(CODE + JUNK) for _ in range(rng.randint(0, 3))]
    prediction = "\n" * rng.randint(0, 2) + "\n".join(junk + [target] + tail)
    answer = rng.choice(CODE)
    assert lb.first_code_line(prediction) == target, prediction
    assert lb.edit_sim(prediction, answer) == fuzz.ratio(target, answer) / 100
  assert lb.edit_sim("```\n# a\n// b\nx = 1 # c", "x = 1") == fuzz.ratio("", "x = 1") / 100


def test_edit_sim_discrepancy_blank_line_after_a_fence():
  # The case: the blank line after the fence is the scored line (LongBench: 0.0).
  assert lb.edit_sim("```\n\nreturn a + b", "return a + b") == 0.0
  assert lb.edit_sim("x = 1  # set x\nreturn a + b", "return a + b") == 1.0  # '#' anywhere
  assert lb.edit_sim("url = 'http://a'\ny = 2", "y = 2") == 1.0  # '//' anywhere
  assert lb.edit_sim("a / b", "a / b") == 1.0  # one slash is code


def test_fuzzywuzzy_runs_on_levenshtein():
  # Without python-Levenshtein fuzzywuzzy falls back to difflib, whose ratio differs.
  assert fuzz.SequenceMatcher.__module__ == "fuzzywuzzy.StringMatcher"
  assert lb.edit_sim("abcd", "acbd") == 0.75  # 2 * LCS 3 / 8 characters


def test_qa_f1_normalisation_by_construction():
  """Answers and predictions made of clean tokens, then dressed in case, punctuation, articles
  and spaces that LongBench's normalisation removes: F1 of the clean tokens."""
  rng = random.Random(3)
  vocab = ("cat", "sat", "mat", "dog", "ran", "ball", "red", "42", "rerun")

  def dress(t):
    return rng.choice([t, t.upper(), t.title()]) + rng.choice(["", ",", ".", "!", "'"])

  def text(tokens):
    parts = []
    for t in tokens:
      parts += [rng.choice(["the", "A", "an", ""])] if rng.random() < 0.3 else []
      parts.append(dress(t))
    return rng.choice([" ", "  ", "\t"]).join(parts)

  for _ in range(300):
    pred = [rng.choice(vocab) for _ in range(rng.randint(0, 6))]
    ans = [rng.choice(vocab) for _ in range(rng.randint(1, 6))]
    common = sum((collections.Counter(pred) & collections.Counter(ans)).values())
    expected = 0.0 if common == 0 else 2 * common / (len(pred) + len(ans))
    assert lb.qa_f1(text(pred), text(ans)) == pytest.approx(expected)
  assert lb.normalize_answer("  The  Quick, brown fox! ") == "quick brown fox"
  assert lb.normalize_answer("re-run it's") == "rerun its"  # punctuation goes before articles
  assert lb.qa_f1("theatre", "the atre") == 0.0  # articles are whole words


def test_qa_f1_zh_is_f1_over_jieba_words():
  rng = random.Random(4)
  plain = [w for w in ZH if w not in "，。《》“”！？、"]
  for _ in range(150):
    pred = "".join(rng.choice(plain) for _ in range(rng.randint(0, 8)))
    ans = "".join(rng.choice(plain) for _ in range(rng.randint(1, 8)))
    p, a = jieba.lcut(pred), jieba.lcut(ans)  # nothing to normalise: jieba's words are the tokens
    common = sum((collections.Counter(p) & collections.Counter(a)).values())
    expected = 0.0 if common == 0 else 2 * common / (len(p) + len(a))
    assert lb.qa_f1_zh(pred, ans) == pytest.approx(expected), (pred, ans)
  # jieba keeps 北京市 one word: no credit for 北京 (a character F1 gives 0.8).
  assert jieba.lcut("北京市") == ["北京市"] and lb.qa_f1_zh("北京。", "北京市") == 0.0
  # LongBench's punctuation list has 》 but not 《: '《' stays a token -> P 1/2, R 1.
  assert lb.qa_f1_zh("《红楼梦》", "红楼梦") == pytest.approx(2 / 3)
  assert lb.qa_f1_zh("", "红楼梦") == lb.qa_f1_zh("。！", "红楼梦") == 0.0


def test_classification_count_retrieval():
  classes = ["positive", "negative", "very positive"]
  assert lb.classification("This is positive.", "positive", classes) == 1.0
  assert lb.classification("This is very positive.", "positive", classes) == 0.5
  assert lb.classification("This is very positive.", "very positive", classes) == 1.0
  assert lb.classification("positive or negative", "negative", classes) == 0.5
  assert lb.classification("none of them", "negative", classes) == 0.0
  # LongBench drops found names inside the answer while walking the list, so the entry right
  # after a dropped one stays: 'york' survives -> 1 / 2 (not 1).
  assert (
    lb.classification("new york city", "new york city", ["new", "york", "new york city"]) == 0.5
  )
  assert lb.count("There are 3 paragraphs, not 4", "3") == 0.5
  assert lb.count("none", "3") == 0.0
  assert lb.count("3", "3 ") == 0.0  # compared as strings, unstripped
  assert lb.retrieval("Paragraph 12", "Paragraph 12") == 1.0
  assert lb.retrieval("Paragraph 2 or 12", "Paragraph 12") == 0.5
  assert lb.retrieval_zh("段落7", "段落7") == 1.0
  with pytest.raises(ValueError, match="names no paragraph"):
    lb.retrieval("Paragraph 1", "the first")


# --- per dataset, as LongBench's scorer maps them ----------------------------------------------

LONGBENCH_DATASET2METRIC = {  # LongBench's eval.py, its metric functions in our names
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


def _answer_for(metric: str, rng: random.Random) -> str:
  if metric in ("retrieval", "retrieval_zh"):
    return ("Paragraph " if metric == "retrieval" else "段落") + str(rng.randint(1, 12))
  if metric == "count":
    return str(rng.randint(1, 12))
  if metric == "classification":
    return rng.choice(["City", "Date", "Individual"])
  return (_chinese if metric.endswith("_zh") else _english)(rng)


def test_every_dataset_scores_with_its_metric_first_line_and_best_answer():
  assert lb.DATASET_METRIC == LONGBENCH_DATASET2METRIC
  assert set(lb.DATASET_METRIC) == set(longbench_data.DATASETS)
  rng = random.Random(5)
  classes = ["City", "Date", "Individual", "Distance"]
  for dataset, metric in LONGBENCH_DATASET2METRIC.items():
    for _ in range(20):
      answers = [_answer_for(metric, rng) for _ in range(rng.randint(1, 3))]
      second = rng.choice([_english(rng), answers[0], "7 City"])
      prediction = (
        rng.choice(["", "\n\n"]) + rng.choice([answers[-1], _english(rng)]) + ("\n" + second)
      )
      record = dict(dataset=dataset, answers=answers, all_classes=classes, length=100)
      scored = (
        prediction.lstrip("\n").split("\n")[0]
        if dataset in ("trec", "triviaqa", "samsum", "lsht")
        else prediction
      )
      options = {"all_classes": classes} if metric == "classification" else {}
      expected = max(lb.METRICS[metric](scored, a, **options) for a in answers)
      assert lb.score_record(record, prediction) == expected, (dataset, prediction, answers)
      assert lb.score_record({**record, "dataset": dataset + "_e"}, prediction) == expected
  # The first line only for the few-shot datasets: a right answer on line 2 scores there only.
  for dataset in ("trec", "triviaqa", "samsum", "lsht", "hotpotqa", "gov_report"):
    answer = "City" if dataset in ("trec", "lsht") else "the river Stour"
    record = dict(dataset=dataset, answers=[answer], all_classes=classes, length=1)
    cut = dataset in lb.FIRST_LINE_DATASETS
    assert (lb.score_record(record, f"\nnothing\n{answer}") == 0.0) == cut, dataset


def test_score_record_errors():
  with pytest.raises(ValueError, match="unknown LongBench dataset 'imdb'"):
    lb.score_record(dict(dataset="imdb", answers=["a"]), "a")
  with pytest.raises(ValueError, match="no reference answers"):
    lb.score_record(dict(dataset="hotpotqa", answers=[]), "a")
  with pytest.raises(ValueError, match="lacks all_classes"):
    lb.score_record(dict(dataset="trec", answers=["City"], all_classes=None), "City")


# --- loader, prompts, buckets on tests/data/longbench_tiny -------------------------------------


@pytest.fixture(scope="module")
def longbench(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("hf_cache"))
  return {
    name: longbench_data.load_longbench(name, data_dir=LONGBENCH_TINY, cache_dir=cache)
    for name in ("hotpotqa", "gov_report", "lcc", "trec")
  }


def test_longbench_loader_schema_and_prompts(longbench):
  for name, ds in longbench.items():
    assert set(longbench_data.FIELDS) <= set(ds.column_names)
    for record in ds:
      assert record["dataset"] == name and isinstance(record["answers"], list)
      prompt = longbench_data.build_prompt(record)
      assert record["context"] in prompt and record["input"] in prompt
  assert longbench_data.dataset_info("gov_report_e").max_new_tokens == 512
  assert lb.dataset_metric("hotpotqa_e") == "qa_f1"


def test_longbench_buckets_and_scores(longbench):
  assert [lb.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == [
    "0-4k",
    "0-4k",
    "4-8k",
    "4-8k",
    "8k+",
    "8k+",
  ]
  qa = longbench["hotpotqa"]
  perfect = lb.evaluate_predictions(qa, [r["answers"][0] for r in qa])
  assert perfect == {
    k: {"score": 100.0, "count": c} for k, c in (("all", 3), ("0-4k", 1), ("4-8k", 1), ("8k+", 1))
  }
  # "Stour" vs "the river Stour" -> [stour] vs [river, stour]: F1 = 2/3; the others wrong.
  partial = lb.evaluate_predictions(qa, ["Stour", "nobody", "1930"])
  assert partial["0-4k"]["score"] == pytest.approx(200 / 3)
  assert partial["all"]["score"] == pytest.approx(200 / 9)
  trec = longbench["trec"]  # first line only: the second line's "Date" is not scored
  assert lb.score_record(trec[0], "City\nQuestion: When?\nType: Date") == 1.0
  assert lb.score_record(trec[1], "City\nDate") == 0.0
  lcc = longbench["lcc"]
  assert lb.score_record(lcc[0], "```\n    return total\n```") == 1.0
  assert (
    lb.score_record(lcc[0], "    return totals")
    == fuzz.ratio("    return totals", "    return total") / 100
  )
  gov = longbench["gov_report"]
  assert lb.score_record(gov[0], gov[0]["answers"][0]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="predictions"):
    lb.evaluate_predictions(qa, ["x"])


def test_longbench_loader_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown LongBench dataset"):
    longbench_data.load_longbench("imdb", data_dir=LONGBENCH_TINY)
  with pytest.raises(FileNotFoundError, match="jsonl"):
    longbench_data.load_longbench("qasper", data_dir=LONGBENCH_TINY)
  (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q", "context": "c"}\n')
  with pytest.raises(ValueError, match="lack LongBench fields"):
    longbench_data.load_longbench("hotpotqa", data_dir=tmp_path, cache_dir=str(tmp_path / "c"))


def test_data_does_not_import_eval():
  code = (
    "import sys, moa_jax.data.longbench; "
    "print(sorted(m for m in sys.modules if m.startswith('moa_jax.eval')))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
