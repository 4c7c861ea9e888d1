"""Check the MoA Pallas Triton kernels on the GPU against a float32 reference, then tune them.

Run on the GPU machine from the repository root:

    PYTHONUNBUFFERED=1 python3 experiments/gpu_check_kernels.py --out $OUT/gpu_check.json

1. Prefill: fresh random inputs (left padding; unpadded cases also through the Mosaic GPU
   kernel, T not a multiple of the blocks, GQA 1/4/8,
   D 64/128, per-head windows including 1 and >= T), every launch configuration that is timed
   later, bf16/fp16/fp32, against `reference_attention` on float32 copies of the inputs with
   HIGHEST precision: relative Frobenius error and NaN count.
2. Decode: a prompt written into the MoA cache (longer than some heads' caches), then decode
   steps, each against the reference over the whole history.
3. Launch-configuration sweeps (`--sweep`): prefill at T=16k (or `--sweep-t`; dense and
   attention density 0.125 / 0.25 / 0.5 with uniform windows, 0.125 / 0.25 with mixed windows, or
   `--sweep-densities` / `--sweep-no-dense`), decode on the cells of
   the issue-4 grid with the smallest caches, both timed like the benchmark next to the dense
   cuDNN baseline of the same run; the best
   configurations are written out for `bench_attention.py --config`. `--budget-s` stops a
   sweep (not the checks) once the run has taken that long.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_attention as bench
from moa_jax.attention import cache as cache_lib
from moa_jax.attention import decode as decode_lib
from moa_jax.attention.prefill_gpu import sparse_prefill_gpu
from moa_jax.attention.prefill_hopper import sparse_prefill_hopper
from moa_jax.attention.reference import reference_attention

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}  # relative Frobenius
PREFILL_CONFIGS = [  # block_rows, block_k, num_warps, num_stages, single_loop, edge_block_k
    (128, 128, 8, 3, False, 128), (128, 128, 8, 3, False, 64), (128, 128, 8, 3, False, 32)]
DECODE_CONFIGS = [  # block_k, num_warps, num_stages, target_programs, min_split_blocks
    (64, 4, 2, 528, 16), (64, 4, 3, 528, 16), (64, 4, 4, 528, 16), (128, 4, 3, 528, 16),
    (64, 4, 2, 528, 4), (64, 4, 2, 528, 64), (64, 4, 3, 1056, 8), (128, 8, 2, 264, 16)]
DECODE_CELLS = [  # context, batch, KV density, windows
    (8192, 16, 0.125, "uniform"), (8192, 16, 0.125, "mixed"), (8192, 16, 0.25, "uniform"),
    (8192, 64, 0.125, "mixed"), (32768, 16, 0.125, "uniform"), (32768, 16, 0.25, "uniform"),
    (32768, 64, 0.125, "mixed"), (32768, 16, 0.5, "uniform")]


def rel_error(out, ref) -> float:
  out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check_prefill(rng, results):
  cases = [  # B, T, N, K, H, dtype, left padding per row
      (2, 1000, 32, 8, 128, jnp.bfloat16, [0, 301]),
      (2, 1500, 16, 16, 64, jnp.float16, [0, 777]),
      (1, 1000, 8, 1, 128, jnp.float32, [100]),
      (1, 2047, 32, 4, 128, jnp.bfloat16, [0]),
      (1, 1777, 16, 16, 128, jnp.bfloat16, [45]),
      (2, 1000, 32, 8, 128, jnp.bfloat16, [0, 0]),  # unpadded: also the Mosaic GPU kernel
      (1, 1500, 16, 16, 64, jnp.float16, [0]),
  ]
  configs = [prefill_config(c) for c in PREFILL_CONFIGS]
  for b, t, n, kv, h, dtype, pads in cases:
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), dtype)
               for heads in (n, kv, kv))
    pos = jnp.asarray(np.arange(t)[None] - np.asarray(pads)[:, None], jnp.int32)
    win = rng.integers(1, t, n)
    win[0], win[-1] = 1, t + 5
    ref = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), pos, pos,
                              windows=win, sink=64)
    for cfg in configs if dtype != jnp.float32 else [{}]:
      if cfg and cfg["block_rows"] < 16 * (n // kv):
        continue
      try:
        out = sparse_prefill_gpu(q, k, v, pos, jnp.asarray(win, jnp.int32), sink=64, **cfg)
      except Exception as error:
        print(f"prefill {cfg} FAILED: {str(error)[:300]}", flush=True)
        results.append(dict(check="prefill", config=cfg, error=str(error)[:1000], ok=False))
        continue
      err, nans = rel_error(out, ref), int(jnp.isnan(out).sum())
      ok = err < TOLERANCE[dtype] and nans == 0
      results.append(dict(check="prefill", B=b, T=t, N=n, K=kv, H=h, dtype=dtype.__name__,
                          config=cfg, rel_error=err, nans=nans, ok=ok))
      print(f"prefill B={b} T={t} N={n} K={kv} H={h} {dtype.__name__:<8} {cfg} "
            f"rel_err={err:.2e} nans={nans} {'OK' if ok else 'FAIL'}", flush=True)
    if dtype != jnp.float32 and not any(pads) and h % 64 == 0:
      out = sparse_prefill_hopper(q, k, v, tuple(int(w) for w in win), sink=64)
      err, nans = rel_error(out, ref), int(jnp.isnan(out).sum())
      ok = err < TOLERANCE[dtype] and nans == 0
      results.append(dict(check="prefill_mosaic_gpu", B=b, T=t, N=n, K=kv, H=h,
                          dtype=dtype.__name__, rel_error=err, nans=nans, ok=ok))
      print(f"prefill B={b} T={t} N={n} K={kv} H={h} {dtype.__name__:<8} Mosaic GPU "
            f"rel_err={err:.2e} nans={nans} {'OK' if ok else 'FAIL'}", flush=True)


def check_decode(rng, results):
  configs = [dict(block_k=k, num_warps=w, num_stages=s, target_programs=t, min_split_blocks=m)
             for k, w, s, t, m in DECODE_CONFIGS]
  for dtype, cfg in [(jnp.float32, {}), *((jnp.bfloat16, cfg) for cfg in configs)]:
    b, t, n, kv, h, steps, sink = 3, 700, 32, 8, 128, 12, 64
    win = rng.integers(1, 500, n)
    win[0] = 1
    layout = cache_lib.make_layout(win, kv, t + steps, sink=sink)
    pads = np.array([0, 150, 333])
    total = t + steps
    q, k, v = (jnp.asarray(rng.standard_normal((b, total, heads, h)), dtype)
               for heads in (n, kv, kv))
    pos = jnp.asarray(np.arange(total)[None] - pads[:, None], jnp.int32)
    cache = cache_lib.write(cache_lib.init_cache(layout, b, h, dtype), k[:, :t], v[:, :t],
                            pos[:, :t])
    reference = jax.jit(lambda q, k, v, q_pos, k_pos: reference_attention(
        q, k, v, q_pos, k_pos, windows=win, sink=sink))
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    worst, nans = 0.0, 0
    for i in range(t, total):
      cache = cache_lib.write(cache, k[:, i:i + 1], v[:, i:i + 1], pos[:, i:i + 1])
      out = decode_lib.decode_gpu(q[:, i], pos[:, i], cache, **cfg)
      seen = jnp.where(jnp.arange(total) <= i, pos, -1)  # keys so far; later slots empty
      ref = reference(q[:, i:i + 1].astype(jnp.float32), kf, vf, pos[:, i:i + 1], seen)[:, 0]
      worst, nans = max(worst, rel_error(out, ref)), nans + int(jnp.isnan(out).sum())
    ok = worst < TOLERANCE[dtype] and nans == 0
    results.append(dict(check="decode", dtype=dtype.__name__, groups=len(layout.groups),
                        config=cfg, rel_error=worst, nans=nans, ok=ok))
    print(f"decode {dtype.__name__:<8} groups={len(layout.groups)} {cfg} worst "
          f"rel_err={worst:.2e} nans={nans} {'OK' if ok else 'FAIL'}", flush=True)


SWEEP_T = (16384,)
SWEEP_DENSITIES = (0.125, 0.25, 0.5)  # uniform windows at each, mixed below 0.5
SWEEP_DENSE = True  # also time the dense plan


def prefill_config(c: tuple) -> dict:
  """(block_rows, block_k, num_warps, num_stages, single_loop[, edge_block_k]) -> kwargs."""
  rows, block_k, warps, stages, single = c[:5]
  return dict(block_rows=rows, block_k=block_k, num_warps=warps, num_stages=stages,
              single_loop=bool(single), edge_block_k=c[5] if len(c) > 5 else block_k)


def sweep_prefill(results, skip, deadline: float) -> dict:
  best = {}
  key = jax.random.key(2)
  for t, kv in ((t, kv) for t in SWEEP_T for kv in (8, 32)):
    qs = [bench.normal(key, (1, t, bench.HEADS, bench.HEAD_DIM), i) for i in range(4)]
    k = bench.normal(key, (1, t, kv, bench.HEAD_DIM), 10)
    v = bench.normal(key, (1, t, kv, bench.HEAD_DIM), 11)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    dense = lambda k, v, q: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn")
    cudnn = bench.time_calls(dense, (k, v), qs)
    print(f"sweep prefill T={t} kv={kv} cudnn dense {cudnn * 1e3:.3f} ms", flush=True)
    plans = {**({"dense": np.full(kv, t)} if SWEEP_DENSE else {}),
             **{f"{kind[0]}{d}": bench.plan_windows(kind, d, t, kv)
                for d in SWEEP_DENSITIES for kind in ("uniform", "mixed")
                if kind == "uniform" or d < 0.5}}
    for cfg in map(prefill_config, PREFILL_CONFIGS):
      if time.time() > deadline:
        print("sweep prefill: out of time budget", flush=True)
        break
      if cfg in skip or cfg["block_rows"] < 16 * (bench.HEADS // kv):
        continue
      run = bench.runner(lambda k, v, pos, win, q, cfg=cfg: sparse_prefill_gpu(
          q, k, v, pos, win, sink=64, **cfg))
      ratios = {}
      try:
        for name, win in plans.items():
          seconds = bench.time_calls(run, (k, v, pos, jnp.asarray(win, jnp.int32)), qs)
          pairs = float(bench.attended_pairs(win, bench.SINK, t).mean())
          ratios[name] = (seconds * 1e3, pairs / (t * (t + 1) / 2) * cudnn / seconds)
      except Exception as error:  # e.g. a launch configuration out of shared memory
        print(f"sweep prefill T={t} kv={kv} {cfg} FAILED: {str(error)[:300]}", flush=True)
        continue
      results.append(dict(check="sweep_prefill", T=t, kv_heads=kv, config=cfg,
                          ms_cudnn_dense=cudnn * 1e3,
                          **{f"ms_{n}": ms for n, (ms, _) in ratios.items()},
                          **{f"x_cudnn_{n}": x for n, (_, x) in ratios.items()}))
      print(f"sweep prefill T={t} kv={kv} {cfg} " + " ".join(
          f"{n} {ms:.3f} ms ({x:.2f}x)" for n, (ms, x) in ratios.items()), flush=True)
      score = -sum(x for _, x in ratios.values())
      if (t, kv) not in best or score < best[t, kv][0]:
        best[t, kv] = (score, cfg)
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
          q[:, None], dk, dv, implementation="cudnn")[:, 0]
      dense_ms[context, batch] = bench.time_calls(dense, (dk, dv), qs, chain=True) * 1e3
      del dk, dv
    win = bench.decode_windows(kind, density, context, kv)
    layout = cache_lib.make_layout(np.repeat(win, group), kv, context, sink=64)
    cache = bench.full_cache(layout, batch, context, key)
    rho = layout.slots() / (kv * context)
    line = []
    for block_k, warps, stages, programs, min_split in DECODE_CONFIGS:
      cfg = dict(block_k=block_k, num_warps=warps, num_stages=stages, target_programs=programs,
                 min_split_blocks=min_split)
      fn = lambda q_pos, cache, q, cfg=cfg: decode_lib.decode_gpu(q, q_pos, cache, **cfg)
      try:
        ms = bench.time_calls(fn, (q_pos, cache), qs, chain=True) * 1e3
      except Exception as error:
        print(f"sweep decode {cfg} FAILED: {str(error)[:300]}", flush=True)
        continue
      ratio = ms / dense_ms[context, batch]
      results.append(dict(check="sweep_decode", context=context, batch=batch, kv_density=rho,
                          windows=kind, config=cfg, ms=ms, ms_dense_cudnn=dense_ms[context, batch],
                          ratio=ratio, target=1.3 * rho))
      key_cfg = json.dumps(cfg, sort_keys=True)
      score[key_cfg] = score.get(key_cfg, 0.0) + ratio / rho
      line.append(f"{ms:.3f}")
    print(f"sweep decode ctx={context} B={batch} rho={rho:.3f} {kind:<7} dense "
          f"{dense_ms[context, batch]:.3f} ms target {1.3 * rho * dense_ms[context, batch]:.3f}"
          f" | " + " ".join(line), flush=True)
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
  report("harness: q + 1 (one fusion per call)",
         bench.time_calls(lambda one, q: q + one, (one,), qs, chain=True))
  win = bench.decode_windows("uniform", 0.125, context, kv)
  layout = cache_lib.make_layout(np.repeat(win, group), kv, context, sink=64)
  slots = layout.groups[0].capacity
  dk = bench.normal(key, (batch, slots, kv, bench.HEAD_DIM), 1)
  dense = lambda dk, dv, q: jax.nn.dot_product_attention(q[:, None], dk, dv,
                                                         implementation="cudnn")[:, 0]
  report(f"cuDNN dense decode over {slots} keys (the same bytes)",
         bench.time_calls(dense, (dk, dk), qs, chain=True))
  tiny = cache_lib.make_layout(np.full(bench.HEADS, 1), kv, context, sink=63)
  tiny_cache = bench.full_cache(tiny, batch, context, key)
  ours = lambda cfg: (lambda q_pos, cache, q: decode_lib.decode_gpu(q, q_pos, cache, **cfg))
  report(f"ours over a {tiny.groups[0].capacity}-slot cache",
         bench.time_calls(ours({}), (q_pos, tiny_cache), qs, chain=True))
  cache = bench.full_cache(layout, batch, context, key)
  for block_k, warps, stages, programs, min_split in [
      (64, 4, 3, 528, 16), (64, 4, 3, 264, 1), (64, 4, 3, 396, 1), (64, 4, 3, 792, 1),
      (64, 4, 3, 1584, 1), (64, 2, 3, 396, 1), (64, 2, 3, 792, 1), (32, 4, 4, 792, 1),
      (32, 2, 4, 1584, 1), (128, 4, 2, 132, 1), (64, 4, 3, 128, 64)]:
    cfg = dict(block_k=block_k, num_warps=warps, num_stages=stages, target_programs=programs,
               min_split_blocks=min_split)
    for chain in (True, False):
      try:
        seconds = bench.time_calls(ours(cfg), (q_pos, cache), qs, chain=chain)
      except Exception as error:
        print(f"overheads {cfg} FAILED: {str(error)[:300]}", flush=True)
        break
      report(f"ours {slots} slots {'chained' if chain else 'independent'} "
             f"{block_k},{warps},{stages},{programs},{min_split}", seconds, config=cfg,
             chain=chain)


def configs_arg(text: str) -> list[tuple]:
  """'a,b,c;d,e,f' -> [(a, b, c), (d, e, f)] of ints."""
  return [tuple(int(x) for x in item.split(",")) for item in text.split(";")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="gpu_check.json")
  parser.add_argument("--sweep", default="",
                      help="comma-separated timings to run: prefill, decode, overheads")
  parser.add_argument("--prefill-configs", type=configs_arg, default=None,
                      help="'block_rows,block_k,warps,stages,single_loop[,edge_block_k];...' "
                           "(default: all)")
  parser.add_argument("--checks", default="prefill,decode",
                      help="comma-separated correctness checks to run: prefill, decode")
  parser.add_argument("--decode-configs", type=configs_arg, default=None,
                      help="'block_k,warps,stages,target_programs,min_split_blocks;...'")
  parser.add_argument("--budget-s", type=float, default=1e9)
  parser.add_argument("--sweep-t", default="16384", help="comma-separated prefill sweep lengths")
  parser.add_argument("--sweep-densities", default="0.125,0.25,0.5",
                      help="comma-separated attention densities of the prefill sweep")
  parser.add_argument("--sweep-no-dense", action="store_true",
                      help="leave the dense plan out of the prefill sweep")
  args = parser.parse_args()
  global PREFILL_CONFIGS, DECODE_CONFIGS, SWEEP_T, SWEEP_DENSITIES, SWEEP_DENSE
  SWEEP_T = tuple(int(x) for x in args.sweep_t.split(","))
  SWEEP_DENSITIES = tuple(float(x) for x in args.sweep_densities.split(","))
  SWEEP_DENSE = not args.sweep_no_dense
  PREFILL_CONFIGS = args.prefill_configs or PREFILL_CONFIGS
  DECODE_CONFIGS = args.decode_configs or DECODE_CONFIGS
  sweeps = set(filter(None, args.sweep.split(",")))
  deadline = time.time() + args.budget_s
  print(jax.devices(), jax.__version__, flush=True)
  rng = np.random.default_rng(0)
  results = []
  checks = set(filter(None, args.checks.split(",")))
  if "prefill" in checks:
    check_prefill(rng, results)
  if "decode" in checks:
    check_decode(rng, results)
  failed_configs = [r["config"] for r in results if r["check"] == "prefill" and not r["ok"]]
  best = dict(prefill={}, decode={})
  if "overheads" in sweeps:
    decode_overheads(results)
  if "decode" in sweeps:
    print("decode configs:", DECODE_CONFIGS, flush=True)
    best["decode"] = sweep_decode(results, deadline)
  if "prefill" in sweeps:
    best["prefill"] = sweep_prefill(results, failed_configs, deadline)
  with open(args.out, "w") as f:
    json.dump(dict(results=results, best=best), f, indent=1)
  failed = [r for r in results if r.get("ok") is False]
  print("best configurations:", best)
  print(f"{len(failed)} correctness checks failed" if failed else "all correctness checks OK")


if __name__ == "__main__":
  main()
