"""Llama-family models: hyperparameters (config), Flax NNX modules (llama), checkpoint I/O (hf,
gguf), loading a config's model section (loading) and sharding on a mesh (sharding)."""

from moa_jax.models.config import PRESETS, LlamaConfig
from moa_jax.models.hf import load_pretrained, load_tokenizer, save_pretrained
from moa_jax.models.llama import Llama, count_params

__all__ = [
  "PRESETS",
  "LlamaConfig",
  "Llama",
  "count_params",
  "load_pretrained",
  "load_tokenizer",
  "save_pretrained",
]
