"""Lean-path influence profiling of a Llama-3-8B-shaped model at 8192 tokens on one GPU.

Command (GPU; give it the full 10-minute limit: XLA compiles each 32-layer program for a minute
or more, and a first H100 run spent 150 s on the 2-layer check alone):
  PYTHONPATH=. python experiments/bench_profile.py --out benchmarks/profile.json [--check]
CPU smoke run of the same code at a small size:
  JAX_PLATFORMS=cpu python experiments/bench_profile.py --small --check --out /tmp/profile.json
(the package must be importable: pip install -e . or PYTHONPATH=. from the repository root)

Random bf16 weights, initialised on the device (no float32 host copy); one sample of `--length`
random tokens whose last 128 are the response. Phase 0: the matmul floor (the bf16 GEMM rate
measured here times the model's matmul FLOPs, `matmul_floor`). Phases (baselines are skipped
once `--budget_s` is spent; --noautotune turns XLA's GEMM autotuning off, which on the H200 made
its bf16 GEMMs ~50x slower, `benchmarks/profile_no_autotune.json`):
  1. profile: the full model, lean path (`batch_influence`): its time, and its first stage alone
     (one forward + backward yielding every layer's dO, q, k, v).
  2. baselines on the same batch: forward + backward to the activations only (no weight
     gradients), then a plain forward + backward with weight gradients (may not fit 80 GB).
  3. with --check: a 2-layer model of the same shape at 1024 tokens, without and with right padding:
     E_bar through the lean path with cuDNN attention and with XLA attention vs the direct path
     (jax.grad on the maps); and a float32 copy (lean vs direct, matmuls at HIGHEST precision),
     which must agree to 1e-4.
Times are medians over `--reps` runs after a warm-up run; memory is the allocator's peak
(`memory_stats()['peak_bytes_in_use']`, cumulative: the profile runs first). Prints a table last
and writes JSON to --out (after every phase, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
if "--noautotune" in sys.argv:
  os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_gpu_autotune_level=0"]
  ).strip()
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moa_jax.attention.fused import FusedCausalAttention
from moa_jax.models import Llama, LlamaConfig
from moa_jax.profile.probes import OutputProbeAttention
from moa_jax.profile.profiler import (
  batch_influence,
  default_implementation,
  output_grads,
  response_loss,
  response_targets,
)
from moa_jax.workdir import atomic_write_text

GIB = 2**30
RESPONSE = 128
BLOCK = 64


def init_model(config: LlamaConfig, seed: int = 0) -> Llama:
  """A Llama with random parameters created by one jitted program on the default device."""
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(abstract)
  state = jax.jit(lambda: nnx.split(Llama(config, rngs=nnx.Rngs(seed)))[1])()
  return nnx.merge(graphdef, state)


def sample(config: LlamaConfig, length: int, seed: int = 0, padding: int = 0):
  """tokens, positions [1, T]; hidden_index, weight [1, R] for a response of the last R tokens
  before `padding` pad tokens (positions -1)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, config.vocab_size, (1, length)).astype(np.int32)
  valid = length - padding
  loss_mask = np.zeros((1, length), bool)
  loss_mask[:, valid - RESPONSE : valid] = True
  hidden_index, weight = response_targets(loss_mask)
  positions = np.where(np.arange(length) < valid, np.arange(length), -1).astype(np.int32)[None]
  return tuple(jnp.asarray(x) for x in (tokens, positions, hidden_index, weight))


