"""Launch-setting sweeps of the MoA Pallas kernels on the GPU (for `bench_attention.py`).

Run on the GPU machine from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/gpu_check_kernels.py \\
        --out $OUT/gpu_check.json --sweep prefill,decode

The kernels' correctness, compiled, is checked by the test suite, not here:
`python3 -m pytest -m gpu tests/test_prefill_kernels.py tests/test_decode_gqa.py` on the GPU
(the default and other launch configurations on GPU-sized inputs, bf16/fp16/fp32, GQA ratios
1, 3, 4, 7 and 8, the Hopper kernel). A sweep reports a configuration that fails to launch.

Sweeps (`--sweep`, any of prefill, decode, overheads, hopper):
1. prefill at T=16k (or `--sweep_t`; dense and attention density 0.125 / 0.25 / 0.5 with uniform
   windows, 0.125 / 0.25 with mixed windows, or `--sweep_densities` / `--nosweep_dense`), 8 and
   32 KV heads, every configuration of PREFILL_CONFIGS, timed like the benchmark next to the
   dense cuDNN baseline of the same run;
2. decode on the cells of the benchmark grid with the smallest caches (DECODE_CELLS);
3. overheads: where the fixed time of a small decode call goes;
4. hopper: the Mosaic GPU prefill kernel's (block_q, block_kv, num_stages) of HOPPER_CONFIGS on
   the prefill sweep's lengths, KV heads and sparse plans, against dense cuDNN of the same run.
The best configurations are written out for `bench_attention.py --config`. `--budget_s` stops a
sweep once the run has taken that long.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moa_jax.attention import benchmark as bench
from moa_jax.attention import cache as cache_lib
from moa_jax.attention import decode as decode_lib
from moa_jax.attention.prefill_gpu import sparse_prefill_gpu
from moa_jax.attention.prefill_hopper import sparse_prefill_hopper
from moa_jax.plans.rules import attended_pairs

PREFILL_CONFIGS = [  # block_rows, block_k, num_warps, num_stages, single_loop, edge_block_k
  (128, 128, 8, 3, False, 128),
  (128, 128, 8, 3, False, 64),
  (128, 128, 8, 3, False, 32),
]
DECODE_CONFIGS = [  # block_k, num_warps, num_stages, target_programs, min_split_blocks
  (64, 4, 2, 528, 16),
  (64, 4, 3, 528, 16),
  (64, 4, 4, 528, 16),
  (128, 4, 3, 528, 16),
  (64, 4, 2, 528, 4),
  (64, 4, 2, 528, 64),
  (64, 4, 3, 1056, 8),
  (128, 8, 2, 264, 16),
]
DECODE_CELLS = [  # context, batch, KV density, windows
  (8192, 16, 0.125, "uniform"),
  (8192, 16, 0.125, "mixed"),
  (8192, 16, 0.25, "uniform"),
  (8192, 64, 0.125, "mixed"),
  (32768, 16, 0.125, "uniform"),
  (32768, 16, 0.25, "uniform"),
  (32768, 64, 0.125, "mixed"),
  (32768, 16, 0.5, "uniform"),
]
HOPPER_CONFIGS = [  # block_q (rows per consumer warpgroup), block_kv, num_stages
  (64, 128, 2),
  (64, 64, 2),
  (64, 64, 3),
  (64, 64, 4),
  (64, 128, 3),
  (64, 192, 2),
  (64, 256, 2),
  (128, 64, 2),
  (128, 64, 3),
  (128, 128, 2),
]
SWEEP_T = (16384,)
SWEEP_DENSITIES = (0.125, 0.25, 0.5)  # uniform windows at each, mixed below 0.5
SWEEP_DENSE = True  # also time the dense plan


def prefill_config(c: tuple) -> dict:
  """(block_rows, block_k, num_warps, num_stages, single_loop[, edge_block_k]) -> kwargs."""
  rows, block_k, warps, stages, single = c[:5]
  return dict(
    block_rows=rows,
    block_k=block_k,
    num_warps=warps,
    num_stages=stages,
    single_loop=bool(single),
    edge_block_k=c[5] if len(c) > 5 else block_k,
  )


def sweep_prefill(results, deadline: float) -> dict:
  best = {}
  key = jax.random.key(2)
  for t, kv in ((t, kv) for t in SWEEP_T for kv in (8, 32)):
    qs = [bench.normal(key, (1, t, bench.HEADS, bench.HEAD_DIM), i) for i in range(4)]
    k = bench.normal(key, (1, t, kv, bench.HEAD_DIM), 10)
    v = bench.normal(key, (1, t, kv, bench.HEAD_DIM), 11)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    dense = lambda k, v, q: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
    cudnn = bench.time_calls(dense, (k, v), qs)
    print(f"sweep prefill T={t} kv={kv} cudnn dense {cudnn * 1e3:.3f} ms", flush=True)
    plans = {
      **({"dense": np.full(kv, t)} if SWEEP_DENSE else {}),
      **{
        f"{kind[0]}{d}": bench.plan_windows(kind, d, t, kv)
        for d in SWEEP_DENSITIES
        for kind in ("uniform", "mixed")
        if kind == "uniform" or d < 0.5
      },
    }
    for cfg in map(prefill_config, PREFILL_CONFIGS):
      if time.time() > deadline:
        print("sweep prefill: out of time budget", flush=True)
        break
      if cfg["block_rows"] < 16 * (bench.HEADS // kv):
        continue
      run = bench.runner(
        lambda k, v, pos, win, q, cfg=cfg: sparse_prefill_gpu(q, k, v, pos, win, sink=64, **cfg)
      )
      ratios = {}
      try:
        for name, win in plans.items():
          seconds = bench.time_calls(run, (k, v, pos, jnp.asarray(win, jnp.int32)), qs)
          pairs = float(attended_pairs(win, bench.SINK, t).mean())
          ratios[name] = (seconds * 1e3, pairs / (t * (t + 1) / 2) * cudnn / seconds)
      except Exception as error:  # e.g. a launch configuration out of shared memory
        print(f"sweep prefill T={t} kv={kv} {cfg} FAILED: {str(error)[:300]}", flush=True)
        continue
      results.append(
        dict(
          check="sweep_prefill",
          T=t,
          kv_heads=kv,
          config=cfg,
          ms_cudnn_dense=cudnn * 1e3,
          **{f"ms_{n}": ms for n, (ms, _) in ratios.items()},
          **{f"x_cudnn_{n}": x for n, (_, x) in ratios.items()},
        )
      )
      print(
        f"sweep prefill T={t} kv={kv} {cfg} "
        + " ".join(f"{n} {ms:.3f} ms ({x:.2f}x)" for n, (ms, x) in ratios.items()),
        flush=True,
      )
      score = -sum(x for _, x in ratios.values())
      if (t, kv) not in best or score < best[t, kv][0]:
        best[t, kv] = (score, cfg)
  return {f"T={t} kv={kv}": cfg for (t, kv), (_, cfg) in best.items()}


def sweep_hopper(results, deadline: float) -> dict:
  """HOPPER_CONFIGS of `sparse_prefill_hopper` on the sparse plans of the prefill sweep (static
  windows: one compile per plan); best = largest sum of effective TFLOP/s / cuDNN dense's."""
  best = {}
  key = jax.random.key(5)
  for t, kv in ((t, kv) for t in SWEEP_T for kv in (8, 32)):
    qs = [bench.normal(key, (1, t, bench.HEADS, bench.HEAD_DIM), i) for i in range(4)]
    k = bench.normal(key, (1, t, kv, bench.HEAD_DIM), 10)
    v = bench.normal(key, (1, t, kv, bench.HEAD_DIM), 11)
    dense = lambda k, v, q: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    )
    cudnn = bench.time_calls(dense, (k, v), qs)
    print(f"sweep hopper T={t} kv={kv} cudnn dense {cudnn * 1e3:.3f} ms", flush=True)
    plans = {
      f"{kind[0]}{d}": bench.plan_windows(kind, d, t, kv)
      for d in SWEEP_DENSITIES
      for kind in ("uniform", "mixed")
      if kind == "uniform" or d < 0.25
    }
    for block_q, block_kv, stages in HOPPER_CONFIGS:
      if time.time() > deadline:
        print("sweep hopper: out of time budget", flush=True)
        break
      cfg = dict(block_q=block_q, block_kv=block_kv, num_stages=stages)
      ratios = {}
      try:
        for name, win in plans.items():
          fn = lambda k, v, q, w=tuple(int(x) for x in win), cfg=cfg: sparse_prefill_hopper(
            q, k, v, w, sink=bench.SINK, **cfg
          )
          seconds = bench.time_calls(fn, (k, v), qs)
          pairs = float(attended_pairs(win, bench.SINK, t).mean())
          ratios[name] = (seconds * 1e3, pairs / (t * (t + 1) / 2) * cudnn / seconds)
      except Exception as error:  # e.g. shared memory exceeded
        print(f"sweep hopper T={t} kv={kv} {cfg} FAILED: {str(error)[:300]}", flush=True)
        continue
      results.append(
        dict(
          check="sweep_hopper",
          T=t,
          kv_heads=kv,
          config=cfg,
          ms_cudnn_dense=cudnn * 1e3,
          **{f"ms_{n}": ms for n, (ms, _) in ratios.items()},
          **{f"x_cudnn_{n}": x for n, (_, x) in ratios.items()},
        )
      )
      print(
        f"sweep hopper T={t} kv={kv} {cfg} "
        + " ".join(f"{n} {ms:.3f} ms ({x:.2f}x)" for n, (ms, x) in ratios.items()),
        flush=True,
      )
      score = sum(x for _, x in ratios.values())
      if (t, kv) not in best or score > best[t, kv][0]:
        best[t, kv] = (score, cfg)
    del qs, k, v
  return {f"T={t} kv={kv}": cfg for (t, kv), (_, cfg) in best.items()}


