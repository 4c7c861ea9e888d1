"""HF checkpoint I/O without torch: config.json + safetensors <-> Llama, and tokenizers.

Parameter names of `Llama` are the checkpoint's tensor names and layouts (no transposes), so the
mapping is strict and 1:1: every checkpoint tensor must fill a parameter of the right shape and
every parameter must be filled. Everything is validated from config.json and the safetensors
headers before any tensor is read, so bad input fails with one line and loads nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama
from moa_jax.workdir import atomic_path, atomic_write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-parameter buffers some older checkpoints carry; RoPE frequencies are recomputed from config.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
FLOAT_DTYPES = ("F32", "F16", "BF16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
  """A local directory as is; a hub id ('org/name') downloaded through huggingface_hub."""
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
  if not _HUB_ID.fullmatch(str(path_or_hub_id)):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  from huggingface_hub import snapshot_download  # imported only when a download is needed

  try:
    return Path(
      snapshot_download(
        str(path_or_hub_id),
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken"],
      )
    )
  except Exception as error:  # offline, unknown repo, gated repo, ...: all end the same way
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise FileNotFoundError(
      f"{str(path_or_hub_id)!r} is not a local directory and could not be downloaded from the "
      f"Hugging Face hub ({type(error).__name__}: {reason}); pass a local checkpoint "
      f"directory"
    ) from None


def read_hf_config(directory: Path) -> dict:
  """The parsed config.json of a checkpoint directory."""
  file = Path(directory) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: a HF checkpoint directory needs config.json")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{file} is not valid JSON: {error}") from None


def weight_files(directory: Path) -> list[Path]:
  """The safetensors files of a checkpoint: the shards named by the index, or model.safetensors."""
  directory = Path(directory)
  index = directory / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ValueError(f"{index} is not a safetensors index (no 'weight_map')") from None
    files = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(f"{directory}: shard {missing[0]} named by {INDEX_FILE} is missing")
    return files
  if (directory / WEIGHTS_FILE).is_file():
    return [directory / WEIGHTS_FILE]
  if any(directory.glob("pytorch_model*.bin")):
    raise FileNotFoundError(
      f"{directory} holds only PyTorch .bin weights; moa_jax reads safetensors (convert once "
      f"with transformers: model.save_pretrained(dir, safe_serialization=True))"
    )
  raise FileNotFoundError(f"no weights in {directory}: expected {WEIGHTS_FILE} or {INDEX_FILE}")


def read_tensor_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
  """Tensor name -> (file, shape, safetensors dtype) from the file headers (no tensor is read)."""
  headers = {}
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          if name in headers:
            raise ValueError(
              f"tensor {name!r} appears in both {headers[name][0].name} and {file.name}"
            )
          tensor = f.get_slice(name)
          headers[name] = (file, tuple(tensor.get_shape()), tensor.get_dtype())
    except SafetensorError as error:
      raise ValueError(
        f"{file} is not a readable safetensors file (truncated or corrupt?): "
        f"{str(error).strip().splitlines()[0]}"
      ) from None
  return headers


def check_finite(arrays: dict[str, jax.Array], source: str) -> None:
  """A one-line ValueError if any tensor (name -> array) holds NaN or Inf, with the count."""
  counts = jax.device_get({name: jnp.sum(~jnp.isfinite(a)) for name, a in arrays.items()})
  bad = {name: int(count) for name, count in counts.items() if count}
  if bad:
    first = min(bad)
    raise ValueError(
      f"{source}: {sum(bad.values())} NaN/Inf values in {len(bad)} tensor(s), "
      f"first {first!r} ({bad[first]}); the weights are corrupt"
    )


def _abstract_model(config: LlamaConfig):
  """graphdef, and HF tensor name -> (state path, abstract Param) in parameter order."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  return graphdef, {
    ".".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(abstract)
  }


def check_tensors(
  shapes: dict[str, tuple[int, ...]], expected: dict, source: str, described_by: str = "config.json"
) -> None:
  """Raise a one-line error unless tensors (name -> shape) and parameters match 1:1 in shape.

  described_by names where the model's shape came from (for the messages).
  """
  names = {n for n in shapes if not n.endswith(IGNORED_SUFFIXES)}

  def first(items):
    items = sorted(items)
    return repr(items[0]) + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")

  if extra := names - set(expected):
    raise ValueError(
      f"{source}: tensor {first(extra)} matches no parameter of the Llama model "
      f"that {described_by} describes"
    )
  if missing := set(expected) - names:
    raise ValueError(f"{source}: parameter {first(missing)} is missing")
  for name in sorted(names):
    want = tuple(expected[name][1].get_value().shape)
    if shapes[name] != want:
      raise ValueError(
        f"{source}: tensor {name!r} has shape {shapes[name]}, but {described_by} implies {want}"
      )


