"""Llama model hyperparameters: a frozen dataclass, the published presets, HF config.json I/O.

Model hyperparameters live here; experiment knobs live in configs/ (ml_collections).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

ROPE_TYPES = ("linear", "llama3")  # the RoPE scalings a Llama config.json can name that we support
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SUPPORTED_ARCHITECTURE = "LlamaForCausalLM"


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


def _normalize_rope_scaling(scaling) -> tuple[tuple[str, Any], ...] | None:
  """HF's rope_scaling dict (or our sorted item tuple) -> sorted items with 'rope_type', or None."""
  if scaling is None:
    return None
  items = dict(scaling)
  rope_type = items.pop("rope_type", None) or items.pop("type", None)
  items.pop("type", None)
  items.pop("rope_theta", None)  # transformers 5 folds rope_theta into rope_parameters
  if rope_type in (None, "default"):
    return None
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"unsupported RoPE scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
  required = ("factor",) if rope_type == "linear" else _LLAMA3_KEYS
  missing = [key for key in required if key not in items]
  if missing:
    raise ValueError(f"RoPE scaling {rope_type!r} is missing {', '.join(missing)}")
  items["rope_type"] = rope_type
  return tuple(sorted(items.items()))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of a Llama-family decoder (hashable, so usable as a jit static arg).

  rope_scaling is None or HF's rope_scaling dict stored as sorted (key, value) items with a
  'rope_type' of 'linear' or 'llama3' (a dict is accepted and normalised). dtype is the compute
  dtype, param_dtype the storage dtype of the parameters (both stored as names, e.g. 'bfloat16').
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)
    set_field("rope_scaling", _normalize_rope_scaling(self.rope_scaling))
    set_field("dtype", _dtype_name(self.dtype))
    set_field("param_dtype", _dtype_name(self.param_dtype))
    eos = self.eos_token_ids
    set_field(
      "eos_token_ids", () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    )
    for name in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def group_size(self) -> int:
    """G = N / K query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- presets (published shapes)

  @classmethod
  def vicuna_7b_16k(cls, **overrides) -> LlamaConfig:
    """lmsys/vicuna-7b-v1.5-16k: Llama-2-7B shape, MHA, linear RoPE scaling x4."""
    return cls(
      **{
        **dict(
          vocab_size=32000,
          hidden_size=4096,
          intermediate_size=11008,
          num_layers=32,
          num_heads=32,
          num_kv_heads=32,
          head_dim=128,
          rope_theta=10000.0,
          rope_scaling={"rope_type": "linear", "factor": 4.0},
          rms_norm_eps=1e-5,
          max_position_embeddings=4096,
          bos_token_id=1,
          eos_token_ids=(2,),
          dtype="bfloat16",
          param_dtype="bfloat16",
        ),
        **overrides,
      }
    )

  @classmethod
  def vicuna_13b_16k(cls, **overrides) -> LlamaConfig:
    """lmsys/vicuna-13b-v1.5-16k: Llama-2-13B shape, MHA, linear RoPE scaling x4."""
    return cls.vicuna_7b_16k(
      **{
        **dict(
          hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
        ),
        **overrides,
      }
    )

  @classmethod
  def llama3_8b(cls, **overrides) -> LlamaConfig:
    """meta-llama/Meta-Llama-3-8B: GQA 32/8, theta 5e5, no RoPE scaling."""
    return cls(
      **{
        **dict(
          vocab_size=128256,
          hidden_size=4096,
          intermediate_size=14336,
          num_layers=32,
          num_heads=32,
          num_kv_heads=8,
          head_dim=128,
          rope_theta=500000.0,
          rope_scaling=None,
          rms_norm_eps=1e-5,
          max_position_embeddings=8192,
          bos_token_id=128000,
          eos_token_ids=(128001,),
          dtype="bfloat16",
          param_dtype="bfloat16",
        ),
        **overrides,
      }
    )

  @classmethod
  def llama3_70b(cls, **overrides) -> LlamaConfig:
    """meta-llama/Meta-Llama-3-70B: GQA 64/8."""
    return cls.llama3_8b(
      **{
        **dict(
          hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8
        ),
        **overrides,
      }
    )

  @classmethod
  def llama31_8b(cls, **overrides) -> LlamaConfig:
    """meta-llama/Llama-3.1-8B: Llama-3-8B shape with 'llama3' RoPE scaling x8, 128k context."""
    return cls.llama3_8b(
      **{
        **dict(
          rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
          },
          max_position_embeddings=131072,
        ),
        **overrides,
      }
    )

  @classmethod
  def llama32_1b(cls, **overrides) -> LlamaConfig:
    """meta-llama/Llama-3.2-1B: 16 layers, GQA 32/8, head_dim 64, tied embeddings."""
    return cls.llama31_8b(
      **{
        **dict(
          hidden_size=2048,
          intermediate_size=8192,
          num_layers=16,
          num_heads=32,
          num_kv_heads=8,
          head_dim=64,
          tie_word_embeddings=True,
          rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
          },
        ),
        **overrides,
      }
    )

  @classmethod
  def llama32_3b(cls, **overrides) -> LlamaConfig:
    """meta-llama/Llama-3.2-3B: 28 layers, GQA 24/8, head_dim 128, tied embeddings."""
    return cls.llama32_1b(
      **{
        **dict(
          hidden_size=3072,
          intermediate_size=8192,
          num_layers=28,
          num_heads=24,
          num_kv_heads=8,
          head_dim=128,
        ),
        **overrides,
      }
    )

  @classmethod
  def smollm2_135m(cls, **overrides) -> LlamaConfig:
    """HuggingFaceTB/SmolLM2-135M(-Instruct): 30 layers, GQA 9/3, head_dim 64, tied embeddings."""
    return cls(
      **{
        **dict(
          vocab_size=49152,
          hidden_size=576,
          intermediate_size=1536,
          num_layers=30,
          num_heads=9,
          num_kv_heads=3,
          head_dim=64,
          rope_theta=100000.0,
          rope_scaling=None,
          rms_norm_eps=1e-5,
          tie_word_embeddings=True,
          max_position_embeddings=8192,
          bos_token_id=1,
          eos_token_ids=(2,),
          dtype="float32",
          param_dtype="float32",
        ),
        **overrides,
      }
    )

  @classmethod
  def tiny(cls, **overrides) -> LlamaConfig:
    """A few-kB random model for tests and CPU demos: GQA 4/2, 'llama3' RoPE scaling, float32."""
    return cls(
      **{
        **dict(
          vocab_size=256,
          hidden_size=64,
          intermediate_size=160,
          num_layers=2,
          num_heads=4,
          num_kv_heads=2,
          head_dim=16,
          rope_theta=10000.0,
          rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
          },
          rms_norm_eps=1e-5,
          max_position_embeddings=256,
          bos_token_id=1,
          eos_token_ids=(2,),
          dtype="float32",
          param_dtype="float32",
        ),
        **overrides,
      }
    )

  @classmethod
  def preset(cls, name: str, **overrides) -> LlamaConfig:
    """A preset by its name in PRESETS (e.g. 'llama-3-8b', 'tiny'), with field overrides."""
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return getattr(cls, PRESETS[name])(**overrides)

  # ---------------------------------------------------------------- HF config.json

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], *, dtype=None, param_dtype=None) -> LlamaConfig:
    """A Llama config.json dict (transformers 4.x or 5.x layout) -> LlamaConfig.

    param_dtype defaults to the checkpoint's torch_dtype/dtype (else float32) and dtype (compute)
    to param_dtype. Raises ValueError for any other architecture or an unsupported feature.
    """
    check_supported_architecture(hf)
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
      if hf.get(key, supported) != supported:
        raise ValueError(
          f"unsupported Llama variant: config.json has {key}={hf[key]!r}, "
          f"moa_jax supports only {supported!r}"
        )
    missing = [
      key
      for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
      )
      if key not in hf
    ]
    if missing:
      raise ValueError(f"config.json lacks {', '.join(missing)}")
    rope_parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope_parameters or None
    stored_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    param_dtype = param_dtype or stored_dtype
    num_heads = hf["num_attention_heads"]
    return cls(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      rope_theta=float(hf.get("rope_theta") or rope_parameters.get("rope_theta") or 10000.0),
      rope_scaling=scaling,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=hf.get("eos_token_id"),
      dtype=dtype or param_dtype,
      param_dtype=param_dtype,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The config.json dict transformers' LlamaForCausalLM reads (legacy rope_scaling layout)."""
    eos = self.eos_token_ids
    return {
      "architectures": [SUPPORTED_ARCHITECTURE],
      "model_type": "llama",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "rope_theta": self.rope_theta,
      "rope_scaling": self.rope_scaling_dict,
      "rms_norm_eps": self.rms_norm_eps,
      "tie_word_embeddings": self.tie_word_embeddings,
      "max_position_embeddings": self.max_position_embeddings,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else list(eos),
      "torch_dtype": self.param_dtype,
    }


def check_supported_architecture(hf: Mapping[str, Any]) -> None:
  """Raise a one-line ValueError unless a config.json dict describes a LlamaForCausalLM."""
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or []
  if model_type != "llama" or any(arch != SUPPORTED_ARCHITECTURE for arch in architectures):
    raise ValueError(
      f"unsupported architecture (model_type={model_type!r}, architectures={architectures}); "
      f"moa_jax loads only Llama-family checkpoints (model_type 'llama', {SUPPORTED_ARCHITECTURE})"
    )


# Preset name -> LlamaConfig classmethod.
PRESETS = {
  "vicuna-7b-v1.5-16k": "vicuna_7b_16k",
  "vicuna-13b-v1.5-16k": "vicuna_13b_16k",
  "llama-3-8b": "llama3_8b",
  "llama-3-70b": "llama3_70b",
  "llama-3.1-8b": "llama31_8b",
  "llama-3.2-1b": "llama32_1b",
  "llama-3.2-3b": "llama32_3b",
  "smollm2-135m": "smollm2_135m",
  "tiny": "tiny",
}
