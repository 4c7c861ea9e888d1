"""CPU prefill of the reference model: the plain T x T reference attention vs query blocks.

    JAX_PLATFORMS=cpu PYTHONPATH=. python3 experiments/bench_cpu_attention.py \
        --out=benchmarks/cpu_attention.json

One forward pass (batch 1, float32, no cache) of the packaged reference model at each length,
with attention by `reference_attention` over the whole [T, T] map ("plain") and by
`blocked_attention` in blocks of 512 query rows as `DenseAttention` and `MoAAttention` run it
on the CPU ("blocked"); dense causal, and MoA-style windows of T / 4 with sink 64 on every head.
Times: compile (first call) and the median of `--reps` calls; `temp_mib` is XLA's temporary
buffer size of the compiled program; `max_abs_logit_diff` compares plain and blocked logits.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.attention.reference import reference_attention
from moa_jax.models.loading import load_checkpoint, reference_model_dir

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["2048", "4096"], "prompt lengths T")
flags.DEFINE_integer("reps", 3, "timed calls per variant (median)")
flags.DEFINE_string("out", "benchmarks/cpu_attention.json", "results file (JSON)")

SINK = 64


class PlainAttention:
  """`reference_attention` over the whole [T, T] map (windows None: dense causal)."""

  def __init__(self, windows=None):
    self.windows = windows

  def __call__(self, layer, q, k, v, q_pos, cache):
    del cache
    windows = None if self.windows is None else self.windows[layer]
    return reference_attention(q, k, v, q_pos, q_pos, windows=windows, sink=SINK), None


def measure(model, attention, tokens, positions, reps: int) -> tuple[dict, np.ndarray]:
  graphdef, state = nnx.split(model)
  forward = jax.jit(
    lambda state, tokens, positions: nnx.merge(graphdef, state)(
      tokens, positions, attention=attention
    )[0][:, -1]
  )  # last-token logits [B, V]
  compiled = forward.lower(state, tokens, positions).compile()
  memory = compiled.memory_analysis()
  start = time.perf_counter()
  logits = jax.block_until_ready(forward(state, tokens, positions))
  first = time.perf_counter() - start
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(forward(state, tokens, positions))
    times.append(time.perf_counter() - start)
  record = dict(
    first_call_s=first,
    median_s=statistics.median(times),
    times_s=times,
    temp_mib=None if memory is None else memory.temp_size_in_bytes / 2**20,
  )
  return record, np.asarray(logits)


def main(argv):
  del argv
  model, config = load_checkpoint(reference_model_dir(), dtype="float32")
  rng = np.random.default_rng(0)
  records = []
  for t in (int(x) for x in FLAGS.lengths):
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (1, t)), jnp.int32)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    windows = np.full((config.num_layers, config.num_heads), t // 4)
    variants = {
      "dense": (PlainAttention(), DenseAttention()),
      "windows_T/4": (PlainAttention(windows), MoAAttention(windows, sink=SINK, impl="reference")),
    }
    for name, (plain, blocked) in variants.items():
      plain_record, plain_logits = measure(model, plain, tokens, positions, FLAGS.reps)
      blocked_record, blocked_logits = measure(model, blocked, tokens, positions, FLAGS.reps)
      diff = float(np.abs(plain_logits - blocked_logits).max())
      records.append(
        dict(
          T=t,
          attention=name,
          plain=plain_record,
          blocked=blocked_record,
          speedup=plain_record["median_s"] / blocked_record["median_s"],
          max_abs_logit_diff=diff,
        )
      )
      print(
        f"T={t} {name:<12} plain {plain_record['median_s']:.2f} s "
        f"({plain_record['temp_mib']:.0f} MiB temp)  blocked {blocked_record['median_s']:.2f}"
        f" s ({blocked_record['temp_mib']:.0f} MiB temp)  max |logit diff| {diff:.1e}",
        flush=True,
      )
  result = dict(
    command="python3 experiments/bench_cpu_attention.py " + " ".join(sys.argv[1:]),
    machine=dict(
      platform=platform.platform(),
      cpus=os.cpu_count(),
      jax=jax.__version__,
      backend=jax.default_backend(),
    ),
    model="moa_jax/assets/reference_model (float32)",
    records=records,
  )
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
