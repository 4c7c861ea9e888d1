"""`make demo`: MoA on the embedded reference model, then dense vs uniform vs MoA.

  python -m moa_jax demo --config=configs/demo.py --workdir=runs/demo   # minutes on 2 CPU cores
  python -m moa_jax demo --config=configs/demo.py:agnostic --workdir=runs/demo_agnostic
  python -m moa_jax demo --config=configs/demo.py:tiny --workdir=/tmp/demo  # random tiny model (CI)
  python -m moa_jax demo --config=configs/demo.py:smollm2 --workdir=runs/demo_smollm2  # real model

Runs configs/compress.py's pipeline (calibration -> profile -> optimize at KV density 0.5 ->
choose), then evaluates LongEval line retrieval at `eval.lengths` with every method decoding on
its own cache. Writes DIR/results.json, DIR/report.md and plots; prints the accuracy table.
Expected (benchmarks/demo.json): dense 1.0 at 1k/2k/3k; MoA 1.0/1.0/1.0; uniform 0.5.
':agnostic' leaves line retrieval out of the calibration data (benchmarks/demo_agnostic.json:
MoA 1.0/0.9/0.9).
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "reference"
  c = common.compress_config(variant, lock=False)
  c.eval = config_dict.ConfigDict()
  c.eval.tasks = ("lines",)
  c.eval.lengths = (1024, 2048, 3072)
  c.eval.samples_per_depth = 1  # x 10 depth deciles per length
  c.eval.seed = 1234
  c.eval.batch_size = 5  # 10 prompts per cell: two full batches (4 ran 12 rows)
  if variant == "tiny":
    c.eval.lengths = (256, 512)
    c.eval.samples_per_depth = 1
  elif variant == "smollm2":  # passkey: the task this small model retrieves at 1k-2k
    c.eval.tasks = ("passkey",)
    c.eval.lengths = (1024, 2048)
  c.lock()
  return c
