"""Memory plans (dry runs, no weights) for Llama-3-8B and -70B on H200 meshes -> one JSON file.

Command (CPU; compiles every case's programs for 8 fake CPU devices, ~10 minutes on 2 cores):
  python experiments/plan_memory.py --out benchmarks/memory_plan.json
One case per `--cases` entry: preset:task:length:mesh, e.g. llama-3-70b:generate:16384:1x1x8.
Each case is `python -m moa_jax plan-memory --config=configs/memory.py` with those overrides;
cases that do not fit are kept in the file with fits = false. The cases' stand-in plan gives
every head one window; `balance` adds, without compiling, the cache fill of plans with two
rules per layer (a random half of each layer's KV heads at N/8, the rest at 7N/8, KV density
about 0.5) split over tensor axes of 2, 4 and 8, heads dealt out or kept in place. Prints
tables last.
"""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
from absl import app, flags

from moa_jax.attention.moa import MoAAttention
from moa_jax.attention.sharded import ShardedMoAAttention
from moa_jax.cli import load_config
from moa_jax.memory import GB, plan_memory
from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.workdir import atomic_write_text

CASES = (
  "llama-3-8b:generate:16384:1x1x1",
  "llama-3-8b:profile:8192:1x1x1",
  "llama-3-8b:generate:16384:1x1x8",
  "llama-3-70b:generate:16384:1x1x8",
  "llama-3-70b:profile:8192:1x1x8",
  "llama-3-70b:generate:16384:1x2x4",
  "llama-3-70b:generate:16384:1x1x1",
)
FLAGS = flags.FLAGS
flags.DEFINE_string("out", "benchmarks/memory_plan.json", "results file")
flags.DEFINE_list("cases", list(CASES), "preset:task:length:DATAxFSDPxTENSOR entries")
flags.DEFINE_float("density", 0.5, "KV density of the uniform stand-in plan (generate)")


def overrides(case: str) -> list[str]:
  preset, task, length, mesh = case.split(":")
  shape = tuple(int(s) for s in mesh.split("x"))
  return [
    f"model.preset={preset}",
    f"task={task}",
    f"length={length}",
    f"mesh.shape={shape}".replace(" ", ""),
    f"density={FLAGS.density}",
  ]


def balance(preset: str, length: int, tensor: int, seed: int = 0) -> dict:
  """The cache fill of a two-rule plan split over `tensor` devices (no compile, no memory)."""
  model = LlamaConfig.preset(preset)
  wide = np.random.default_rng(seed).random((model.num_layers, model.num_kv_heads)) < 0.5
  windows = np.where(wide, 7 * length // 8, length // 8) - 64
  mesh = jax.sharding.AbstractMesh((1, 1, tensor), sharding.AXES)
  report = ShardedMoAAttention(MoAAttention(windows, sink=64), mesh).balance_report(model, length)
  return {"preset": preset, "length": length, "tensor": tensor, **report}


def main(_):
  sizes = [math.prod(int(s) for s in case.split(":")[3].split("x")) for case in FLAGS.cases]
  jax.config.update("jax_num_cpu_devices", max(sizes))  # before JAX starts its CPU backend
  results = {
    "cases": [],
    "balance": [
      balance(preset, 16384, tensor)
      for preset in ("llama-3-8b", "llama-3-70b")
      for tensor in (2, 4, 8)
    ],
  }
  for case in FLAGS.cases:
    start = time.perf_counter()
    args = overrides(case)
    plan = plan_memory(load_config("configs/memory.py:llama-3-8b", args))
    record = {
      "case": case,
      "command": "python -m moa_jax plan-memory "
      "--config=configs/memory.py " + " ".join(f"--config.{a}" for a in args),
      "seconds": round(time.perf_counter() - start, 1),
      **plan.to_json(),
    }
    results["cases"].append(record)
    print(plan.table(), flush=True)
    atomic_write_text(FLAGS.out, json.dumps(results, indent=1) + "\n")
  print(
    f"\n{'case':36s} {'weights':>8s} {'cache':>8s} {'activ.':>8s} {'peak':>8s}  fits  (GB "
    "per device)"
  )
  for r in results["cases"]:
    print(
      f"{r['case']:36s} {r['weights'] / GB:8.2f} {r['cache'] / GB:8.2f} "
      f"{r['activations'] / GB:8.2f} {r['peak'] / GB:8.2f}  {r['fits']}"
    )
  print(f"\n{'two-rule plan at 16k':24s} {'tensor':>6s} {'fill dealt':>10s} {'fill kept':>10s}")
  for r in results["balance"]:
    print(
      f"{r['preset']:24s} {r['tensor']:6d} {r['balanced']['fill']:10.3f} "
      f"{r['contiguous']['fill']:10.3f}"
    )


if __name__ == "__main__":
  app.run(main)
