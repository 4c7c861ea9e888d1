"""Load the model an experiment config names: a HF checkpoint, the embedded reference model,
or a randomly initialised preset (tests)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from moa_jax.models.config import LlamaConfig
from moa_jax.models.hf import load_pretrained, load_tokenizer
from moa_jax.models.llama import Llama



def reference_model_dir() -> Path:
  """Directory of the embedded reference model (config.json, model.safetensors, tokenizer)."""
  directory = Path(__file__).resolve().parent.parent / "assets" / "reference_model"
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(f"no reference model in {directory}: reinstall moa_jax or run "
                            "experiments/train_reference.py")
  return directory


def load_model(section) -> tuple[Llama, object, str]:
  """(model, tokenizer, model id) for a config section with fields path, preset, tokenizer,
  dtype and seed.

  path: a local HF checkpoint directory or hub id; '' means the embedded reference model.
  preset: when set (e.g. 'tiny'), a randomly initialised model of that preset instead, with the
    vocabulary of the tokenizer at `tokenizer` ('' means the reference model's tokenizer).
  """
  if section.preset:
    tokenizer = load_tokenizer(section.tokenizer or section.path or reference_model_dir())
    config = LlamaConfig.preset(section.preset, vocab_size=len(tokenizer), dtype=section.dtype,
                                param_dtype=section.dtype,
                                eos_token_ids=(tokenizer.eos_token_id,),
                                bos_token_id=tokenizer.bos_token_id)
    model = Llama(config, rngs=nnx.Rngs(section.seed))
    return model, tokenizer, f"random:{section.preset}:seed{section.seed}"
  path = section.path or reference_model_dir()
  model, _ = load_pretrained(path, dtype=jnp.dtype(section.dtype) if section.dtype else None)
  tokenizer = load_tokenizer(section.tokenizer or path)
  return model, tokenizer, str(section.path or "moa_jax/reference_model")