def load_pretrained(
  path_or_hub_id: str | Path, *, dtype=None, param_dtype=None, mesh=None
) -> tuple[Llama, LlamaConfig]:
  """Load a HF Llama checkpoint (local directory or hub id) as a `Llama` and its config.

  param_dtype defaults to the checkpoint's dtype (bf16 stays bf16, never via float32), dtype
  (compute) to param_dtype. Everything is validated before the first tensor is read. With a
  `mesh`, every tensor is read shard by shard straight onto its devices (models/sharding.py).
  """
  directory = resolve_checkpoint_dir(path_or_hub_id)
  config = LlamaConfig.from_hf_dict(read_hf_config(directory), dtype=dtype, param_dtype=param_dtype)
  headers = read_tensor_headers(weight_files(directory))
  graphdef, expected = _abstract_model(config)
  check_tensors(
    {name: shape for name, (_, shape, _) in headers.items()}, expected, f"checkpoint {directory}"
  )
  for name, (file, _, stored) in headers.items():
    if stored not in FLOAT_DTYPES:
      raise ValueError(
        f"tensor {name!r} in {file} has dtype {stored}; expected one of {', '.join(FLOAT_DTYPES)}"
      )
  shardings = None if mesh is None else sharding.param_shardings(config, mesh)
  arrays = {}
  with tqdm(
    total=len(expected), desc=f"loading {directory.name}", leave=False, disable=None
  ) as progress:
    for file in sorted({file for file, _, _ in headers.values()}):
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          if name in expected:
            arrays[name] = (
              sharding.read_sharded(f, name, shardings[name], config.param_dtype)
              if shardings
              else jax.device_put(f.get_tensor(name)).astype(config.param_dtype)
            )
            progress.update()
  check_finite(arrays, f"checkpoint {directory}")
  return assemble_model(graphdef, expected, arrays), config


def assemble_model(graphdef, expected: dict, arrays: dict[str, jax.Array]) -> Llama:
  """The Llama of `_abstract_model`'s (graphdef, expected) with parameter name -> array filled."""
  leaves = [(path, var.replace(arrays[name])) for name, (path, var) in expected.items()]
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save_pretrained(
  model: Llama,
  config: LlamaConfig,
  directory: str | Path,
  *,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
  """Write config.json + model.safetensors (shards + index above max_shard_bytes) for `model`.

  Weight files of an earlier save in `directory` are removed first. Returns the directory.
  """
  directory = Path(directory)
  _, expected = _abstract_model(config)
  params = {
    ".".join(map(str, path)): var.get_value()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  check_tensors({name: tuple(p.shape) for name, p in params.items()}, expected, "model")
  directory.mkdir(parents=True, exist_ok=True)
  for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
    stale.unlink(missing_ok=True)
  hf_config = config.to_hf_dict()
  hf_config["torch_dtype"] = jnp.dtype(next(iter(params.values())).dtype).name
  atomic_write_text(directory / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")

  shards, size = [[]], 0
  for name, param in params.items():
    if shards[-1] and size + param.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += param.nbytes
  files = (
    [WEIGHTS_FILE]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  for file, shard in tqdm(list(zip(files, shards)), desc="saving", leave=False, disable=None):
    with atomic_path(directory / file) as tmp:
      save_file(
        {name: np.asarray(jax.device_get(params[name])) for name in shard},
        tmp,
        metadata={"format": "pt"},
      )
  if len(shards) > 1:
    index = {
      "metadata": {"total_size": sum(p.nbytes for p in params.values())},
      "weight_map": {name: file for file, shard in zip(files, shards) for name in shard},
    }
    atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
  return directory


def load_tokenizer(path_or_hub_id: str | Path):
  """transformers.AutoTokenizer for a checkpoint directory (or hub id)."""
  directory = resolve_checkpoint_dir(path_or_hub_id)
  if not any((directory / name).is_file() for name in TOKENIZER_FILES):
    raise FileNotFoundError(
      f"no tokenizer in {directory}: expected one of {', '.join(TOKENIZER_FILES)}"
    )
  from transformers import AutoTokenizer  # slow import, only when a tokenizer is needed

  try:
    return AutoTokenizer.from_pretrained(str(directory))
  except (OSError, ValueError, TypeError) as error:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise FileNotFoundError(f"no usable tokenizer in {directory}: {reason}") from None
