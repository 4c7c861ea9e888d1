"""Checks run in a separate process with several fake CPU devices (tests/test_sharding.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_checks.py mesh OUT
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_checks.py kernels OUT
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_checks.py \
        process OUT CHECKPOINT COORDINATOR NUM_PROCESSES PROCESS_ID

`mesh` compares, on MODEL_MESHES and PROFILE_MESHES, the sharded model's logits, greedy tokens on
the MoA cache and the profile's E_bar with the same computation on one device, and measures the host
memory of loading a checkpoint onto a mesh; it writes the numbers to OUT (JSON). `kernels` runs
the Pallas Triton kernels (interpret mode) under shard_map against the reference. `process` is one
of several processes joined through jax.distributed: it loads CHECKPOINT sharded on the global
(1, 2, 4) mesh and process 0 writes the logits of `tokens()` to OUT (.npy).
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax import distributed
from moa_jax.attention.moa import MoAAttention
from moa_jax.attention.sharded import HeadShardedAttention, ShardedMoAAttention
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.cli import load_config
from moa_jax.generate import generate, generate_command
from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.models.hf import load_pretrained, save_pretrained
from moa_jax.models.llama import Llama
from moa_jax.profile.profiler import profile_model

# (data, fsdp, tensor): the model meshes 1x8, 2x4 and 8x1 over (fsdp, tensor), the profile's
# over (data, tensor) (its calibration samples are split over data).
MODEL_MESHES = ((1, 1, 8), (1, 2, 4), (1, 8, 1))
PROFILE_MESHES = ((1, 1, 8), (2, 1, 4), (8, 1, 1))
SINK = 4
REPO = Path(__file__).resolve().parent.parent
WINDOWS = np.array([[5, 40, 3, 12, 40, 40, 7, 9], [12, 3, 40, 40, 5, 5, 5, 5]])  # [L, K]


def config() -> LlamaConfig:
  """The tiny model with 8 KV heads (so that 8 devices can split them) and F = 128."""
  return LlamaConfig.tiny(num_heads=16, num_kv_heads=8, intermediate_size=128)


def tokens() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(1)
  return rng.integers(3, 256, (8, 24)).astype(np.int32), np.tile(
    np.arange(24, dtype=np.int32), (8, 1)
  )


def relative_error(got, want) -> float:
  """max |got - want| / max |want|."""
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())


def logits(model, tokens, positions) -> np.ndarray:
  tokens, positions = sharding.shard_batch(model, tokens, positions)
  return sharding.to_host(jax.jit(lambda m, t, p: m(t, p)[0])(model, tokens, positions))


def calibration() -> dict[int, CalibrationBucket]:
  rng = np.random.default_rng(2)
  s, n = 8, 96
  toks = rng.integers(3, 256, (s, n)).astype(np.int32)
  lengths = rng.integers(64, n + 1, s).astype(np.int32)
  mask = np.zeros((s, n), bool)
  for row, length in enumerate(lengths):
    mask[row, length - 16 : length] = True
    toks[row, length:] = 0
  return {n: CalibrationBucket(toks, mask, lengths)}


PROFILE = dict(block=32, batch_size=8, tile=64, progress=False, magnitude="blocks", loss="log_odds")


def load_memory(directory) -> dict:
  """Host memory (tracemalloc) beyond what stays allocated, over a sharded load."""
  mesh = sharding.make_mesh((1, 2, 4))
  load_pretrained(directory, mesh=mesh)  # first-call work (tracing, imports) out of the way
  tracemalloc.start()
  before = tracemalloc.get_traced_memory()[0]
  model, cfg = load_pretrained(directory, mesh=mesh)
  jax.block_until_ready(nnx.state(model))
  current, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  params = nnx.state(model, nnx.Param)
  largest = max(x.nbytes for x in jax.tree.leaves(params))
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  specs = {
    ".".join(map(str, path)): str(var.get_value().sharding.spec)
    for path, var in nnx.to_flat_state(params)
  }
  whole, _ = load_pretrained(directory)
  equal = all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(whole, nnx.Param)))
  )
  return dict(
    peak_beyond_held=peak - current,
    held=current - before,
    largest_tensor=largest,
    total_bytes=total,
    q_proj_spec=specs["model.layers.0.self_attn.q_proj.weight"],
    equal=equal,
  )


def mesh_checks(out: str) -> None:
  cfg = config()
  model = Llama(cfg, rngs=nnx.Rngs(0))
  toks, pos = tokens()
  want_logits = logits(model, toks, pos)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 256, n).tolist() for n in (37, 20, 9, 30)]
  moa = MoAAttention(WINDOWS, sink=SINK, impl="reference", slot_multiple=16)
  want_tokens = generate(model, prompts, 8, attention=moa, eos_id=())
  want_profile = profile_model(model, cfg, calibration(), **PROFILE)
  results = dict(devices=jax.device_count(), model={}, profile={})
  for shape in MODEL_MESHES:
    mesh = sharding.make_mesh(shape)
    sharded = sharding.shard_model(model, mesh)
    attention = ShardedMoAAttention(moa, mesh)
    results["model"][str(shape)] = dict(
      logits=relative_error(logits(sharded, toks, pos), want_logits),
      tokens=generate(sharded, prompts, 8, attention=attention, eos_id=()) == want_tokens,
      balance=attention.balance_report(cfg, 64 + 8),
    )
  mesh = sharding.make_mesh(MODEL_MESHES[1])
  sharded = sharding.shard_model(model, mesh)
  results["plain_reference_tokens"] = (
    generate(sharded, prompts, 8, attention=HeadShardedAttention(moa, mesh), eos_id=())
    == want_tokens
  )
  command = lambda *overrides: [
    r["new_ids"]
    for r in generate_command(
      load_config(f"{REPO}/configs/generate.py:tiny", ["max_new_tokens=4", *overrides]), None
    )
  ]
  results["generate_command"] = command("mesh.shape=(1,4,2)") == command()
  initialised = sharding.init_model(cfg, sharding.make_mesh(MODEL_MESHES[0]), seed=0)
  results["init_model"] = max(
    float(jnp.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(nnx.state(initialised)), jax.tree.leaves(nnx.state(model)))
  )
  for shape in PROFILE_MESHES:
    sharded = sharding.shard_model(model, sharding.make_mesh(shape))
    got = profile_model(sharded, cfg, calibration(), **PROFILE)
    results["profile"][str(shape)] = max(
      relative_error(got[n], want_profile[n]) for n in want_profile
    )
  big = cfg.replace(vocab_size=8192, hidden_size=256)  # embeddings 8 MiB, 16 MiB in all layers
  directory = save_pretrained(
    Llama(big, rngs=nnx.Rngs(5)), big, f"{out}.checkpoint", max_shard_bytes=4 << 20
  )
  results["load_memory"] = load_memory(directory)
  with open(out, "w") as f:
    json.dump(results, f, indent=1)


def kernel_check(out: str) -> None:
  """The Pallas kernels (Triton, interpret mode) under shard_map on (1, 2, 4): the greedy tokens
  of the reference path on one device."""
  model = Llama(config(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 256, n).tolist() for n in (37, 20)]
  moa = lambda impl: MoAAttention(WINDOWS, sink=SINK, impl=impl, interpret=True, slot_multiple=16)
  want = generate(model, prompts, 4, attention=moa("reference"), eos_id=())
  mesh = sharding.make_mesh((1, 2, 4))
  got = generate(
    sharding.shard_model(model, mesh),
    prompts,
    4,
    attention=ShardedMoAAttention(moa("triton"), mesh),
    eos_id=(),
  )
  with open(out, "w") as f:
    json.dump({"tokens": got == want, "got": got, "want": want}, f)


def process_check(
  out: str, checkpoint: str, coordinator: str, num_processes: str, process_id: str
) -> None:
  section = sharding.mesh_section((1, 2, 4))
  section.coordinator = coordinator
  section.num_processes = int(num_processes)
  section.process_id = int(process_id)
  assert distributed.initialize({"mesh": section})
  mesh = sharding.mesh_from_section(section)
  model, _ = load_pretrained(checkpoint, mesh=mesh)
  result = logits(model, *tokens())
  if distributed.is_writer():
    np.save(out, result)
  distributed.barrier("written")


if __name__ == "__main__":
  {"mesh": mesh_checks, "kernels": kernel_check, "process": process_check}[sys.argv[1]](
    *sys.argv[2:]
  )
