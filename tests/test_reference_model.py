"""The committed reference model: loads through moa_jax and transformers and retrieves lines."""

import json

import pytest
from transformers import AutoTokenizer

from moa_jax.calibration import prompts
from moa_jax.data import tasks
from moa_jax.eval import metrics
from moa_jax.generate import generate
from moa_jax.models import hf
from moa_jax.models.loading import reference_model_dir

MAX_BYTES = 32 * 2**20


@pytest.fixture(scope="module")
def reference():
  directory = reference_model_dir()
  model, config = hf.load_pretrained(directory)
  return model, config, AutoTokenizer.from_pretrained(directory)


def test_files_size_and_config():
  directory = reference_model_dir()
  names = {p.name for p in directory.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "TRAINING.md"} <= names
  assert sum(p.stat().st_size for p in directory.iterdir()) <= MAX_BYTES
  config = json.loads((directory / "config.json").read_text())
  assert config["model_type"] == "llama" and config["torch_dtype"] == "bfloat16"


def test_tokenizer_and_chat_template(reference):
  _, config, tokenizer = reference
  assert tokenizer.vocab_size == config.vocab_size
  assert tokenizer.bos_token_id == config.bos_token_id
  assert tokenizer.eos_token_id == config.eos_token_ids[0]
  ids = prompts.chat_prompt_ids(tokenizer, "Tell me a number.")
  assert ids[0] == tokenizer.bos_token_id
  assert tokenizer.decode(ids) == "<s>USER: Tell me a number. ASSISTANT:"


@pytest.mark.slow
def test_answers_short_line_retrieval_prompts(reference):
  model, _, tokenizer = reference
  samples = tasks.make_samples("lines", tokenizer, 400, 3, seed=123, depths=(0.1, 0.5, 0.9))
  outputs = generate(
    model,
    [prompts.chat_prompt_ids(tokenizer, s.prompt) for s in samples],
    8,
    eos_id=tokenizer.eos_token_id,
  )
  for sample, out in zip(samples, outputs):
    prediction = tokenizer.decode(out, skip_special_tokens=True)
    assert metrics.score("last_int", prediction, sample.answer) == 1.0, (prediction, sample.answer)
