"""Memory plan (dry run): per-device bytes of weights, cache and activations of a run on a mesh.

Llama-3-70B, MoA generate at 16k tokens (KV density 0.5) on 8 x H200 (141 GB), tensor-parallel:
  python -m moa_jax plan-memory --config=configs/memory.py:llama-3-70b
Llama-3-8B on one H200; the lean profile at 8k instead:
  python -m moa_jax plan-memory --config=configs/memory.py:llama-3-8b --config.task=profile \
      --config.length=8192
Another mesh (data, fsdp, tensor), a real plan, a checkpoint's config.json instead of a preset:
  ... --config.mesh.shape="(1,2,4)" --config.plan=runs/compress/plan.json \
      --config.model.preset="" --config.model.path=/path/to/Meta-Llama-3-70B
The CI variant (a tiny model on 8 fake CPU devices, a few seconds):
  python -m moa_jax plan-memory --config=configs/memory.py:tiny

Compiles the run's programs for the mesh without running them (no weights are read or created;
a few minutes for 70B on a CPU); prints a table (--workdir: also memory_plan.json there) and
exits with a one-line error when the peak exceeds usable_fraction of device_memory_gb.
"""

from ml_collections import ConfigDict

from moa_jax.models.loading import model_section
from moa_jax.models.sharding import mesh_section

VARIANTS = {"llama-3-8b": (1, 1, 1), "llama-3-70b": (1, 1, 8), "tiny": (2, 2, 2)}


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "llama-3-70b"
  if variant not in VARIANTS:
    raise ValueError(f"configs/memory.py takes one of {', '.join(VARIANTS)}, got {variant!r}")
  tiny = variant == "tiny"
  config = ConfigDict()
  config.model = model_section(preset=variant, dtype="float32" if tiny else "bfloat16")
  config.mesh = mesh_section(VARIANTS[variant])
  config.task = "generate"  # 'generate' (prefill into the MoA cache + decode) or 'profile' (lean)
  config.length = 512 if tiny else 16384  # generate: planned total tokens; profile: sample length
  config.batch_size = 1
  # generate: the prompt is length - new_tokens tokens, fed in calls of prefill_chunk (0: one)
  config.new_tokens = 64 if tiny else 256
  config.prefill_chunk = 0
  config.density = 0.5  # KV density of a uniform stand-in plan (every head one window) ...
  config.plan = ""  # ... or a plan.json (its windows and sink)
  config.sink = 64
  # profile: response tokens read by the loss, the loss, block size and the tiled pass's rows
  config.response_tokens = 16 if tiny else 128
  config.loss = "nll"
  config.block = 64
  config.tile = 128 if tiny else 512
  config.device_memory_gb = 141.0  # one H200
  # What a run may use: XLA preallocates 75% by default; raise it (XLA_PYTHON_CLIENT_MEM_FRACTION)
  config.usable_fraction = 0.9
  return config
