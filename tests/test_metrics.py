"""Every metric on hand-checked cases; the bit-parallel LCS against the textbook DP."""

import pathlib

import numpy as np
import pytest

from moa_jax.data import longbench as longbench_lib
from moa_jax.eval import metrics as m


def lcs_dp(a, b):
  table = np.zeros((len(a) + 1, len(b) + 1), int)
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
  return int(table[-1, -1])


def test_lcs_matches_dp():
  rng = np.random.default_rng(0)
  for _ in range(200):
    a = rng.integers(0, 4, size=rng.integers(0, 30)).tolist()
    b = rng.integers(0, 4, size=rng.integers(0, 30)).tolist()
    assert m.lcs_length(a, b) == lcs_dp(a, b)
  assert m.lcs_length("ABCBDAB", "BDCABA") == 4
  assert m.lcs_length("the cat sat".split(), "the dog sat".split()) == 2


def test_synthetic_task_metrics():
  assert m.last_int("The <REGISTER_CONTENT> in line calm-fox is <4143>.", "4143") == 1.0
  assert m.last_int("4143, no wait: 12", "4143") == 0.0
  assert m.last_int("no number", "4143") == 0.0
  assert m.last_int("0042", "42") == 1.0
  assert m.contains("the value is 1b19c746-5c5e", "1b19c746-5c5e") == 1.0
  assert m.contains("the value is 1b19c746-5c5", "1b19c746-5c5e") == 0.0
  assert m.set_recall("They are ABCDE, FGHIJ.", "ABCDE FGHIJ KLMNO") == pytest.approx(2 / 3)
  assert m.set_recall("ABCDEF", "ABCDE") == 0.0  # words, not substrings


