"""Benchmark MoA attention on the GPU: sparse prefill and decode against dense cuDNN / XLA.

Run on the GPU machine from the repository root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/bench_attention.py --out $OUT/attention.json

Prefill: B = 1, T in {8k, 16k, 32k}, 32 query heads with 32 and with 8 KV heads, D = 128, bf16;
plans of attention density ~0.125 / 0.25 / 0.5 (sink 64), uniform windows and mixed per-KV-group
windows; ours (the Mosaic GPU kernel for Hopper and the Triton kernel) vs cuDNN dense causal vs
cuDNN with one sliding window covering the same number
of attended pairs (`--mosaic_dense`: also JAX's Mosaic GPU FlashAttention-3-style dense causal
kernel, a warp-specialised wgmma/TMA reference rate, in fp16 next to cuDNN dense in fp16).
Effective TFLOP/s = 4 * D * attended pairs * B * heads / time.
Decode: one token per row, 32 query heads / 8 KV heads, D = 128, bf16, batch {1, 16, 64} x
context {8k, 32k}; ours over the MoA cache at KV density ~0.125 / 0.25 / 0.5 (uniform and mixed)
vs dense decode over a dense cache (XLA einsum, cuDNN). GB/s counts the K/V bytes read once.

Every time is a median over samples after warm-up; one jitted function runs `reps` calls (each
on its own query array; decode calls chained so that XLA cannot merge them), and one sample
dispatches it back to back until about 5 ms of work is queued, then waits once (`time_calls`).
Decode also records the harness alone (one chained elementwise op per call) as impl "harness".
Results: one JSON record per measurement, and a markdown table printed last.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moa_jax.attention import cache as cache_lib
from moa_jax.attention import decode as decode_lib
from moa_jax.attention.benchmark import (
  DTYPE,
  HEAD_DIM,
  HEADS,
  SINK,
  bisect,
  decode_windows,
  full_cache,
  normal,
  plan_windows,
  runner,
  time_calls,
)
from moa_jax.attention.prefill_gpu import sparse_prefill_gpu
from moa_jax.attention.prefill_hopper import sparse_prefill_hopper
from moa_jax.plans.rules import attended_pairs, kv_density


def try_time(label: str, fn, shared, queries, *, samples: int, chain: bool = False) -> float | None:
  """time_calls, or None (reported) when the implementation fails on this shape."""
  try:
    return time_calls(fn, shared, queries, samples=samples, chain=chain)
  except Exception as error:  # e.g. cuDNN rejecting a configuration: keep the other numbers
    print(f"{label} FAILED: {str(error)[:300]}", flush=True)
    return None


def cudnn_window(pairs: float, n: int) -> int:
  """Window (sink 0) whose attended pairs match `pairs`."""
  return int(round(bisect(lambda w: attended_pairs(int(round(w)), 0, n) >= pairs, 1, n)))


LOG = []  # open files that receive every record as one JSON line when it is measured


def _record(**kw):
  kw.update(gpu=jax.devices()[0].device_kind, jax_version=jax.__version__)
  for f in LOG:
    f.write(json.dumps(kw) + "\n")
    f.flush()
  return kw


def mosaic_gpu_causal(k, v, q):
  """JAX's own Mosaic GPU (FlashAttention-3 style) dense causal attention, q [B, T, N, H] fp16."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu  # GPU-only module

  config = attention_mgpu.TuningConfig(
    block_q=64, block_kv=128, max_concurrent_steps=2, causal=True
  )
  return attention_mgpu.attention(q, k, v, config)


