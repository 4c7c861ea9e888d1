"""Load the model an experiment config names: a HF checkpoint, the embedded reference model,
or a randomly initialised preset (tests)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from moa_jax.models.config import LlamaConfig
from moa_jax.models.hf import load_pretrained, load_tokenizer
from moa_jax.models.llama import Llama


def model_section(path: str | None = "", preset: str = "", dtype: str = "float32"):
  """The `model` section (an ml_collections ConfigDict) every experiment config shares, read by
  `load_model`. path None makes it a required placeholder (--config.model.path=...).
  """
  from ml_collections import config_dict  # only configs need it (the GPU image lacks it)

  section = config_dict.ConfigDict()
  section.path = config_dict.placeholder(str) if path is None else path  # HF dir or hub id
  section.preset = preset  # e.g. 'tiny': a randomly initialised model instead of a checkpoint
  section.tokenizer = ""  # tokenizer dir ('' = the checkpoint's, or the reference model's)
  section.dtype = dtype  # compute and parameter dtype ('' = the checkpoint's own)
  section.seed = 0  # initialisation seed of a preset
  return section


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
  if section.path is None:
    raise ValueError("this config needs --config.model.path=<HF checkpoint directory or hub id>")
  if section.preset:
    tokenizer = load_tokenizer(section.tokenizer or section.path or reference_model_dir())
    dtype = section.dtype or "float32"
    config = LlamaConfig.preset(section.preset, vocab_size=len(tokenizer), dtype=dtype,
                                param_dtype=dtype,
                                eos_token_ids=(tokenizer.eos_token_id,),
                                bos_token_id=tokenizer.bos_token_id)
    model = Llama(config, rngs=nnx.Rngs(section.seed))
    return model, tokenizer, f"random:{section.preset}:seed{section.seed}"
  path = section.path or reference_model_dir()
  model, _ = load_pretrained(path, dtype=jnp.dtype(section.dtype) if section.dtype else None)
  tokenizer = load_tokenizer(section.tokenizer or path)
  return model, tokenizer, str(section.path or "moa_jax/reference_model")