def sweep_decode(results, deadline: float) -> dict:
  """Decode configurations on DECODE_CELLS; best = smallest sum of time / dense cuDNN time."""
  key = jax.random.key(3)
  kv, group = 8, bench.HEADS // 8
  dense_ms, score = {}, {}
  for context, batch, density, kind in DECODE_CELLS:
    if time.time() > deadline:
      print("sweep decode: out of time budget", flush=True)
      break
    q_pos = jnp.full((batch,), context - 1, jnp.int32)
    qs = [bench.normal(key, (batch, bench.HEADS, bench.HEAD_DIM), 50 + i) for i in range(8)]
    if (context, batch) not in dense_ms:
      dk = bench.normal(key, (batch, context, kv, bench.HEAD_DIM), 100)
      dv = bench.normal(key, (batch, context, kv, bench.HEAD_DIM), 101)
      dense = lambda dk, dv, q: jax.nn.dot_product_attention(
        q[:, None], dk, dv, implementation="cudnn"
      )[:, 0]
      dense_ms[context, batch] = bench.time_calls(dense, (dk, dv), qs, chain=True) * 1e3
      del dk, dv
    win = bench.decode_windows(kind, density, context, kv)
    layout = cache_lib.make_layout(np.repeat(win, group), kv, context, sink=64)
    cache = bench.full_cache(layout, batch, context, key)
    rho = layout.slots() / (kv * context)
    line = []
    for block_k, warps, stages, programs, min_split in DECODE_CONFIGS:
      cfg = dict(
        block_k=block_k,
        num_warps=warps,
        num_stages=stages,
        target_programs=programs,
        min_split_blocks=min_split,
      )
      fn = lambda q_pos, cache, q, cfg=cfg: decode_lib.decode_gpu(q, q_pos, cache, **cfg)
      try:
        ms = bench.time_calls(fn, (q_pos, cache), qs, chain=True) * 1e3
      except Exception as error:
        print(f"sweep decode {cfg} FAILED: {str(error)[:300]}", flush=True)
        continue
      ratio = ms / dense_ms[context, batch]
      results.append(
        dict(
          check="sweep_decode",
          context=context,
          batch=batch,
          kv_density=rho,
          windows=kind,
          config=cfg,
          ms=ms,
          ms_dense_cudnn=dense_ms[context, batch],
          ratio=ratio,
          target=1.3 * rho,
        )
      )
      key_cfg = json.dumps(cfg, sort_keys=True)
      score[key_cfg] = score.get(key_cfg, 0.0) + ratio / rho
      line.append(f"{ms:.3f}")
    print(
      f"sweep decode ctx={context} B={batch} rho={rho:.3f} {kind:<7} dense "
      f"{dense_ms[context, batch]:.3f} ms target {1.3 * rho * dense_ms[context, batch]:.3f}"
      f" | " + " ".join(line),
      flush=True,
    )
  return json.loads(min(score, key=score.get)) if score else {}


