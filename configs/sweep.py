"""Sweeps of the KV-density budget: every point a compress + eval run, the shared stages once.

On this machine (the embedded reference model, four budgets, one job at a time):
  python -m moa_jax sweep --config=configs/sweep.py --workdir=runs/sweep
On a SLURM login node (a HF checkpoint on GPUs; the shared profile job first, then the points
as a job array depending on it):
  python -m moa_jax sweep --config=configs/sweep.py:paper --config.launcher=slurm \
      --config.model.path=lmsys/vicuna-7b-v1.5-16k --config.slurm.partition=gpu \
      --workdir=/shared/runs/vicuna7b_sweep
A random tiny model, three budgets, fast on CPU (CI; add --config.launcher=slurm for SLURM):
  python -m moa_jax sweep --config=configs/sweep.py:tiny --workdir=/tmp/sweep_tiny

The same command again runs only what is not finished. Results: DIR/sweep.md (table),
DIR/sweep.png (accuracy / perplexity against KV density: MoA and uniform, dense above them),
DIR/points/<name>/ (each point's plan.json, report.md and eval/); the layout is in
moa_jax/sweep/command.py, the guide in docs/sweeps.md.

Fields: the compress sections (configs/common.py), `eval` (moa_jax.eval.command.eval_section;
each point evaluates dense, uniform at its budget and its plan 'moa'), `sweep`
(moa_jax.sweep.hyper), `launcher` ('local' or 'slurm'), `local`, `slurm`
(moa_jax.sweep.launchers) and `compilation_cache` (a folder for XLA compilations shared by
the jobs).
"""

from ml_collections import config_dict

from configs import common
from moa_jax.eval.command import eval_section
from moa_jax.sweep import hyper
from moa_jax.sweep.launchers import local_section, slurm_section

VARIANTS = ("reference", "tiny", "paper")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "reference"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  c = common.compress_config(variant, lock=False)
  c.eval = eval_section(tasks=("lines",), lengths=(1024, 2048, 3072))
  c.sweep = hyper.sweep("config.optimize.density", (0.25, 0.375, 0.5, 0.75))
  c.launcher = "local"  # or 'slurm' (submitit; sbatch must reach the cluster)
  c.local = local_section()
  c.slurm = slurm_section()
  c.compilation_cache = "jax_cache"  # XLA's cache shared by the jobs ('' off; relative to DIR)
  if variant == "tiny":
    c.eval.tasks = ("passkey", "longtext")
    c.eval.lengths = (256,)
    c.eval.depths = (0.5,)
    c.eval.max_new_tokens = 6
    c.eval.longtext.num_documents = 1
    c.eval.longtext.target_tokens = 16
    c.sweep = hyper.sweep("config.optimize.density", (0.5, 0.625, 0.75))  # 0.5: smallest feasible
    c.local.workers = 2
    c.slurm.timeout_min = 10
    c.slurm.mem_gb = 3.0
    c.slurm.cpus_per_job = 1
    c.slurm.gpus_per_job = 0
  elif variant == "paper":
    c.model.path = config_dict.placeholder(str)  # --config.model.path=<checkpoint>
    c.eval.tasks = ("lines", "passkey")
    c.eval.lengths = (4096, 8192, 16384)
  c.lock()
  return c