def bench_prefill(
  lengths,
  kv_heads_list,
  densities,
  *,
  reps: int,
  samples: int,
  configs: dict[int, dict],
  mosaic_dense: bool = False,
):
  """Prefill records: cuDNN dense (and JAX's Mosaic GPU dense), then per density ours
  (uniform, mixed) and cuDNN window."""
  records = []
  key = jax.random.key(0)
  for t in lengths:
    full_pairs = t * (t + 1) / 2
    for kv_heads in kv_heads_list:
      qs = [normal(key, (1, t, HEADS, HEAD_DIM), i) for i in range(reps)]
      k = normal(key, (1, t, kv_heads, HEAD_DIM), 100)
      v = normal(key, (1, t, kv_heads, HEAD_DIM), 101)
      pos = jnp.arange(t, dtype=jnp.int32)[None]
      common = dict(op="prefill", T=t, batch=1, heads=HEADS, kv_heads=kv_heads, head_dim=HEAD_DIM)

      def add(impl, seconds, pairs, **extra):
        if seconds is None:
          return
        flops = 4 * HEAD_DIM * pairs * HEADS
        records.append(
          _record(
            **common,
            impl=impl,
            attn_density=pairs / full_pairs,
            ms=seconds * 1e3,
            tflops=flops / seconds / 1e12,
            **extra,
          )
        )
        print(
          f"prefill T={t} kv={kv_heads} {impl:<13} {extra.get('windows', ''):<8} "
          f"attn={pairs / full_pairs:.3f} {seconds * 1e3:8.3f} ms "
          f"{flops / seconds / 1e12:6.1f} TFLOP/s",
          flush=True,
        )

      dense = lambda k, v, q: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"
      )
      add(
        "cudnn_dense",
        try_time(f"{common} dense", dense, (k, v), qs, samples=samples),
        full_pairs,
        kv_density=1.0,
      )
      if mosaic_dense:  # the rate of a warp-specialised wgmma/TMA kernel, for scale
        f16 = lambda x: x.astype(jnp.float16)  # the kernel's shared memory is float16 only
        add(
          "jax_mosaic_gpu_dense_fp16",
          try_time(
            f"{common} mosaic",
            mosaic_gpu_causal,
            (f16(k), f16(v)),
            [f16(q) for q in qs],
            samples=samples,
          ),
          full_pairs,
          kv_density=1.0,
        )
        add(
          "cudnn_dense_fp16",
          try_time(
            f"{common} dense fp16", dense, (f16(k), f16(v)), [f16(q) for q in qs], samples=samples
          ),
          full_pairs,
          kv_density=1.0,
        )
      config = configs.get(kv_heads, {})
      ours = runner(
        lambda k, v, pos, win, q: sparse_prefill_gpu(q, k, v, pos, win, sink=SINK, **config)
      )
      for density in densities:
        for kind in ("uniform", "mixed"):
          win = plan_windows(kind, density, t, kv_heads)  # per KV group
          pairs = float(attended_pairs(win, SINK, t).mean())
          shared = (k, v, pos, jnp.asarray(win, jnp.int32))
          add(
            "moa_triton",
            try_time(f"{common} ours", ours, shared, qs, samples=samples),
            pairs,
            windows=kind,
            target_density=density,
            kv_density=kv_density(win, SINK, t),
            config=config,
          )
          hopper = lambda k, v, q, static=tuple(int(w) for w in win): sparse_prefill_hopper(
            q, k, v, static, sink=SINK
          )
          add(
            "moa_mosaic_gpu",
            try_time(f"{common} hopper", hopper, (k, v), qs, samples=samples),
            pairs,
            windows=kind,
            target_density=density,
            kv_density=kv_density(win, SINK, t),
          )
          if kind == "uniform":
            w = cudnn_window(pairs, t)
            local = lambda k, v, q, w=w: jax.nn.dot_product_attention(
              q, k, v, is_causal=True, local_window_size=(w - 1, 0), implementation="cudnn"
            )
            add(
              "cudnn_window",
              try_time(f"{common} local", local, (k, v), qs, samples=samples),
              float(attended_pairs(w, 0, t)),
              windows="uniform",
              target_density=density,
              window=w,
              kv_density=min(w, t) / t,
            )
      del qs, k, v
  return records


