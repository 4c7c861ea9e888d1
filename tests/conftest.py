"""Shared fixtures: a tiny random Llama (float32, GQA 4/2, 'llama3' RoPE scaling) and a saved
HF-format checkpoint of it with a small word-level tokenizer; the kernel-test fixtures.

Kernel tests carry the `gpu` marker, the way JAX's own Pallas tests run one file on every
backend: on a GPU they run the kernels compiled (`pytest -m gpu` on the GPU machine); elsewhere
a `gpu` test that takes the `interpret` fixture runs them in Pallas interpret mode, and one that
does not (the Hopper kernel, GPU-sized cases) is skipped.
"""

import jax
import pytest
from flax import nnx

from moa_jax.models import Llama, LlamaConfig
from moa_jax.models.hf import save_pretrained

ON_GPU = jax.default_backend() == "gpu"
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
  backend = Tokenizer(
    models.WordLevel({w: i for i, w in enumerate(TOKENIZER_WORDS)}, unk_token="<unk>")
  )
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(
    tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
  ).save_pretrained(directory)
  return directory


def pytest_collection_modifyitems(items):
  skip = pytest.mark.skip(
    reason="needs a GPU: a compiled kernel with no interpret mode here, or "
    "a GPU-sized case (run `pytest -m gpu` on the GPU machine)"
  )
  for item in items:
    if not ON_GPU and item.get_closest_marker("gpu") and "interpret" not in item.fixturenames:
      item.add_marker(skip)


@pytest.fixture
def interpret() -> bool:
  """Pallas interpret mode for a kernel test: False on a GPU (compiled), True elsewhere."""
  return not ON_GPU


@pytest.fixture
def hopper() -> None:
  """Skips the test unless the device is a Hopper GPU (sm_90: wgmma and TMA)."""
  device = jax.devices()[0]
  if getattr(device, "compute_capability", None) != "9.0":
    pytest.skip(f"needs an sm_90 (Hopper) GPU, found {device.device_kind}")
