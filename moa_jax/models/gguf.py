"""GGUF checkpoints (llama.cpp's file format) without torch or llama.cpp.

The `gguf` package (numpy only) reads the file; the metadata becomes a HF config.json dict and a
LlamaConfig, every tensor is dequantized to float32 with `gguf.quants.dequantize` and renamed to
our parameter names (models/hf.py's names), and llama.cpp's row permutation of the Q and K
projections is undone. As with safetensors, everything (architecture, metadata, tensor names,
shapes, types, file size) is checked before the first tensor is dequantized: bad input is a
one-line ValueError naming the file, and nothing is loaded.

The tokenizer is rebuilt from the metadata (vocabulary, merges, special token ids, chat template)
with transformers' GGUF tokenizer converter, which needs no torch.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from moa_jax.models.config import SUPPORTED_ARCHITECTURE, LlamaConfig
from moa_jax.models.hf import _abstract_model, assemble_model, check_finite, check_tensors
from moa_jax.models.llama import Llama, rope_inv_freq

GGUF_SUFFIX = ".gguf"
ARCHITECTURE = "llama"  # general.architecture of the files we read
# Tensor types we dequantize (all through gguf.quants.dequantize).
TENSOR_TYPES = (
  "F32",
  "F16",
  "BF16",
  "Q4_0",
  "Q4_1",
  "Q5_0",
  "Q5_1",
  "Q8_0",
  "Q2_K",
  "Q3_K",
  "Q4_K",
  "Q5_K",
  "Q6_K",
)
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1-style RoPE frequency factors [H/2]
# GGUF tensor name stem <-> our (HF) parameter name stem; per-layer stems below.
_GLOBAL_NAMES = {
  "token_embd": "model.embed_tokens",
  "output_norm": "model.norm",
  "output": "lm_head",
}
_LAYER_NAMES = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_GGUF_GLOBAL = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_GGUF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}
# llama.cpp's converter writes no Llama-3 RoPE parameters besides the factors; these are the
# values of every Llama-3.x release, checked against the stored factors.
_LLAMA3_DEFAULTS = {
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8192,
}


def is_gguf(path: str | Path) -> bool:
  return str(path).endswith(GGUF_SUFFIX)


def gguf_name(hf_name: str) -> str:
  """Our parameter name -> the GGUF tensor name (e.g. model.layers.3.mlp.up_proj.weight ->
  blk.3.ffn_up.weight)."""
  if match := _HF_LAYER.fullmatch(hf_name):
    return f"blk.{match.group(1)}.{_GGUF_LAYER[match.group(2)]}.weight"
  return _GGUF_GLOBAL[hf_name.removesuffix(".weight")] + ".weight"


def read_gguf(path: str | Path):
  """A gguf.GGUFReader of the file (memory-mapped; no tensor is dequantized).

  Raises FileNotFoundError for a missing file and a one-line ValueError for anything `gguf`
  cannot parse (not GGUF, truncated, corrupt).
  Parsing the metadata takes seconds for a large vocabulary, so the last few readers are kept
  (keyed by path, size and modification time).
  """
  file = Path(path).expanduser()
  if not file.is_file():
    raise FileNotFoundError(f"GGUF file {file} does not exist")
  stat = file.stat()
  return _cached_reader(file.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(file: Path, size: int, mtime_ns: int):  # size, mtime: keys of the cache
  import gguf  # numpy only, but only GGUF users need it

  try:  # a tensor cut short by the end of the file fails the reader's reshape
    return gguf.GGUFReader(file)
  except Exception as error:  # the reader raises ValueError, KeyError, IndexError, ... alike
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(
      f"{file} is not a readable GGUF file (truncated or corrupt?): {reason}"
    ) from None


def _metadata(reader, key: str, file: Path, default: Any = ...) -> Any:
  """The value of metadata `key` (python scalar, str or list); default if absent (... = required).

  float32 values come back as the shortest decimal that rounds to them (1e-05, not 9.99e-06).
  """
  import gguf

  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise ValueError(f"{file}: GGUF metadata lacks {key}")
    return default
  value = field.contents()
  if field.types[-1] == gguf.GGUFValueType.FLOAT32:
    to_decimal = lambda x: float(str(np.float32(x)))
    value = [to_decimal(v) for v in value] if isinstance(value, list) else to_decimal(value)
  return value


def _scalar(reader, key: str, file: Path, default: Any = ...) -> Any:
  value = _metadata(reader, key, file, default)
  if isinstance(value, list):
    raise ValueError(
      f"{file}: GGUF metadata {key} is a per-layer list {value[:4]}...; moa_jax "
      f"supports only one value for all layers"
    )
  return value


def _rope_scaling(reader, file: Path, base: dict) -> dict | None:
  """HF rope_scaling from the metadata (linear) or from rope_freqs.weight (Llama-3), or None."""
  import gguf

  kind = _scalar(reader, f"{ARCHITECTURE}.rope.scaling.type", file, "none")
  factor = _scalar(reader, f"{ARCHITECTURE}.rope.scaling.factor", file, None)
  if factor is None:  # older files: rope.scale_linear
    factor = _scalar(reader, f"{ARCHITECTURE}.rope.scale_linear", file, None)
    kind = "linear" if factor not in (None, 1.0) else kind
  freqs = [t for t in reader.tensors if t.name == ROPE_FREQS]
  if kind not in ("none", "linear") or (kind == "linear" and freqs):
    raise ValueError(
      f"{file}: unsupported RoPE scaling {kind!r}"
      f"{' with ' + ROPE_FREQS if freqs else ''}; moa_jax reads 'none', 'linear' "
      f"and Llama-3 frequency factors ({ROPE_FREQS})"
    )
  if kind == "linear":
    if factor is None:
      raise ValueError(f"{file}: linear RoPE scaling without {ARCHITECTURE}.rope.scaling.factor")
    return {"rope_type": "linear", "factor": float(factor)}
  if not freqs:
    return None
  stored = np.asarray(gguf.quants.dequantize(freqs[0].data, freqs[0].tensor_type), np.float32)
  original = _scalar(reader, f"{ARCHITECTURE}.rope.scaling.original_context_length", file, None)
  scaling = {**_LLAMA3_DEFAULTS, "rope_type": "llama3", "factor": float(stored.max())}
  if original:
    scaling["original_max_position_embeddings"] = int(original)
  config = LlamaConfig.from_hf_dict({**base, "rope_scaling": None})
  plain = rope_inv_freq(config)
  implied = plain / rope_inv_freq(config.replace(rope_scaling=scaling))
  if stored.shape != plain.shape or not np.allclose(stored, implied, rtol=1e-4):
    raise ValueError(
      f"{file}: {ROPE_FREQS} (shape {stored.shape}) is not a Llama-3 RoPE "
      f"scaling moa_jax can express (tried {scaling})"
    )
  return scaling


def gguf_hf_config(reader, path: str | Path) -> dict[str, Any]:
  """The config.json dict (LlamaForCausalLM, transformers' keys) a llama GGUF's metadata implies.

  Raises a one-line ValueError for another architecture or a Llama variant we do not support.
  """
  file = Path(path)
  architecture = _scalar(reader, "general.architecture", file)
  if architecture != ARCHITECTURE:
    raise ValueError(
      f"{file}: unsupported GGUF architecture {architecture!r}; moa_jax reads only "
      f"{ARCHITECTURE!r} (Llama-family) GGUF files"
    )
  get = lambda key, default=...: _scalar(reader, f"{ARCHITECTURE}.{key}", file, default)
  if get("expert_count", 0):
    raise ValueError(
      f"{file}: a mixture-of-experts GGUF ({ARCHITECTURE}.expert_count="
      f"{get('expert_count')}) is not supported"
    )
  heads, hidden = get("attention.head_count"), get("embedding_length")
  head_dim = get("attention.key_length", hidden // heads)
  for key in ("attention.value_length", "rope.dimension_count"):
    if get(key, head_dim) != head_dim:
      raise ValueError(
        f"{file}: {ARCHITECTURE}.{key}={get(key)} differs from the head dim "
        f"{head_dim}; moa_jax supports only full rotary, equal K/V head dims"
      )
  tensors = {t.name: t for t in reader.tensors}
  vocab = get("vocab_size", None)
  if vocab is None and (tokens := reader.fields.get("tokenizer.ggml.tokens")) is not None:
    vocab = len(tokens.data)
  if vocab is None and "token_embd.weight" in tensors:
    vocab = int(tensors["token_embd.weight"].shape[-1])
  if vocab is None:
    raise ValueError(
      f"{file}: cannot tell the vocabulary size (no {ARCHITECTURE}.vocab_size, "
      f"no tokenizer.ggml.tokens, no token_embd.weight)"
    )
  eos = [_scalar(reader, f"tokenizer.ggml.{key}_token_id", file, None) for key in ("eos", "eot")]
  eos = list(dict.fromkeys(i for i in eos if i is not None))
  hf = {
    "architectures": [SUPPORTED_ARCHITECTURE],
    "model_type": "llama",
    "vocab_size": vocab,
    "hidden_size": hidden,
    "intermediate_size": get("feed_forward_length"),
    "num_hidden_layers": get("block_count"),
    "num_attention_heads": heads,
    "num_key_value_heads": get("attention.head_count_kv", heads),
    "head_dim": head_dim,
    "hidden_act": "silu",
    "rope_theta": float(get("rope.freq_base", 10000.0)),
    "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
    "max_position_embeddings": get("context_length", 2048),
    "tie_word_embeddings": "output.weight" not in tensors,
    "bos_token_id": _scalar(reader, "tokenizer.ggml.bos_token_id", file, None),
    "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
  }
  hf["rope_scaling"] = _rope_scaling(reader, file, hf)
  return hf


def _default_param_dtype(tensors) -> str:
  """Files whose matrices are all F16 (BF16) keep that dtype; any other dequantizes to float32."""
  stored = {t.tensor_type.name for t in tensors if len(t.shape) > 1}
  if stored == {"F16"}:
    return "float16"
  return "bfloat16" if stored == {"BF16"} else "float32"


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation of a [heads * H, D] weight.

  llama.cpp stores each head's rows as interleaved pairs (x0, x(H/2), x1, x(H/2+1), ...) for its
  RoPE; HF (and we) rotate halves, so the rows of each head go back to (x0, x1, ..., x(H-1)).
  """
  rows = weight.shape[0]
  return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _shape(tensor) -> tuple[int, ...]:
  """numpy / HF layout of a GGUF tensor (GGUF lists dimensions innermost first)."""
  return tuple(int(n) for n in reversed(tensor.shape))


def inspect_gguf(path: str | Path, *, dtype=None, param_dtype=None) -> tuple[LlamaConfig, dict]:
  """(config, GGUF tensor name -> reader tensor) of a llama GGUF file, checked as `load_gguf`
  checks it (metadata, names, shapes, types; a truncated file) without dequantizing a tensor.

  param_dtype defaults to the file's dtype for F16/BF16 files, else float32; dtype (compute) to
  param_dtype.
  """
  file = Path(path).expanduser()
  reader = read_gguf(file)
  param_dtype = param_dtype or _default_param_dtype(reader.tensors)
  config = LlamaConfig.from_hf_dict(
    gguf_hf_config(reader, file), dtype=dtype, param_dtype=param_dtype
  )
  tensors = {t.name: t for t in reader.tensors if t.name != ROPE_FREQS}
  expected = _abstract_model(config)[1]
  check_tensors(
    {name: _shape(t) for name, t in tensors.items()},
    {gguf_name(name): param for name, param in expected.items()},
    f"GGUF file {file}",
    described_by="its metadata",
  )
  for name, tensor in tensors.items():
    if tensor.tensor_type.name not in TENSOR_TYPES:
      raise ValueError(
        f"{file}: tensor {name!r} has type {tensor.tensor_type.name}; moa_jax "
        f"reads {', '.join(TENSOR_TYPES)}"
      )
  return config, tensors


def gguf_config(path: str | Path, *, dtype=None, param_dtype=None) -> LlamaConfig:
  """The LlamaConfig of a llama GGUF file (fully checked, nothing dequantized)."""
  return inspect_gguf(path, dtype=dtype, param_dtype=param_dtype)[0]


def load_gguf(path: str | Path, *, dtype=None, param_dtype=None) -> tuple[Llama, LlamaConfig]:
  """Load a llama GGUF file as a `Llama` and its config (tensors dequantized to param_dtype).

  Defaults and checks as `inspect_gguf`; everything is checked before any tensor is read.
  """
  import gguf

  file = Path(path).expanduser()
  config, tensors = inspect_gguf(file, dtype=dtype, param_dtype=param_dtype)
  graphdef, expected = _abstract_model(config)
  heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
  arrays = {}
  for name in tqdm(expected, desc=f"loading {file.name}", leave=False, disable=None):
    tensor = tensors[gguf_name(name)]
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(_shape(tensor))
    if (stem := tensor.name.split(".")[-2]) in heads:
      weight = unpermute_rows(weight, heads[stem])
    arrays[name] = jax.device_put(weight).astype(config.param_dtype)
  check_finite(arrays, str(file))
  return assemble_model(graphdef, expected, arrays), config


def load_gguf_tokenizer(path: str | Path):
  """A transformers fast tokenizer rebuilt from a GGUF file's tokenizer metadata.

  Special tokens come from the metadata's ids (transformers' own GGUF path names the BOS token as
  EOS, too); the chat template is the file's tokenizer.chat_template.
  """
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.ggml import convert_gguf_tokenizer

  file = Path(path).expanduser()
  reader = read_gguf(file)
  get = lambda key, default=None: _metadata(reader, f"tokenizer.{key}", file, default)
  model = get("ggml.model")
  if model is None or not get("ggml.tokens"):
    raise ValueError(
      f"{file} holds no tokenizer (no tokenizer.ggml.model / tokens metadata); "
      f"pass a tokenizer directory as model.tokenizer"
    )
  if model not in ("gpt2", "llama"):
    raise ValueError(
      f"{file}: tokenizer.ggml.model is {model!r}; moa_jax rebuilds 'gpt2' (BPE) "
      f"and 'llama' (SentencePiece) tokenizers"
    )
  tokens = get("ggml.tokens")
  ids = {
    name: get(f"ggml.{key}_token_id")
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
  }
  for name, token_id in ids.items():
    if token_id is not None and not 0 <= token_id < len(tokens):
      raise ValueError(
        f"{file}: tokenizer {name} id {token_id} is outside the vocabulary of {len(tokens)} tokens"
      )
  spec = {
    "tokenizer_type": model,
    "tokens": tokens,
    "bos_token_id": ids["bos"],
    "eos_token_id": ids["eos"],
    "unk_token_id": ids["unk"],
    "pad_token_id": ids["pad"],
  }
  for key, name in (
    ("ggml.scores", "scores"),
    ("ggml.token_type", "token_type"),
    ("ggml.merges", "merges"),
    ("ggml.add_space_prefix", "add_prefix_space"),
  ):
    if (value := get(key)) is not None:
      spec[name] = value
  backend, _ = convert_gguf_tokenizer(ARCHITECTURE, spec)
  special = {f"{name}_token": tokens[i] for name, i in ids.items() if i is not None}
  return PreTrainedTokenizerFast(
    tokenizer_object=backend,
    chat_template=get("chat_template"),
    clean_up_tokenization_spaces=False,
    **special,
  )
