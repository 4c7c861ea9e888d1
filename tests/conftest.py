"""Shared fixtures: a tiny random Llama (float32, GQA 4/2, 'llama3' RoPE scaling)."""

import pytest
from flax import nnx

from moa_jax.models import Llama, LlamaConfig


@pytest.fixture(scope="session")
def tiny_config() -> LlamaConfig:
  return LlamaConfig.tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> Llama:
  """Random-init tiny Llama; shared, so never modify it in a test."""
  return Llama(tiny_config, rngs=nnx.Rngs(7))