def test_qa_f1():
  # normalized: pred [cat, sat], answer [cat, sat, on, mat] -> P = 1, R = 1/2.
  assert m.qa_f1("The Cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
  assert m.qa_f1("Paris", "paris!") == 1.0
  assert m.qa_f1("London", "Paris") == 0.0
  assert m.normalize_answer("  The  Quick, brown fox! ") == "quick brown fox"
  # chars: pred [北, 京], answer [北, 京, 市] -> P = 1, R = 2/3 -> F1 = 0.8.
  assert m.qa_f1_zh("北京。", "北京市") == pytest.approx(0.8)


def test_rouge_l():
  # LCS = "the cat on the mat" (5 of 6 words each side).
  assert m.rouge_l("The cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
  # LCS 2 ("a c"); P = 2/2, R = 2/4 -> 2/3.
  assert m.rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
  assert m.rouge_l("", "a b") == 0.0
  assert m.rouge_l_zh("我爱北京", "我在北京") == pytest.approx(3 / 4)


def test_edit_sim():
  assert m.first_code_line("\n```python\n# comment\nx = foo(1)\ny = 2") == "x = foo(1)"
  # 10 vs 10 characters, LCS 9 -> 18 / 20.
  assert m.edit_sim("```python\nx = foo(1)\n```", "x = foo(2)") == pytest.approx(0.9)
  assert m.edit_sim("return a + b", "return a + b") == 1.0
  # "ab" vs "abcd": LCS 2 -> 4 / 6.
  assert m.edit_sim("ab", "abcd") == pytest.approx(4 / 6)


def test_classification_count_retrieval():
  classes = ["positive", "negative", "very positive"]
  assert m.classification("This is positive.", "positive", classes) == 1.0
  assert m.classification("This is very positive.", "positive", classes) == 0.0
  assert m.classification("This is very positive.", "very positive", classes) == 1.0
  assert m.classification("positive or negative", "negative", classes) == 0.5
  assert m.count("There are 3 paragraphs, not 4", "3") == 0.5
  assert m.count("none", "3") == 0.0
  assert m.retrieval("Paragraph 12", "Paragraph 12") == 1.0
  assert m.retrieval("Paragraph 2 or 12", "Paragraph 12") == 0.5
  assert m.retrieval_zh("段落7", "段落7") == 1.0


def test_score_best_over_answers_and_errors():
  assert m.score("qa_f1", "cat", ["dog", "the cat"]) == 1.0
  assert m.score("last_int", "is 17", "17") == 1.0
  assert m.score("classification", "negative", ["negative"],
                 all_classes=["positive", "negative"]) == 1.0
  with pytest.raises(ValueError, match="unknown metric"):
    m.score("bleu", "a", "a")
  with pytest.raises(ValueError, match="all_classes"):
    m.score("classification", "a", "a")
  with pytest.raises(ValueError, match="no reference"):
    m.score("qa_f1", "a", [])


# --- LongBench loader, prompts and scoring on tests/data/longbench_tiny ----------------------

LONGBENCH_TINY = pathlib.Path(__file__).parent / "data" / "longbench_tiny"


@pytest.fixture(scope="module")
def longbench(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("hf_cache"))
  return {name: longbench_lib.load_longbench(name, data_dir=LONGBENCH_TINY, cache_dir=cache)
          for name in ("hotpotqa", "gov_report", "lcc", "trec")}


def test_longbench_loader_schema_and_prompts(longbench):
  for name, ds in longbench.items():
    assert set(longbench_lib.FIELDS) <= set(ds.column_names)
    for record in ds:
      assert record["dataset"] == name and isinstance(record["answers"], list)
      prompt = longbench_lib.build_prompt(record)
      assert record["context"] in prompt and record["input"] in prompt
  assert longbench_lib.dataset_info("hotpotqa_e").metric == "qa_f1"
  assert longbench_lib.dataset_info("lcc").metric == "edit_sim"
  assert longbench_lib.dataset_info("trec").metric == "classification"
  assert longbench_lib.dataset_info("gov_report").max_new_tokens == 512


def test_longbench_buckets_and_scores(longbench):
  assert [longbench_lib.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == [
      "0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
  qa = longbench["hotpotqa"]
  perfect = longbench_lib.evaluate_predictions(qa, [r["answers"][0] for r in qa])
  assert perfect == {k: {"score": 100.0, "count": c}
                     for k, c in (("all", 3), ("0-4k", 1), ("4-8k", 1), ("8k+", 1))}
  # "Stour" vs "the river Stour" -> [stour] vs [river, stour]: F1 = 2/3; the others wrong.
  partial = longbench_lib.evaluate_predictions(qa, ["Stour", "nobody", "1930"])
  assert partial["0-4k"]["score"] == pytest.approx(200 / 3)
  assert partial["all"]["score"] == pytest.approx(200 / 9)
  trec = longbench["trec"]  # first line only: the second line's "Date" is not scored
  assert longbench_lib.score_record(trec[0], "City\nQuestion: When?\nType: Date") == 1.0
  assert longbench_lib.score_record(trec[1], "City\nDate") == 0.0
  lcc = longbench["lcc"]
  assert longbench_lib.score_record(lcc[0], "```\n    return total\n```") == 1.0
  assert 0.5 < longbench_lib.score_record(lcc[0], "    return totals") < 1.0
  gov = longbench["gov_report"]
  assert longbench_lib.score_record(gov[0], gov[0]["answers"][0]) == 1.0
  with pytest.raises(ValueError, match="predictions"):
    longbench_lib.evaluate_predictions(qa, ["x"])


def test_longbench_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown LongBench dataset"):
    longbench_lib.load_longbench("imdb", data_dir=LONGBENCH_TINY)
  with pytest.raises(FileNotFoundError, match="jsonl"):
    longbench_lib.load_longbench("qasper", data_dir=LONGBENCH_TINY)
  (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q", "context": "c"}\n')
  with pytest.raises(ValueError, match="lack LongBench fields"):
    longbench_lib.load_longbench("hotpotqa", data_dir=tmp_path, cache_dir=str(tmp_path / "c"))