def decode_overheads(results):
  """Where the fixed time of a small decode call goes, at batch 16, 8 KV heads, chained calls:
  the timing harness alone, dense cuDNN decode over as many K/V bytes as our smallest cell, our
  kernel over a 64-slot cache, and our kernel on the 8k x 16, rho = 0.125 cell, chained and
  independent, over program counts and launch settings."""
  key = jax.random.key(4)
  batch, kv, context = 16, 8, 8192
  group = bench.HEADS // kv
  qs = [bench.normal(key, (batch, bench.HEADS, bench.HEAD_DIM), 70 + i) for i in range(8)]
  q_pos = jnp.full((batch,), context - 1, jnp.int32)

  def report(name, seconds, **extra):
    results.append(dict(check="decode_overheads", name=name, ms=seconds * 1e3, **extra))
    print(f"overheads {name:<58} {seconds * 1e6:7.1f} us", flush=True)

  one = jnp.ones((), bench.DTYPE)
  report(
    "harness: q + 1 (one fusion per call)",
    bench.time_calls(lambda one, q: q + one, (one,), qs, chain=True),
  )
  win = bench.decode_windows("uniform", 0.125, context, kv)
  layout = cache_lib.make_layout(np.repeat(win, group), kv, context, sink=64)
  slots = layout.groups[0].capacity
  dk = bench.normal(key, (batch, slots, kv, bench.HEAD_DIM), 1)
  dense = lambda dk, dv, q: jax.nn.dot_product_attention(
    q[:, None], dk, dv, implementation="cudnn"
  )[:, 0]
  report(
    f"cuDNN dense decode over {slots} keys (the same bytes)",
    bench.time_calls(dense, (dk, dk), qs, chain=True),
  )
  tiny = cache_lib.make_layout(np.full(bench.HEADS, 1), kv, context, sink=63)
  tiny_cache = bench.full_cache(tiny, batch, context, key)
  ours = lambda cfg: (lambda q_pos, cache, q: decode_lib.decode_gpu(q, q_pos, cache, **cfg))
  report(
    f"ours over a {tiny.groups[0].capacity}-slot cache",
    bench.time_calls(ours({}), (q_pos, tiny_cache), qs, chain=True),
  )
  cache = bench.full_cache(layout, batch, context, key)
  for block_k, warps, stages, programs, min_split in [
    (64, 4, 3, 528, 16),
    (64, 4, 3, 264, 1),
    (64, 4, 3, 396, 1),
    (64, 4, 3, 792, 1),
    (64, 4, 3, 1584, 1),
    (64, 2, 3, 396, 1),
    (64, 2, 3, 792, 1),
    (32, 4, 4, 792, 1),
    (32, 2, 4, 1584, 1),
    (128, 4, 2, 132, 1),
    (64, 4, 3, 128, 64),
  ]:
    cfg = dict(
      block_k=block_k,
      num_warps=warps,
      num_stages=stages,
      target_programs=programs,
      min_split_blocks=min_split,
    )
    for chain in (True, False):
      try:
        seconds = bench.time_calls(ours(cfg), (q_pos, cache), qs, chain=chain)
      except Exception as error:
        print(f"overheads {cfg} FAILED: {str(error)[:300]}", flush=True)
        break
      report(
        f"ours {slots} slots {'chained' if chain else 'independent'} "
        f"{block_k},{warps},{stages},{programs},{min_split}",
        seconds,
        config=cfg,
        chain=chain,
      )


