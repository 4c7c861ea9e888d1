"""Config sections shared by the experiment configs (imported as `configs.common`).

`compress_config(variant)` is the whole compress pipeline config (model, calibration, profile,
optimize, select) of a variant; configs/compress.py, demo.py, eval.py and sweep.py build on it.
"""

from ml_collections import config_dict

from moa_jax.models.loading import model_section
from moa_jax.models.sharding import mesh_section

# Built by experiments/make_calibration_tasks.py from the task suite (other seeds than any
# evaluation): passkey, multi-key needle, variable tracking, UUID key-value, and line retrieval.
REFERENCE_CALIBRATION = "moa_jax/assets/calibration/reference_tasks_with_lines.jsonl"
REFERENCE_CALIBRATION_AGNOSTIC = "moa_jax/assets/calibration/reference_tasks.jsonl"


VARIANTS = ("reference", "agnostic", "tiny", "paper", "smollm2")


def compress_config(variant: str = "reference", lock: bool = True) -> config_dict.ConfigDict:
  """The compress config of `variant` (one of VARIANTS), locked unless `lock` is False."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  c = config_dict.ConfigDict()
  c.seed = 0

  c.model = model_section()  # '' path = the embedded reference model
  c.mesh = mesh_section()  # devices (data, fsdp, tensor): the model sharded (docs/sharding.md)

  c.calibration = config_dict.ConfigDict()
  c.calibration.source = (
    "jsonl"  # 'multinews' (hub id or local file) or 'jsonl' {context, question}
  )
  c.calibration.path = REFERENCE_CALIBRATION
  c.calibration.split = "train"
  c.calibration.lengths = (1024, 3072)
  c.calibration.samples_per_length = 8
  c.calibration.max_new_tokens = 16
  c.calibration.template = "auto"
  c.calibration.min_fill = 0.5
  c.calibration.batch_size = 4

  c.profile = config_dict.ConfigDict()
  c.profile.lengths = (1024, 3072)  # each needs calibration samples of that length
  c.profile.block = 64
  c.profile.path = "lean"  # 'lean' (tiled, memory-lean) or 'direct' (jax.grad on the maps)
  # Per sample and block: 'blocks' = |sum of E| (the size of the loss change of masking the
  # block; measured better on the reference model, benchmarks/README.md "Profile magnitude") or
  # 'entries' = sum of |E| (the paper's profile).
  c.profile.magnitude = "blocks"
  # The loss differentiated: 'log_odds' (does not vanish on confident answers; measured better on
  # the reference model, benchmarks/README.md "Profile loss") or 'nll' (the paper's).
  c.profile.loss = "log_odds"
  c.profile.batch_size = 1

  c.optimize = config_dict.ConfigDict()
  c.optimize.density = 0.5  # KV-density budget at every constraint length
  c.optimize.lower = 0.9  # band: lower * density <= KV density <= density
  c.optimize.constraint_lengths = (1024, 2048, 3072, 4096)
  c.optimize.alpha_step = 512
  c.optimize.betas = tuple(i / 8 for i in range(9))
  c.optimize.max_rules_per_layer = 2
  c.optimize.grouping = "kv_group"  # or 'query_head' (group cache sized by its largest span)
  c.optimize.sink = 64
  c.optimize.intervals = 2
  c.optimize.time_limit = 20.0  # seconds per MILP solve
  c.optimize.workers = 2

  c.select = config_dict.ConfigDict()
  c.select.length = 4096  # unseen, longer than every profile length
  c.select.num_samples = 2
  c.select.split = "validation"

  if variant == "agnostic":  # the first demo's settings, without line-retrieval calibration
    c.calibration.path = REFERENCE_CALIBRATION_AGNOSTIC
    c.calibration.lengths = (1024, 2048, 3072)
    c.calibration.samples_per_length = 4
    c.profile.lengths = (1024, 2048, 3072)
    c.select.length = 4096
  elif variant == "tiny":
    c.model.preset = "tiny"
    c.calibration.lengths = (256, 512)
    c.calibration.samples_per_length = 2
    c.calibration.max_new_tokens = 8
    c.calibration.min_fill = 0.2
    c.profile.lengths = (256, 512)
    c.optimize.constraint_lengths = (256, 512, 1024)
    c.optimize.alpha_step = 128
    c.optimize.intervals = 2
    c.select.length = 768
    c.select.num_samples = 2
  elif variant == "smollm2":  # the real pretrained default (ChatML; retrieves at 1k-2k)
    c.model.path = "smollm2-135m-instruct"
    c.calibration.lengths = (1024, 2048)
    c.profile.lengths = (1024, 2048)
    c.optimize.constraint_lengths = (1024, 2048, 4096)
    c.optimize.alpha_step = 256
    c.select.length = 3072
    c.select.num_samples = 4
  elif variant == "paper":
    c.model.dtype = "bfloat16"
    c.calibration.source = "multinews"
    c.calibration.path = "alexfabbri/multi_news"
    c.calibration.lengths = (2048, 4096, 8192)
    c.calibration.samples_per_length = 50
    c.calibration.max_new_tokens = 128
    c.profile.magnitude = "entries"
    c.profile.loss = "nll"
    c.profile.lengths = (2048, 4096, 8192)
    c.optimize.constraint_lengths = (2048, 4096, 8192, 16384)
    c.optimize.alpha_step = 1024
    c.select.length = 12288
    c.select.num_samples = 50
  if lock:
    c.lock()
  return c