def bench_decode(
  batches, contexts, densities, *, kv_heads: int, reps: int, samples: int, **kernel_kw
):
  """Decode records: dense XLA and cuDNN, then ours (Pallas and XLA) per KV density."""
  records = []
  key = jax.random.key(1)
  bytes_per_slot = 2 * HEAD_DIM * jnp.dtype(DTYPE).itemsize  # K and V
  group = HEADS // kv_heads
  for context in contexts:
    for batch in batches:
      qs = [normal(key, (batch, HEADS, HEAD_DIM), i) for i in range(reps)]
      q_pos = jnp.full((batch,), context - 1, jnp.int32)
      common = dict(
        op="decode", T=context, batch=batch, heads=HEADS, kv_heads=kv_heads, head_dim=HEAD_DIM
      )

      def add(impl, seconds, slots, **extra):
        if seconds is None:
          return
        gbps = batch * slots * bytes_per_slot / seconds / 1e9
        records.append(
          _record(
            **common,
            impl=impl,
            kv_density=slots / (kv_heads * context),
            ms=seconds * 1e3,
            gbps=gbps,
            **extra,
          )
        )
        print(
          f"decode ctx={context} B={batch:<3} {impl:<11} {extra.get('windows', ''):<8} "
          f"kv={slots / (kv_heads * context):.3f} {seconds * 1e3:8.3f} ms {gbps:7.0f} GB/s",
          flush=True,
        )

      one = jnp.ones((), DTYPE)
      add(
        "harness",
        try_time(
          f"{common} harness", lambda one, q: q + one, (one,), qs, samples=samples, chain=True
        ),
        0,
      )
      dk = normal(key, (batch, context, kv_heads, HEAD_DIM), 100)
      dv = normal(key, (batch, context, kv_heads, HEAD_DIM), 101)

      def dense_xla(dk, dv, q):
        qg = q.reshape(batch, kv_heads, group, HEAD_DIM)
        logits = jnp.einsum("bkgh,bskh->bkgs", qg, dk, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * HEAD_DIM**-0.5, axis=-1).astype(DTYPE)
        return jnp.einsum("bkgs,bskh->bkgh", weights, dv).reshape(batch, HEADS, HEAD_DIM)

      dense_cudnn = lambda dk, dv, q: jax.nn.dot_product_attention(
        q[:, None], dk, dv, implementation="cudnn"
      )[:, 0]
      add(
        "dense_xla",
        try_time(f"{common} xla", dense_xla, (dk, dv), qs, samples=samples, chain=True),
        kv_heads * context,
      )
      add(
        "dense_cudnn",
        try_time(f"{common} cudnn", dense_cudnn, (dk, dv), qs, samples=samples, chain=True),
        kv_heads * context,
      )
      del dk, dv
      ours = lambda q_pos, cache, q: decode_lib.decode_gpu(q, q_pos, cache, **kernel_kw)
      xla = lambda q_pos, cache, q: decode_lib.decode_xla(q, q_pos, cache)
      for density in [*densities, 1.0]:
        for kind in ("uniform", "mixed") if density < 1 else ("uniform",):
          win = decode_windows(kind, density, context, kv_heads)
          layout = cache_lib.make_layout(np.repeat(win, group), kv_heads, context, sink=SINK)
          cache = full_cache(layout, batch, context, key)
          add(
            "moa_triton",
            try_time(f"{common} ours", ours, (q_pos, cache), qs, samples=samples, chain=True),
            layout.slots(),
            windows=kind,
            target_density=density,
            config=kernel_kw,
          )
          if kind == "uniform" and density in (0.25, 1.0):
            add(
              "moa_xla",
              try_time(f"{common} xla", xla, (q_pos, cache), qs, samples=samples, chain=True),
              layout.slots(),
              windows=kind,
              target_density=density,
            )
          del cache
  return records