FLAGS = flags.FLAGS
flags.DEFINE_string("out", "gpu_check.json", "results file (JSON)")
flags.DEFINE_list(
  "sweep", ["prefill", "decode"], "timings to run: prefill, decode, overheads, hopper"
)
flags.DEFINE_string(
  "prefill_configs",
  None,
  "'block_rows,block_k,warps,stages,single_loop[,edge_block_k];...' (default: PREFILL_CONFIGS)",
)
flags.DEFINE_string(
  "decode_configs",
  None,
  "'block_k,warps,stages,target_programs,min_split_blocks;...' (default: DECODE_CONFIGS)",
)
flags.DEFINE_string(
  "hopper_configs", None, "'block_q,block_kv,num_stages;...' (default: HOPPER_CONFIGS)"
)
flags.DEFINE_float("budget_s", 1e9, "stop a sweep once the run has taken this long (seconds)")
flags.DEFINE_list("sweep_t", ["16384"], "prefill sweep lengths")
flags.DEFINE_list(
  "sweep_densities", ["0.125", "0.25", "0.5"], "attention densities of the prefill sweep"
)
flags.DEFINE_bool("sweep_dense", True, "also time the dense plan in the prefill sweep")


def configs_arg(text: str) -> list[tuple]:
  """'a,b,c;d,e,f' -> [(a, b, c), (d, e, f)] of ints."""
  return [tuple(int(x) for x in item.split(",")) for item in text.split(";")]


