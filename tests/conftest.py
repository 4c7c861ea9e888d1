"""Shared fixtures: a tiny random Llama (float32, GQA 4/2, 'llama3' RoPE scaling) and a saved
HF-format checkpoint of it with a small word-level tokenizer."""

import pytest
from flax import nnx

from moa_jax.models import Llama, LlamaConfig
from moa_jax.models.hf import save_pretrained

TOKENIZER_WORDS = ["<unk>", "<s>", "</s>", "sparse", "attention", "for", "long", "contexts"]


@pytest.fixture(scope="session")
def tiny_config() -> LlamaConfig:
  return LlamaConfig.tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> Llama:
  """Random-init tiny Llama; shared, so never modify it in a test."""
  return Llama(tiny_config, rngs=nnx.Rngs(7))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tiny_config):
  """Directory with tiny_model as config.json + model.safetensors and a tokenizer whose ids are
  the indices of TOKENIZER_WORDS (bos 1, eos 2). Copy it before changing anything in it."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  directory = save_pretrained(tiny_model, tiny_config, tmp_path_factory.mktemp("tiny") / "ckpt")
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOKENIZER_WORDS)},
                                       unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>").save_pretrained(directory)
  return directory
