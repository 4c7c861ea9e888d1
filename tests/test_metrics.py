"""The synthetic tasks' metrics on hand-checked cases (LongBench's: tests/test_longbench.py)."""

import pytest

from moa_jax.eval import metrics as m


def test_synthetic_task_metrics():
  assert m.last_int("The <REGISTER_CONTENT> in line calm-fox is <4143>.", "4143") == 1.0
  assert m.last_int("4143, no wait: 12", "4143") == 0.0
  assert m.last_int("no number", "4143") == 0.0
  assert m.last_int("0042", "42") == 1.0
  assert m.contains("the value is 1b19c746-5c5e", "1b19c746-5c5e") == 1.0
  assert m.contains("the value is 1b19c746-5c5", "1b19c746-5c5e") == 0.0
  assert m.set_recall("They are ABCDE, FGHIJ.", "ABCDE FGHIJ KLMNO") == pytest.approx(2 / 3)
  assert m.set_recall("ABCDEF", "ABCDE") == 0.0  # words, not substrings


def test_score_dispatch_and_errors():
  assert m.score("last_int", "is 17", "17") == 1.0
  assert m.score("contains", "abc", "b") == 1.0
  with pytest.raises(ValueError, match="unknown metric 'qa_f1'"):
    m.score("qa_f1", "a", "a")  # LongBench's metrics live in moa_jax.eval.longbench
