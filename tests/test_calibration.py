"""Calibration data: MultiNews / JSONL loaders, chat templates, prompt fitting, the cached build."""

import json
import os
import string
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moa_jax.calibration import build as calibration
from moa_jax.calibration import prompts
from moa_jax.calibration import sources as multinews
from moa_jax.calibration.build import CalibrationConfig, CalibrationSet, build_calibration
from moa_jax.generate import generate

FIXTURE = Path(__file__).parent / "data" / "multinews_tiny"
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer(directory: Path, llama3_tokens: bool) -> transformers.PreTrainedTokenizerBase:
  """A small BPE (vocabulary < 256, the tiny model's) trained on the fixture, via AutoTokenizer."""
  texts = [
    json.loads(line)["document"] for line in (FIXTURE / "train.jsonl").read_text().splitlines()
  ]
  specials = ["<pad>", "<s>", "</s>", "<unk>"] + (LLAMA3_TOKENS if llama3_tokens else [])
  tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(
    vocab_size=240, special_tokens=specials, initial_alphabet=list(string.printable)
  )
  tokenizer.train_from_iterator(texts, trainer)
  wrapped = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    unk_token="<unk>",
  )
  wrapped.save_pretrained(directory)
  return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return make_tokenizer(tmp_path_factory.mktemp("tok_llama3"), llama3_tokens=True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """No hub here: fail at once instead of retrying the network."""
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_tokenizer_fixture(tokenizer):
  assert len(tokenizer) < 256
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
  assert tokenizer.chat_template is None


def test_load_multinews_local(tmp_path):
  ds = multinews.load_multinews(FIXTURE, cache_dir=str(tmp_path))
  assert len(ds) == 6 and set(multinews.FIELDS) <= set(ds.column_names)
  assert [len(multinews.articles(d)) for d in ds["document"]] == [3, 2, 3, 2, 3, 2]
  examples = multinews.multinews_examples(ds)
  assert len(examples) == 6
  assert all("|||||" not in e.context and e.question == multinews.INSTRUCTION for e in examples)
  assert examples[0].context.startswith("The city council of Harbor Point")
  # The same records from one file, and from parquet.
  assert len(multinews.load_multinews(FIXTURE / "train.jsonl", cache_dir=str(tmp_path))) == 6
  ds.to_parquet(tmp_path / "train.parquet")
  assert (
    multinews.load_multinews(tmp_path / "train.parquet", cache_dir=str(tmp_path))["document"]
    == ds["document"]
  )


def test_load_multinews_errors(tmp_path):
  wrong = tmp_path / "wrong.jsonl"
  wrong.write_text(json.dumps({"text": "no document field"}) + "\n")
  with pytest.raises(ValueError, match="lack MultiNews fields"):
    multinews.load_multinews(wrong, cache_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="cannot load MultiNews"):
    multinews.load_multinews("no_such_owner/no_such_multinews", cache_dir=str(tmp_path))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(FileNotFoundError, match="no .jsonl"):
    multinews.load_multinews(tmp_path / "empty_dir")


def test_context_question_jsonl(tmp_path):
  path = tmp_path / "qa.jsonl"
  path.write_text(
    "\n".join(json.dumps({"context": f"doc {i}", "question": f"q {i}?", "id": i}) for i in range(3))
    + "\n\n"
  )
  assert multinews.load_context_questions(path) == [
    multinews.ContextQuestion(f"doc {i}", f"q {i}?") for i in range(3)
  ]
  path.write_text(json.dumps({"context": "only a context"}) + "\n")
  with pytest.raises(ValueError, match=r"qa.jsonl:1: a record needs"):
    multinews.load_context_questions(path)
  path.write_text("{not json\n")
  with pytest.raises(ValueError, match="not valid JSON"):
    multinews.load_context_questions(path)
  with pytest.raises(FileNotFoundError):
    multinews.load_context_questions(tmp_path / "missing.jsonl")


def test_chat_templates(tokenizer, tmp_path):
  text = lambda template: tokenizer.decode(
    calibration.render_prompt(tokenizer, "The ferry runs daily.", "How often?", template)
  )
  vicuna = text("vicuna")
  assert vicuna.startswith("<s>") and "<unk>" not in vicuna
  words = " ".join(vicuna[3:].split())  # this BPE decodes with spaces around special tokens
  assert words.startswith("A chat between a curious user")
  assert words.endswith(" USER: The ferry runs daily. How often? ASSISTANT:")
  llama3 = "".join(text("llama3").split())
  assert llama3.startswith("<s><|start_header_id|>user<|end_header_id|>Theferryrunsdaily.")
  assert llama3.endswith("Howoften?<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
  # 'auto': the tokenizer's own template if it has one, else the raw prompt (as evaluation).
  plain = make_tokenizer(tmp_path / "plain", llama3_tokens=False)
  assert prompts.resolve_template(plain, "auto") == ("none", None)
  assert calibration.render_prompt(plain, "A.", "B?", "auto") == plain.encode("A.\n\nB?")
  plain.chat_template = prompts.CHAT_TEMPLATES["vicuna"]
  assert prompts.resolve_template(plain, "auto") == ("tokenizer", plain.chat_template)
  with pytest.raises(ValueError, match="unknown chat template"):
    prompts.resolve_template(plain, "alpaca")


def test_fit_prompt_cuts_the_middle(tokenizer, tmp_path):
  records = multinews.load_multinews(FIXTURE, cache_dir=str(tmp_path))
  example = multinews.multinews_examples(records)[2]
  template = "vicuna"
  full = calibration.render_prompt(tokenizer, example.context, example.question, template)
  for budget in (len(full) + 5, 400, 250):
    ids, full_length = calibration.fit_prompt(tokenizer, example, budget, template)
    assert full_length == len(full) and len(ids) <= budget
    assert ids[:20] == full[:20]  # the template head and the context's beginning
    assert ids[-15:] == full[-15:]  # the context's end, the question and the generation prompt
    if budget < len(full):
      assert len(ids) >= budget - 12
      assert "..." in tokenizer.decode(ids)
  assert calibration.fit_prompt(tokenizer, example, 100, template)[0] is None  # template > 100


def _config(**overrides) -> CalibrationConfig:
  return CalibrationConfig(
    **{
      **dict(
        source="multinews",
        path=str(FIXTURE),
        lengths=(256, 384),
        samples_per_length=3,
        max_new_tokens=6,
        seed=3,
        template="vicuna",
        min_fill=0.5,
        batch_size=3,
      ),
      **overrides,
    }
  )


def test_build_calibration_answers_and_caches(tiny_model, tokenizer, tmp_path):
  config = _config()
  built = build_calibration(
    tiny_model,
    tokenizer,
    config,
    cache_dir=tmp_path,
    progress=False,
    datasets_cache_dir=str(tmp_path / "hf"),
  )
  assert sorted(built.buckets) == [256, 384]
  stop_ids = (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>"))
  for n, bucket in built.buckets.items():
    assert bucket.tokens.shape == (3, n) and bucket.tokens.dtype == np.int32
    prompts, responses = [], []
    for row in range(3):
      length = bucket.lengths[row]
      response = np.flatnonzero(bucket.loss_mask[row])
      assert 1 <= len(response) <= config.max_new_tokens and length <= n
      assert response[-1] == length - 1 and np.all(np.diff(response) == 1)  # answer at the end
      assert np.all(bucket.tokens[row, length:] == tokenizer.pad_token_id)
      prompts.append(bucket.tokens[row, : response[0]].tolist())
      responses.append(bucket.tokens[row, response].tolist())
      assert prompts[-1][0] == tokenizer.bos_token_id
      assert tokenizer.decode(prompts[-1]).endswith("ASSISTANT:")
    # The responses are the dense model's own greedy answers.
    assert generate(tiny_model, prompts, config.max_new_tokens, eos_id=stop_ids) == responses
  directory = tmp_path / f"calibration-{built.metadata['key'][:16]}"
  stamp = (directory / "data.npz").stat().st_mtime_ns
  again = build_calibration(tiny_model, tokenizer, config, cache_dir=tmp_path, progress=False)
  assert (directory / "data.npz").stat().st_mtime_ns == stamp  # read back, not rebuilt
  for n in built.buckets:
    np.testing.assert_array_equal(again.buckets[n].tokens, built.buckets[n].tokens)
    np.testing.assert_array_equal(again.buckets[n].loss_mask, built.buckets[n].loss_mask)
  # Any input that decides the content gives another key; the generation batch does not.
  key_of = lambda **o: calibration.cache_key(
    calibration.cache_key_inputs(tiny_model, tokenizer, _config(**o))
  )
  assert key_of(batch_size=1) == built.metadata["key"]
  assert (
    len(
      {
        key_of(),
        key_of(max_new_tokens=5),
        key_of(seed=4),
        key_of(lengths=(256,)),
        key_of(template="llama3"),
      }
    )
    == 5
  )
  assert os.listdir(tmp_path).count(directory.name) == 1


def test_jsonl_source_and_empty_errors(tiny_model, tokenizer, tmp_path):
  records = multinews.multinews_examples(multinews.load_multinews(FIXTURE, cache_dir=str(tmp_path)))
  path = tmp_path / "qa.jsonl"
  path.write_text(
    "".join(
      json.dumps({"context": r.context, "question": "Which town is it about?"}) + "\n"
      for r in records[:2]
    )
  )
  built = build_calibration(
    tiny_model,
    tokenizer,
    _config(source="jsonl", path=str(path), lengths=(256,), template="llama3"),
    progress=False,
  )
  assert built.buckets[256].num_samples == 2 and built.metadata["template"] == "llama3"
  path.write_text("")
  with pytest.raises(ValueError, match="has no records"):
    build_calibration(
      tiny_model, tokenizer, _config(source="jsonl", path=str(path)), progress=False
    )
  with pytest.raises(ValueError, match="no calibration record fills length 4096"):
    build_calibration(
      tiny_model,
      tokenizer,
      _config(lengths=(256, 4096), min_fill=0.9),
      cache_dir=tmp_path,
      progress=False,
    )
  with pytest.raises(FileNotFoundError, match="no complete calibration set"):
    CalibrationSet.load(tmp_path / "nothing")
  with pytest.raises(ValueError, match="unknown calibration source"):
    _config(source="wikipedia")
