"""Generate continuations of a few prompts with a Llama, dense or with a MoA plan.

The embedded reference model (CPU, a few seconds), dense attention:
  python -m moa_jax generate --config=configs/generate.py
The same on the plan `compress` chose (MoA sparse prefill and its static per-head KV cache):
  python -m moa_jax generate --config=configs/generate.py --config.plan=runs/compress/plan.json
A random tiny model on the reference tokenizer (CI):
  python -m moa_jax generate --config=configs/generate.py:tiny
A HF checkpoint (local directory or hub id) with its tokenizer:
  python -m moa_jax generate --config=configs/generate.py:hf \
      --config.model.path=/path/to/Llama-3.2-1B --config.max_new_tokens=64 --workdir=runs/generate

Prints the prompts' continuations; with --workdir also writes generated.json there.
"""

from ml_collections import ConfigDict

from moa_jax.models.loading import model_section
from moa_jax.models.sharding import mesh_section

VARIANTS = ("reference", "tiny", "hf")


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "reference"
  if variant not in VARIANTS:
    raise ValueError(f"configs/generate.py takes one of {', '.join(VARIANTS)}, got {variant!r}")
  config = ConfigDict()
  config.model = model_section(
    path=None if variant == "hf" else "",
    preset="tiny" if variant == "tiny" else "",
    dtype="" if variant == "hf" else "float32",
  )
  config.plan = ""  # a plan.json (from `compress`): generate with its MoA attention and cache
  config.prompts = (
    "USER: What does sparse attention save? ASSISTANT:",
    "def fibonacci(n):",
    "Once upon a time",
  )
  config.chat = False  # wrap each prompt in the tokenizer's chat template
  config.max_new_tokens = 16 if variant == "tiny" else 64
  config.temperature = 0.0  # 0 = greedy
  config.top_k = 0  # 0 = no top-k truncation (sampling only)
  config.seed = 0
  config.mesh = mesh_section()  # devices (data, fsdp, tensor), e.g. --config.mesh.shape="(1,1,2)"
  return config
