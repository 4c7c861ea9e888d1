"""`python -m moa_jax convert`: a GGUF checkpoint -> a HF directory (config.json, safetensors in
the dtype asked for, tokenizer files) that transformers and `load_pretrained` both read.

The directory appears whole or not at all: everything is written into a temporary directory
next to it, which is renamed at the end (and removed on any failure).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from moa_jax import validate
from moa_jax.models.gguf import is_gguf, load_gguf, load_gguf_tokenizer
from moa_jax.models.hf import save_pretrained
from moa_jax.models.loading import PACKAGED_MODELS, resolve_model_path

DTYPES = ("float32", "bfloat16", "float16")


def convert_gguf(gguf: str | Path, directory: str | Path, dtype: str = "float32") -> Path:
  """Write the HF directory `directory` (new or empty) for a .gguf file or packaged model name.

  Returns the directory. Bad input (dtype, target, GGUF) fails before anything is written.
  """
  if dtype not in DTYPES:
    raise ValueError(f"convert: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  source = resolve_model_path(gguf)
  if not is_gguf(source):
    raise ValueError(
      f"convert: {str(gguf)!r} is neither a .gguf file nor a packaged model "
      f"({', '.join(PACKAGED_MODELS)})"
    )
  target = Path(directory).expanduser()
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise ValueError(
      f"convert: {target} already exists and is not an empty directory; remove "
      f"it or choose another --workdir"
    )
  model, config = load_gguf(source, dtype=dtype, param_dtype=dtype)
  tokenizer = load_gguf_tokenizer(source)
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
  try:
    save_pretrained(model, config, staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
      target.rmdir()  # empty, checked above
    staging.rename(target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return target


def convert_command(config, workdir: Path | None) -> Path:
  """The `convert` command: config.gguf (file or packaged model name), config.dtype -> workdir."""
  if config.gguf is None:
    raise ValueError(
      f"convert needs --config.gguf=<.gguf file or one of: {', '.join(PACKAGED_MODELS)}>"
    )
  validate.convert(config, workdir)
  target = convert_gguf(config.gguf, workdir, config.dtype)
  print(f"wrote {target} ({config.dtype}) from {resolve_model_path(config.gguf)}")
  return target
