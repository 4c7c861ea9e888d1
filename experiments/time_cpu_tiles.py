"""Seconds of the demo's heaviest CPU pieces at T = 3072 by tile size (the reference model).

  python experiments/time_cpu_tiles.py   # -> benchmarks/cpu_tiles.json

Times, on one calibration-sized sample of the embedded reference model (6 layers, 8 query and
4 KV heads of 64), the second call (compiled) of:
  * the profile's backward pass (`profiler.output_grads`) with XLA's dot_product_attention
    ('xla') and with `probes.tiled_attention` ('tiled', query tiles of 256);
  * the profile's tiled influence pass of one layer (`block_influence_tiled`) at tile 512, 256;
  * `blocked_attention` (the CPU attention of prefill and of a dense cache) of 5 rows at
    block_q 512, 256, self-attention with MoA windows and over a dense cache.
The inputs are random (the time does not depend on the values); wall and process CPU seconds.
"""

import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moa_jax.attention.reference import blocked_attention
from moa_jax.cli import load_config
from moa_jax.models.loading import load_model
from moa_jax.profile.influence import block_influence_tiled
from moa_jax.profile.profiler import output_grads

OUT = flags.DEFINE_string("out", "benchmarks/cpu_tiles.json", "results file (overwritten)")
LENGTH = 3072


def _seconds(fn) -> dict:
  jax.block_until_ready(fn())  # compile
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return {
    "wall_s": round(time.perf_counter() - wall, 2),
    "cpu_s": round(time.process_time() - cpu, 2),
  }


def main(argv):
  del argv
  model, _, model_id = load_model(load_config("configs/demo.py").model)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  c, t = model.config, LENGTH
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  tokens = jnp.asarray(rng.integers(3, c.vocab_size, (1, t)), jnp.int32)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  hidden_index = jnp.arange(t - 17, t - 1, dtype=jnp.int32)[None]
  weight = jnp.full((1, 16), 1 / 16, jnp.float32)
  results = {}
  for impl in ("xla", "tiled"):
    results[f"output_grads impl={impl}"] = _seconds(
      lambda impl=impl: output_grads(
        graphdef,
        state,
        tokens,
        positions,
        hidden_index,
        weight,
        implementation=impl,
        padded=False,
        loss="log_odds",
      )[0]
    )
  q, d_out = normal(1, t, c.num_heads, c.head_dim), 1e-3 * normal(1, t, c.num_heads, c.head_dim)
  k, v = normal(1, t, c.num_kv_heads, c.head_dim), normal(1, t, c.num_kv_heads, c.head_dim)
  lengths = jnp.full((1,), t, jnp.int32)
  for tile in (512, 256):
    results[f"block_influence_tiled (one layer) tile={tile}"] = _seconds(
      lambda tile=tile: block_influence_tiled(
        q, k, v, d_out, lengths, block=64, tile=tile, magnitude="blocks"
      )
    )
  b, s = 5, t + 64
  q5 = normal(b, t, c.num_heads, c.head_dim)
  k5, v5 = normal(b, s, c.num_kv_heads, c.head_dim), normal(b, s, c.num_kv_heads, c.head_dim)
  q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  k_pos = jnp.broadcast_to(jnp.where(jnp.arange(s) < t, jnp.arange(s), -1)[None], (b, s))
  windows = jnp.asarray(rng.integers(500, t, c.num_heads), jnp.int32)
  for block_q in (512, 256):
    self_fn = jax.jit(
      lambda q, k, v, bq=block_q: blocked_attention(
        q, k[:, :t], v[:, :t], q_pos, windows=windows, sink=64, block_q=bq
      )
    )
    cache_fn = jax.jit(
      lambda q, k, v, bq=block_q: blocked_attention(q, k, v, q_pos, k_pos, block_q=bq)
    )
    results[f"blocked_attention (one layer, 5 rows, MoA windows) block_q={block_q}"] = _seconds(
      lambda f=self_fn: f(q5, k5, v5)
    )
    results[f"blocked_attention (one layer, 5 rows, dense cache) block_q={block_q}"] = _seconds(
      lambda f=cache_fn: f(q5, k5, v5)
    )
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
  ).stdout.strip()
  out = {
    "command": "python experiments/time_cpu_tiles.py",
    "what": __doc__.split("\n")[0],
    "model": model_id,
    "length": t,
    "commit": commit,
    "machine": f"{os.cpu_count()} CPU cores, shared",
    "load_average_1min_end": round(os.getloadavg()[0], 1),
    "seconds": results,
  }
  with open(OUT.value, "w") as f:
    f.write(json.dumps(out, indent=1) + "\n")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
