"""The sharded model on several GPUs of one host (issue 17): correctness, the 70B shape, scaling.

Commands (GPU kinds nvidia-h200-x2 / -x4 / -x8; NVLink multicast stays off, see below):
  python experiments/bench_multi_gpu.py --phases=correctness --out benchmarks/multi_gpu.json
  python experiments/bench_multi_gpu.py --phases=profile_70b,generate_70b,scaling \
      --out benchmarks/multi_gpu.json
CPU smoke run of the same code on 8 fake CPU devices, tiny shapes (tests/test_bench_multi_gpu.py):
  python experiments/bench_multi_gpu.py --smoke --reps=1 --out /tmp/multi_gpu.json

Phases (each runs in a child process of its own, so every device's peak memory is the phase's):
  correctness: a Llama-3-8B-shaped model (random bf16 weights) on one GPU and sharded on 2
    (tensor axis): logits of a 2 x 512 batch and greedy tokens on the MoA cache (a plan with two
    window rules per layer, heads dealt out by capacity) vs one GPU, within bf16 tolerance.
  profile_70b: Llama-3-70B shape, random bf16 weights created sharded on all GPUs (never on the
    host): the lean profile of one 8k sample; time and per-device peak vs the dry run's.
  generate_70b: the same model, MoA generate of a 16k request (16k - 256 prompt tokens + 256 new
    tokens): prefill time, decode time (per token) and per-device peak vs the dry run's.
  scaling: lean profile time of the 8B shape at 8k on 1, 2, 4 and 8 GPUs (those present).
The dry run is `moa_jax.memory.plan_memory` for the same case (configs/memory.py's fields).
Writes JSON to --out after every phase (a run cut short keeps what it measured); prints a table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (shared hosts' GPUs)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
from moa_jax.distributed import fake_cpu_devices_env

if "--smoke" in sys.argv:  # before JAX starts its backends: 8 fake CPU devices
  os.environ.update(fake_cpu_devices_env(8))

import jax
import numpy as np
from absl import app, flags

from moa_jax.attention.moa import MoAAttention
from moa_jax.attention.sharded import ShardedMoAAttention
from moa_jax.generate import decode, generate, prefill
from moa_jax.memory import GB, plan_memory
from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.profile.profiler import batch_influence, response_targets
from moa_jax.workdir import atomic_write_text

PHASES = ("correctness", "profile_70b", "generate_70b", "scaling")
FLAGS = flags.FLAGS
flags.DEFINE_list("phases", list(PHASES), f"phases to run, of {PHASES}")
flags.DEFINE_string("out", "benchmarks/multi_gpu.json", "results file")
flags.DEFINE_bool("smoke", False, "tiny shapes on 8 fake CPU devices (a CI check of the code)")
flags.DEFINE_integer("reps", 3, "timed repetitions after the warm-up")
flags.DEFINE_string("child", "", "internal: run this phase here and print its JSON")
BF16_LOGITS = 3e-2  # bf16 tolerance: max |sharded - one GPU| / max |one GPU|
RESPONSE = 128
SINK = 64


def sizes() -> SimpleNamespace:
  """Shapes and lengths of every phase (tiny ones for --smoke)."""
  if FLAGS.smoke:
    small = LlamaConfig.tiny(num_heads=16, num_kv_heads=8, intermediate_size=128, num_layers=1)
    return SimpleNamespace(
      small=small,
      large=small,
      logits_length=64,
      profile_length=128,
      generate_length=256,
      new_tokens=8,
      response=16,
      block=32,
      tile=64,
    )
  return SimpleNamespace(
    small=LlamaConfig.llama3_8b(),
    large=LlamaConfig.llama3_70b(),
    logits_length=512,
    profile_length=8192,
    generate_length=16384,
    new_tokens=256,
    response=RESPONSE,
    block=64,
    tile=512,
  )


def mesh_of(count: int, shape=None):
  return sharding.make_mesh(shape or (1, 1, count), jax.devices()[:count])


def peak_bytes(devices) -> int | None:
  """The largest allocator peak of `devices` (None where the backend keeps no statistics)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return None if None in peaks else max(peaks)


def timed(fn, reps: int, setup=lambda: ()) -> dict:
  """Median wall time of fn(*setup()) after a warm-up call that compiles (setup untimed)."""
  times = []
  for _ in range(reps + 1):
    args = jax.block_until_ready(setup())
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times[1:]), "times_s": times[1:], "first_call_s": times[0]}