def markdown(records) -> str:
  """Two tables: prefill (ours vs cuDNN) and decode (ours vs dense)."""
  nan = float("nan")
  lines = [
    "| T | KV heads | attn density | windows | kernel | MoA ms | MoA TFLOP/s | "
    "cuDNN dense ms | cuDNN dense TFLOP/s | MoA / dense TFLOP/s | cuDNN window ms |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  pre = [r for r in records if r["op"] == "prefill"]
  kernels = {"moa_mosaic_gpu": "Mosaic GPU", "moa_triton": "Triton"}
  for r in (r for r in pre if r["impl"] in kernels):
    match = lambda x, impl: (
      x["impl"] == impl and x["T"] == r["T"] and x["kv_heads"] == r["kv_heads"]
    )
    dense = next((x for x in pre if match(x, "cudnn_dense")), dict(ms=nan, tflops=nan))
    window = [
      x
      for x in pre
      if match(x, "cudnn_window")
      and x["target_density"] == r["target_density"]
      and r["windows"] == "uniform"
    ]
    window_ms = f"{window[0]['ms']:.3f}" if window else "-"
    lines.append(
      f"| {r['T']} | {r['kv_heads']} | {r['attn_density']:.3f} | {r['windows']} | "
      f"{kernels[r['impl']]} | {r['ms']:.3f} | {r['tflops']:.0f} | {dense['ms']:.3f} | "
      f"{dense['tflops']:.0f} | "
      f"{r['tflops'] / dense['tflops']:.2f} | {window_ms} |"
    )
  lines += [
    "",
    "| context | batch | KV density | windows | MoA ms | MoA GB/s | dense cuDNN ms | "
    "dense XLA ms | MoA / dense time | target 1.3 x rho | harness ms |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  dec = [r for r in records if r["op"] == "decode"]
  for r in (r for r in dec if r["impl"] == "moa_triton"):
    base = {impl: dict(ms=nan) for impl in ("dense_cudnn", "dense_xla", "harness")}
    base.update(
      {
        x["impl"]: x
        for x in dec
        if x["T"] == r["T"] and x["batch"] == r["batch"] and x["impl"] in base
      }
    )
    dense_ms = np.nanmin([base["dense_cudnn"]["ms"], base["dense_xla"]["ms"]])
    lines.append(
      f"| {r['T']} | {r['batch']} | {r['kv_density']:.3f} | {r['windows']} | {r['ms']:.3f} | "
      f"{r['gbps']:.0f} | {base['dense_cudnn']['ms']:.3f} | {base['dense_xla']['ms']:.3f} | "
      f"{r['ms'] / dense_ms:.3f} | {1.3 * r['kv_density']:.3f} | "
      f"{base['harness']['ms']:.3f} |"
    )
  return "\n".join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_string("out", "benchmarks/attention.json", "results file (JSON)")
flags.DEFINE_list("lengths", ["8192", "16384", "32768"], "prefill lengths")
flags.DEFINE_list("densities", ["0.125", "0.25", "0.5"], "attention / KV densities")
flags.DEFINE_list("batches", ["1", "16", "64"], "decode batch sizes")
flags.DEFINE_list("contexts", ["8192", "32768"], "decode context lengths")
flags.DEFINE_enum("skip", None, ["prefill", "decode"], "leave one part out")
flags.DEFINE_integer("reps", 4, "calls per timed sample")
flags.DEFINE_integer("samples", 7, "timed samples (median)")
flags.DEFINE_bool("mosaic_dense", False, "also time JAX's Mosaic GPU dense causal kernel")
flags.DEFINE_string(
  "config", None, "JSON from gpu_check_kernels.py: its 'best' launch configurations"
)


def main(argv):
  del argv
  best = dict(prefill={}, decode={})
  if FLAGS.config:
    with open(FLAGS.config) as f:
      best = json.load(f)["best"]
  ints = lambda values: [int(x) for x in values]
  densities = [float(x) for x in FLAGS.densities]
  records = []
  LOG.append(open(FLAGS.out.rsplit(".", 1)[0] + "_records.jsonl", "w"))
  if FLAGS.skip != "prefill":
    records += bench_prefill(
      ints(FLAGS.lengths),
      [32, 8],
      densities,
      reps=FLAGS.reps,
      samples=FLAGS.samples,
      configs={int(k): v for k, v in best["prefill"].items()},
      mosaic_dense=FLAGS.mosaic_dense,
    )
  if FLAGS.skip != "decode":
    records += bench_decode(
      ints(FLAGS.batches),
      ints(FLAGS.contexts),
      densities,
      kv_heads=8,
      reps=2 * FLAGS.reps,
      samples=FLAGS.samples,
      **best["decode"],
    )
  result = dict(
    command="python3 experiments/bench_attention.py " + " ".join(sys.argv[1:]), records=records
  )
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)
  table = markdown(records)
  with open(FLAGS.out.rsplit(".", 1)[0] + "_table.md", "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
