"""`python -m moa_jax eval`: methods x tasks x lengths, resumable per cell.

  python -m moa_jax eval --config=configs/eval.py --workdir=runs/eval \
      --config.eval.plans=moa=runs/demo/compress/plan.json          # + dense and uniform
  python -m moa_jax eval --config=configs/eval.py:demo --workdir=runs/demo_eval
  python -m moa_jax eval --config=configs/eval.py:longtext --workdir=runs/longtext
  python -m moa_jax eval --config=configs/eval.py:reference_model --workdir=runs/reference_eval
  python -m moa_jax eval --config=configs/eval.py:tiny --workdir=/tmp/eval_tiny    # CI, seconds

Fields: `model` (moa_jax.models.loading.model_section: any checkpoint the loaders read,
'' for the embedded reference model, or a random preset) and `eval`
(moa_jax.eval.command.eval_section: methods, plans as name=path in our JSON or the official MoA
JSON, tasks among lines/passkey/niah/vt/uuid, longtext and longbench/<dataset>, lengths, depths).
Writes DIR/cells/ (one file per finished cell; a re-run computes only the missing ones),
DIR/results.json (records, summary, this config and the command), plots and DIR/report.md.

Variants:
  (default)        the reference model, dense and uniform (add plans), lines at 1k/2k/3k.
  demo             the demo's evaluation of its plan (runs/demo/compress/plan.json): lines at
                   1k/2k/3k, seed 1234; expected dense 1.0, uniform 0.5, MoA 1.0 at every length
                   (benchmarks/demo.json).
  longtext         perplexity of the last 128 tokens of the 4 largest stdlib modules at 1k/2k/4k.
  reference_model  dense line retrieval of the reference model at 1k-8k, 50 prompts per length
                   (benchmarks/reference_model.json).
  tiny             a random tiny model, every task family at 256/512 tokens (CI).
"""

from ml_collections import config_dict

from moa_jax.eval.command import eval_section
from moa_jax.models.loading import model_section

VARIANTS = ("default", "demo", "longtext", "reference_model", "tiny")
DEMO_PLAN = "runs/demo/compress/plan.json"  # written by `make demo`


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  c = config_dict.ConfigDict()
  c.model = model_section()  # '' path = the embedded reference model
  c.eval = eval_section(tasks=("lines",), lengths=(1024, 2048, 3072))
  if variant == "demo":
    c.eval.plans = f"moa={DEMO_PLAN}"
    c.eval.seed = 1234
  elif variant == "longtext":
    c.eval.tasks = ("longtext",)
    c.eval.lengths = (1024, 2048, 4096)
    c.eval.batch_size = 1
  elif variant == "reference_model":
    c.eval.methods = ("dense",)
    c.eval.lengths = (1024, 2048, 3072, 4096, 6144, 8192)
    c.eval.samples_per_depth = 5
    c.eval.max_new_tokens = 8
    c.eval.with_ce = False
    c.eval.batch_size = 10
  elif variant == "tiny":
    c.model.preset = "tiny"
    c.eval.tasks = ("passkey", "longtext")
    c.eval.lengths = (256, 512)
    c.eval.depths = (0.25, 0.75)
    c.eval.max_new_tokens = 6
    c.eval.sink = 16
    c.eval.longtext.num_documents = 2
    c.eval.longtext.target_tokens = 16
  c.lock()
  return c
