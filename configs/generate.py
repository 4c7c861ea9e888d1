"""Generate continuations of a few prompts with a Llama (dense attention, KV cache).

Tiny random model, runs on a CPU in ~10 s, prints the new token ids of 3 random prompts:
  python -m moa_jax generate --config=configs/generate.py:tiny

A HF checkpoint (local directory or hub id) with its tokenizer, prints the decoded text:
  python -m moa_jax generate --config=configs/generate.py:hf \
      --config.model_path=/path/to/Llama-3.2-1B --config.max_new_tokens=64 --workdir=runs/generate

With --workdir the prompts and new tokens (and text) are also written to generated.json there.
"""

from ml_collections import ConfigDict, config_dict


def get_config(arg: str = "tiny") -> ConfigDict:
  if arg not in ("tiny", "hf"):
    raise ValueError(f"configs/generate.py takes 'tiny' or 'hf', got {arg!r}")
  config = ConfigDict()
  # HF checkpoint directory or hub id; "" builds a random-init model from model_preset.
  config.model_path = config_dict.placeholder(str) if arg == "hf" else ""
  config.model_preset = "tiny"  # a LlamaConfig.preset name (used when model_path is "")
  config.dtype = ""  # compute dtype, e.g. "bfloat16"; "" = the checkpoint's own dtype
  # Text prompts (used when the model directory has a tokenizer).
  config.prompts = ("The capital of France is", "Sparse attention lets a model",
                    "Once upon a time")
  # Without a tokenizer: random prompts of these lengths (token ids drawn with `seed`).
  config.random_prompt_lengths = (5, 12, 9)
  config.max_new_tokens = 16 if arg == "tiny" else 64
  config.temperature = 0.0  # 0 = greedy
  config.top_k = 0  # 0 = no top-k truncation (sampling only)
  config.seed = 0
  return config