def timed(fn, reps: int) -> dict:
  """Median wall time of fn() (blocked until ready) after one warm-up (compiling) call."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  print(f"  first call (with compilation) {first:.1f} s", flush=True)
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "times_s": times, "first_call_s": first}


def peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(config: LlamaConfig, length: int) -> dict:
  """E_bar of a 2-layer model: cuDNN vs XLA lean path vs the direct path, bf16 and float32."""
  result = {"layers": 2, "length": length}
  model = init_model(config.replace(num_layers=2))
  f32 = init_model(config.replace(num_layers=2, dtype="float32", param_dtype="float32"))
  implementation = default_implementation(config.dtype)
  for padding in (0, 40):
    batch = sample(config, length, seed=1, padding=padding)
    run = lambda m, **kw: np.asarray(batch_influence(m, *batch, block=BLOCK, **kw))
    reference = run(model, path="direct")
    result[f"bf16_{implementation}_vs_direct_pad{padding}"] = relative_error(
      run(model, implementation=implementation), reference
    )
    if padding == 0:
      if implementation != "xla":
        result["bf16_xla_vs_direct_pad0"] = relative_error(
          run(model, implementation="xla"), reference
        )
      with jax.default_matmul_precision("highest"):
        result["f32_lean_vs_direct_pad0"] = relative_error(
          run(f32, implementation="xla"), run(f32, path="direct")
        )
  return result


def matmul_floor(config: LlamaConfig, length: int) -> dict:
  """The matmul floor of a forward + backward at T = `length`: its matmul FLOPs over the bf16
  GEMM rate measured here (an 8192^3 product, median of 5 after a warm-up).

  FLOPs: linear layers 2 x P_lin x T forward (P_lin: every weight matrix but the embedding,
  the LM head included); causal attention 2 x 2 x T^2 / 2 x N x H per layer forward; the
  backward costs twice the forward with weight gradients, once without (activations only).
  """
  a = jnp.asarray(np.random.default_rng(0).standard_normal((8192, 8192)), jnp.bfloat16)
  product = jax.jit(lambda x: x @ x)
  rate = 2 * 8192**3 / timed(lambda: product(a), 5)["median_s"]
  d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * config.intermediate_size
  linear = 2 * (config.num_layers * per_layer + d * config.vocab_size) * length
  attention = config.num_layers * 2 * length**2 * n * h
  forward = linear + attention
  return {
    "gemm_tflops": rate / 1e12,
    "forward_tflop": forward / 1e12,
    "floor_fwd_bwd_weights_s": 3 * forward / rate,
    "floor_fwd_bwd_activations_s": 2 * forward / rate,
  }


def bench(config: LlamaConfig, length: int, reps: int, deadline: float, report) -> None:
  """Profile time and memory of the full model, then the baselines, while time is left."""
  report("matmul_floor", matmul_floor(config, length))
  model = init_model(config)
  jax.block_until_ready(nnx.state(model))
  batch = sample(config, length)
  graphdef, state = nnx.split(model)
  implementation = default_implementation(config.dtype)
  report(
    "profile_setup",
    {
      "implementation": implementation,
      "params_gib": sum(x.nbytes for x in jax.tree.leaves(state)) / GIB,
      "peak_gib_after_init": peak_gib(),
    },
  )

  report(
    "profile",
    {
      **timed(
        lambda: batch_influence(model, *batch, block=BLOCK, implementation=implementation), reps
      ),
      "peak_gib": peak_gib(),
    },
  )
  report(
    "profile_stage1",
    timed(
      lambda: output_grads(graphdef, state, *batch, implementation=implementation, padded=False),
      reps,
    ),
  )
  probe_shape = (1, length, config.num_heads, config.head_dim)

  @jax.jit
  def forward_backward_activations(state):
    """Loss and dL/dO of every layer: all activation gradients, no weight gradients."""

    def loss_fn(probes):
      attention = OutputProbeAttention(probes, implementation, padded=False)
      return response_loss(nnx.merge(graphdef, state), *batch, attention)

    probes = [jnp.zeros(probe_shape, config.dtype) for _ in range(config.num_layers)]
    return jax.value_and_grad(loss_fn)(probes)

  param_graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def forward_backward_weights(params):
    """Loss and the gradient w.r.t. every weight: a plain training forward + backward."""

    def loss_fn(params):
      model = nnx.merge(param_graphdef, params, rest)
      return response_loss(model, *batch, FusedCausalAttention(implementation, padded=False))

    return jax.value_and_grad(loss_fn)(params)

  for name, fn, arg in (
    ("baseline_fwd_bwd_activations", forward_backward_activations, state),
    ("baseline_fwd_bwd_weights", forward_backward_weights, params),
  ):
    if time.perf_counter() > deadline:
      report(name, {"skipped": "device-time budget spent"})
      continue
    try:
      report(name, {**timed(lambda: fn(arg), reps), "peak_gib": peak_gib()})
    except Exception as error:  # out of memory at this size is a result, not a crash
      report(name, {"error": f"{type(error).__name__}: {str(error)[:300]}"})


FLAGS = flags.FLAGS
flags.DEFINE_string("out", "benchmarks/profile.json", "results file")
flags.DEFINE_integer("length", 8192, "profile length T")
flags.DEFINE_integer("check_length", 1024, "length of the 2-layer agreement check")
flags.DEFINE_integer("reps", 3, "timed repetitions")
flags.DEFINE_float("budget_s", 170.0, "time budget of the bench phase (seconds)")
flags.DEFINE_bool("small", False, "a small model (CPU smoke run)")
flags.DEFINE_bool("check", False, "run the 2-layer agreement check too")
flags.DEFINE_bool("autotune", True, "XLA's GEMM autotuning (--noautotune: off)")


def main(argv) -> None:
  del argv
  args = FLAGS
  start = time.perf_counter()
  config = LlamaConfig.llama3_8b()
  if args.small:
    config = config.replace(
      vocab_size=512,
      hidden_size=256,
      intermediate_size=512,
      num_layers=4,
      num_heads=8,
      num_kv_heads=2,
      head_dim=32,
    )
  results = {
    "command": "python " + " ".join(sys.argv),
    "device": str(jax.devices()[0].device_kind),
    "jax": jax.__version__,
    "host": platform.node(),
    "config": config.to_hf_dict(),
    "length": args.length,
    "response_tokens": RESPONSE,
    "block": BLOCK,
    "batch": 1,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }

  def report(name, value):
    results[name] = value
    results["elapsed_s"] = time.perf_counter() - start
    print(f"[{results['elapsed_s']:7.1f}s] {name}: {json.dumps(value, default=float)}", flush=True)
    atomic_write_text(args.out, json.dumps(results, indent=1, default=float))

  phases = [("bench", lambda: bench(config, args.length, args.reps, start + args.budget_s, report))]
  if args.check:
    phases.append(("check", lambda: report("check", check(config, args.check_length))))
  for name, phase in phases:
    print(f"[{time.perf_counter() - start:7.1f}s] {name} ...", flush=True)
    try:
      phase()
    except Exception as error:  # keep what the other phase measures
      report(f"{name}_error", f"{type(error).__name__}: {str(error)[:2000]}")
  if "median_s" not in results.get("profile", {}):
    return
  profile = results["profile"]["median_s"]
  rows = [
    ("profile (lean, total)", profile),
    ("  stage 1: fwd + bwd for dO, q, k, v", results["profile_stage1"]["median_s"]),
  ]
  for name in ("baseline_fwd_bwd_activations", "baseline_fwd_bwd_weights"):
    if "median_s" in results.get(name, {}):
      rows.append((name, results[name]["median_s"]))
      results[f"ratio_profile_to_{name.removeprefix('baseline_')}"] = (
        profile / results[name]["median_s"]
      )
  floor = results["matmul_floor"]
  for name in ("activations", "weights"):
    if "median_s" in results.get(f"baseline_fwd_bwd_{name}", {}):
      measured = results[f"baseline_fwd_bwd_{name}"]["median_s"]
      results[f"ratio_fwd_bwd_{name}_to_matmul_floor"] = measured / floor[f"floor_fwd_bwd_{name}_s"]
  report("summary", {name: t for name, t in rows})
  print(f"\n{config.num_layers} layers, T={args.length}, {results['device']}")
  for name, t in rows:
    print(f"{name:45s} {t * 1e3:9.1f} ms")
  for key, value in results.items():
    if key.startswith("ratio") or key in ("check", "check_error"):
      print(f"{key}: {value}")
  print(f"peak memory (profile phase): {results['profile']['peak_gib']} GiB")


if __name__ == "__main__":
  app.run(main)
