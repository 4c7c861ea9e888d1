"""Training of moa_jax's own reference model (tokenizer, data mixture, trainer, checkpoints).

The trained model ships in moa_jax/assets/reference_model (HF format; TRAINING.md there says how
it was made); `reference_model_dir()` is its path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def reference_model_dir() -> Path:
  """Directory of the embedded reference model (config.json, model.safetensors, tokenizer)."""
  directory = Path(str(resources.files("moa_jax").joinpath("assets", "reference_model")))
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(f"no reference model in {directory}: reinstall moa_jax or run "
                            "experiments/train_reference.py")
  return directory
