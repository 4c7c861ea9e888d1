"""The synthetic task generators (size, answer in the prompt, determinism, depth, templating)
and the long-text documents of the perplexity task."""

import json
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moa_jax.data import longtext, tasks, words
from moa_jax.eval.metrics import METRICS


class CharTokenizer:
  """One token per character (BOS = 1): a real, if crude, tokenizer."""

  def encode(self, text, add_special_tokens=True):
    return ([1] if add_special_tokens else []) + [ord(c) for c in text]


@pytest.fixture(scope="module")
def bpe():
  """A small byte-level BPE trained on task text, in HF's fast-tokenizer wrapper."""
  corpus = [
    tasks.training_text(s)
    for t in tasks.TASKS
    for s in tasks.make_samples(t, CharTokenizer(), 2000, 3, seed=99)
  ]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(
    corpus,
    trainers.BpeTrainer(
      vocab_size=500,
      special_tokens=["<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def solve(sample: tasks.Sample) -> tuple[str, float]:
  """Read the answer and the needle's depth out of the prompt alone."""
  p = sample.prompt
  if sample.task == "lines":
    key = re.search(r"in line (\S+)\? I need the number\.", p)[1]
    lines = re.findall(r"^line (\S+): REGISTER_CONTENT is <(\d+)>$", p, re.M)
    index = [k for k, _ in lines].index(key)
    assert [k for k, _ in lines].count(key) == 1
    return lines[index][1], index / (len(lines) - 1)
  if sample.task == "passkey":
    (key,) = set(re.findall(r"The pass key is (\d+)\.", p))
    return key, -1.0
  if sample.task == "niah":
    key = re.search(r"magic number for (\S+) mentioned", p)[1]
    (value,) = re.findall(rf"magic numbers for {key} is: (\d+)\.", p)
    return value, -1.0
  if sample.task == "vt":
    value = re.search(r"assigned the value (\d+) in the text", p)[1]
    holds = {}
    for name, source in re.findall(r"VAR (\w+) = (\w+)\.", p):
      holds[name] = holds.get(source, source)
    return " ".join(n for n, v in holds.items() if v == value), -1.0
  if sample.task == "uuid":
    key = re.search(r'value for the key "([0-9a-f-]+)"\?', p)[1]
    table = json.loads(re.search(r"JSON data:\n(\{.*?\n\})", p, re.S)[1])
    keys = list(table)
    return table[key], keys.index(key) / (len(keys) - 1)
  raise AssertionError(sample.task)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_length_answer_and_depth(task, length, bpe):
  for tokenizer in (CharTokenizer(), bpe):
    samples = tasks.make_samples(task, tokenizer, length, 6, seed=3, depths=tasks.DECILES)
    assert len(samples) == 6
    for requested, s in zip(tasks.DECILES, samples):
      assert s.task == task and s.metric == tasks.TASKS[task].metric and s.length == length
      assert s.num_tokens == len(tokenizer.encode(s.prompt))
      assert abs(s.num_tokens - length) <= 0.05 * length
      assert s.prompt.endswith("\n") and s.answer
      answer, depth = solve(s)
      assert METRICS[s.metric](answer, s.answer) == 1.0
      assert METRICS[s.metric]("I do not know 7.", s.answer) < 1.0
      if depth >= 0:
        assert depth == pytest.approx(s.depth)
      assert abs(s.depth - requested) <= 0.1
    if length == 3000:
      assert [s.decile for s in samples] == list(range(6))


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_deterministic_per_seed(task, bpe):
  first = tasks.make_samples(task, bpe, 800, 4, seed=5)
  assert tasks.make_samples(task, bpe, 800, 4, seed=5) == first
  assert tasks.make_samples(task, bpe, 800, 2, seed=5) == first[:2]
  other = tasks.make_samples(task, bpe, 800, 4, seed=6)
  assert [s.prompt for s in other] != [s.prompt for s in first]
  assert len({s.prompt for s in first}) == 4


def test_lines_format_and_value_range():
  (s,) = tasks.make_samples("lines", CharTokenizer(), 60000, 1, seed=0, depths=[1.0])
  values = [int(v) for v in re.findall(r"REGISTER_CONTENT is <(\d+)>", s.prompt)]
  assert len(values) > 1000 and 1 <= min(values) and max(values) <= 50000
  assert s.depth == 1.0 and s.decile == 9
  assert s.prompt.rstrip().endswith(
    f"Tell me what is the <REGISTER_CONTENT> in line {solve_key(s)}? I need the number."
  )


def solve_key(sample):
  return re.search(r"in line (\S+)\?", sample.prompt)[1]


def test_word_lists_give_thousands_of_keys():
  assert words.num_keys() >= 10000
  keys = {words.key(i) for i in range(0, words.num_keys(), 7)}
  assert len(keys) == len(range(0, words.num_keys(), 7))
  assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)


def test_errors():
  with pytest.raises(ValueError, match="unknown task"):
    tasks.make_samples("nope", CharTokenizer(), 1000, 1)
  with pytest.raises(ValueError, match="choose a longer length"):
    tasks.make_samples("uuid", CharTokenizer(), 60, 1)
  with pytest.raises(ValueError, match="depths"):
    tasks.make_samples("lines", CharTokenizer(), 1000, 1, depths=[1.5])


def test_training_text(bpe):
  (s,) = tasks.make_samples("passkey", bpe, 600, 1, seed=1)
  assert tasks.training_text(s) == s.prompt + s.answer
  texts = tasks.make_training_texts("lines", bpe, 500, 3, seed=2)
  assert len(texts) == 3 and all(t.startswith("Below is a record") for t in texts)


def test_longtext_documents_and_scored_windows(bpe, tmp_path):
  docs = longtext.stdlib_documents(3)
  sizes = [len(d.text.encode()) for d in docs]
  assert sizes == sorted(sizes, reverse=True) and len({d.name for d in docs}) == 3
  assert not any(part in ("test", "tests") for d in docs for part in d.name.split("/"))
  meta = longtext.provenance(docs)
  assert [f["name"] for f in meta["files"]] == [d.name for d in docs] and meta["python"]
  for length in (300, 600):
    context, target = longtext.scored_window(bpe, docs[1], length, 40)
    assert len(context) + len(target) == length and context[0] == bpe.bos_token_id
    assert len(target) == 40
    tail = bpe.encode(docs[1].text[-20 * length :], add_special_tokens=False)
    assert context[1:] + target == tail[-(length - 1) :]  # the document's very last tokens
  short = longtext.Document("short.py", "x = 1\n", "0" * 64)
  with pytest.raises(ValueError, match="fewer than the length"):
    longtext.scored_window(bpe, short, 300, 40)
  with pytest.raises(ValueError, match="target_tokens"):
    longtext.scored_window(bpe, docs[0], 300, 299)
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "a.py").write_text("a = 1\n" * 50)
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "big.py").write_text("b = 2\n" * 500)
  assert [d.name for d in longtext.stdlib_documents(1, root=tmp_path)] == ["pkg/a.py"]
  with pytest.raises(FileNotFoundError, match="fewer than the 2 documents"):
    longtext.stdlib_documents(2, root=tmp_path)