def main(argv):
  del argv
  global PREFILL_CONFIGS, DECODE_CONFIGS, HOPPER_CONFIGS, SWEEP_T, SWEEP_DENSITIES, SWEEP_DENSE
  SWEEP_T = tuple(int(x) for x in FLAGS.sweep_t)
  SWEEP_DENSITIES = tuple(float(x) for x in FLAGS.sweep_densities)
  SWEEP_DENSE = FLAGS.sweep_dense
  if FLAGS.prefill_configs:
    PREFILL_CONFIGS = configs_arg(FLAGS.prefill_configs)
  if FLAGS.decode_configs:
    DECODE_CONFIGS = configs_arg(FLAGS.decode_configs)
  if FLAGS.hopper_configs:
    HOPPER_CONFIGS = configs_arg(FLAGS.hopper_configs)
  sweeps = set(FLAGS.sweep)
  deadline = time.time() + FLAGS.budget_s
  print(jax.devices(), jax.__version__, flush=True)
  results = []
  best = dict(prefill={}, decode={}, hopper={})
  if "overheads" in sweeps:
    decode_overheads(results)
  if "decode" in sweeps:
    print("decode configs:", DECODE_CONFIGS, flush=True)
    best["decode"] = sweep_decode(results, deadline)
  if "prefill" in sweeps:
    best["prefill"] = sweep_prefill(results, deadline)
  if "hopper" in sweeps:
    best["hopper"] = sweep_hopper(results, deadline)
  with open(FLAGS.out, "w") as f:
    json.dump(
      dict(
        command="python3 experiments/gpu_check_kernels.py " + " ".join(sys.argv[1:]),
        results=results,
        best=best,
      ),
      f,
      indent=1,
    )
  print("best configurations:", best)


if __name__ == "__main__":
  app.run(main)