def two_rule_windows(config: LlamaConfig, length: int, seed: int = 0) -> np.ndarray:
  """[L, K] windows: per layer a random half of the KV heads at length / 8, the rest at 7/8
  (KV density about 0.5; two rules per layer, as the MILP allows by default)."""
  rng = np.random.default_rng(seed)
  wide = rng.random((config.num_layers, config.num_kv_heads)) < 0.5
  return np.maximum(np.where(wide, 7 * length // 8, length // 8) - SINK, 16)


def profile_batch(config: LlamaConfig, length: int, response: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, (1, length)).astype(np.int32)
  mask = np.zeros((1, length), bool)
  mask[:, -response:] = True
  hidden_index, weight = response_targets(mask)
  positions = np.arange(length, dtype=np.int32)[None]
  return tokens, positions, hidden_index, weight


def profile_once(model, batch, s) -> jax.Array:
  return batch_influence(model, *batch, block=s.block, tile=s.tile)


def dry_run(preset_config: LlamaConfig, task: str, length: int, shape) -> dict:
  """The memory plan's per-device numbers for the same case (configs/memory.py's fields)."""
  s = sizes()
  if FLAGS.smoke:  # the tiny shapes are no preset: the plan is of its own kind, skip it
    return {}
  config = SimpleNamespace(
    task=task,
    length=length,
    batch_size=1,
    new_tokens=s.new_tokens,
    prefill_chunk=0,
    density=0.5,
    plan="",
    sink=SINK,
    response_tokens=s.response,
    loss="nll",
    block=s.block,
    tile=s.tile,
    device_memory_gb=141.0,
    usable_fraction=0.95,
    mesh=SimpleNamespace(shape=tuple(shape)),
    model=SimpleNamespace(
      preset="llama-3-70b" if preset_config.num_layers == 80 else "llama-3-8b",
      path="",
      dtype="bfloat16",
    ),
  )
  plan = plan_memory(config)
  return {key: getattr(plan, key) for key in ("weights", "cache", "activations", "peak")}


def correctness() -> dict:
  s = sizes()
  config = s.small
  one = sharding.init_model(config, mesh_of(1))
  two = sharding.shard_model(one, mesh_of(2))
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, config.vocab_size, (2, s.logits_length)).astype(np.int32)
  positions = np.tile(np.arange(s.logits_length, dtype=np.int32), (2, 1))
  forward = jax.jit(lambda m, t, p: m(t, p)[0])
  want = np.asarray(forward(one, tokens, positions), np.float32)
  got = np.asarray(forward(two, *sharding.shard_batch(two, tokens, positions)), np.float32)
  logits_error = float(np.abs(got - want).max() / np.abs(want).max())
  length = s.logits_length + s.new_tokens
  moa = MoAAttention(two_rule_windows(config, length), sink=SINK)
  prompts = [row.tolist() for row in tokens]
  want_tokens = generate(one, prompts, s.new_tokens, attention=moa, eos_id=())
  attention = ShardedMoAAttention(moa, mesh_of(2))
  got_tokens = generate(two, prompts, s.new_tokens, attention=attention, eos_id=())
  first = [
    next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
    for x, y in zip(got_tokens, want_tokens)
  ]
  return {
    "devices": 2,
    "logits_relative_error": logits_error,
    "logits_within_bf16": logits_error < BF16_LOGITS,
    "greedy_tokens_equal": got_tokens == want_tokens,
    "first_different_token": first,
    "new_tokens": s.new_tokens,
    "cache_balance": attention.balance_report(config, length),
  }


def profile_70b() -> dict:
  s = sizes()
  count = len(jax.devices())
  model = sharding.init_model(s.large, mesh_of(count))
  batch = profile_batch(s.large, s.profile_length, s.response)
  result = {
    "devices": count,
    "length": s.profile_length,
    **timed(lambda m=model: profile_once(m, batch, s), FLAGS.reps),
    "peak_bytes_per_device": peak_bytes(jax.devices()),
  }
  result["dry_run"] = dry_run(s.large, "profile", s.profile_length, (1, 1, count))
  return result


def generate_70b() -> dict:
  s = sizes()
  count = len(jax.devices())
  mesh = mesh_of(count)
  model = sharding.init_model(s.large, mesh)
  length = s.generate_length
  attention = ShardedMoAAttention(MoAAttention(two_rule_windows(s.large, length), sink=SINK), mesh)
  rng = np.random.default_rng(2)
  prompt = length - s.new_tokens
  tokens = rng.integers(3, s.large.vocab_size, (1, prompt)).astype(np.int32)
  positions = np.arange(prompt, dtype=np.int32)[None]
  empty = lambda: (attention.init_cache(s.large, 1, length),)
  run_prefill = lambda caches: prefill(model, tokens, positions, caches, attention=attention)
  run_decode = lambda logits, caches: decode(
    model, logits, [prompt], caches, s.new_tokens, attention=attention, eos_id=()
  )[0]
  prefill_time = timed(run_prefill, FLAGS.reps, empty)
  decode_time = timed(run_decode, FLAGS.reps, lambda: run_prefill(*empty()))
  return {
    "devices": count,
    "length": length,
    "prompt_tokens": prompt,
    "prefill": prefill_time,
    "decode": decode_time,
    "decode_per_token_s": decode_time["median_s"] / s.new_tokens,
    "median_s": prefill_time["median_s"] + decode_time["median_s"],
    "peak_bytes_per_device": peak_bytes(jax.devices()),
    "cache_balance": attention.balance_report(s.large, length),
    "dry_run": dry_run(s.large, "generate", length, (1, 1, count)),
  }


def scaling() -> dict:
  s = sizes()
  batch = profile_batch(s.small, s.profile_length, s.response)
  rows = []
  for count in (1, 2, 4, 8):
    if count > len(jax.devices()):
      break
    model = sharding.init_model(s.small, mesh_of(count))
    rows.append({"devices": count, **timed(lambda m=model: profile_once(m, batch, s), FLAGS.reps)})
    del model
  return {"length": s.profile_length, "rows": rows}


def run_child(phase: str) -> dict:
  """Run one phase in a fresh process (its own allocator peaks) and return its JSON."""
  args = [sys.executable, __file__, f"--child={phase}", f"--reps={FLAGS.reps}"]
  args += ["--smoke"] if FLAGS.smoke else []
  start = time.perf_counter()
  done = subprocess.run(args, capture_output=True, text=True)
  if done.returncode != 0:
    return {
      "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
      "seconds": time.perf_counter() - start,
    }
  return {
    **json.loads(done.stdout.strip().splitlines()[-1]),
    "seconds": time.perf_counter() - start,
  }


def main(_):
  if FLAGS.child:
    print(json.dumps({"phase": FLAGS.child, **globals()[FLAGS.child]()}))
    return
  unknown = [p for p in FLAGS.phases if p not in PHASES]
  if unknown:
    raise app.UsageError(f"unknown phases {unknown}; choose from {PHASES}")
  results = {
    "command": " ".join(["python", *sys.argv]),
    "device": str(jax.devices()[0]),
    "device_count": len(jax.devices()),
    "smoke": FLAGS.smoke,
    "phases": {},
  }
  for phase in FLAGS.phases:
    print(f"{phase} ...", flush=True)
    results["phases"][phase] = run_child(phase)
    atomic_write_text(FLAGS.out, json.dumps(results, indent=1) + "\n")
  for phase, r in results["phases"].items():
    if "error" in r:
      print(f"{phase:14s} error: {r['error']}")
    elif phase == "correctness":
      print(
        f"{phase:14s} logits rel. error {r['logits_relative_error']:.2e}, greedy tokens "
        f"equal {r['greedy_tokens_equal']} (first difference {r['first_different_token']})"
      )
    elif phase == "scaling":
      print(
        f"{phase:14s} "
        + ", ".join(f"{row['devices']} dev {row['median_s']:.3f} s" for row in r["rows"])
      )
    else:
      peak = r["peak_bytes_per_device"]
      predicted = r["dry_run"].get("peak")
      print(
        f"{phase:14s} {r['median_s']:.3f} s, "
        f"peak {'-' if peak is None else f'{peak / GB:.1f} GB'} per device, dry run "
        f"{'-' if predicted is None else f'{predicted / GB:.1f} GB'}"
      )


if __name__ == "__main__":
  app.run(main)
