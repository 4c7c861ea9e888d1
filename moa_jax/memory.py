"""Memory plan: the per-device bytes of a run on a mesh, found without running it.

    python -m moa_jax plan-memory --config=configs/memory.py:llama-3-70b

Weights and caches are counted exactly from their abstract shapes (`eval_shape`) and shardings;
activations are the temporary buffers of the compiled programs (`memory_analysis` of the
program XLA builds for the mesh; on a machine with fewer devices than the mesh, for fake CPU
devices). The programs are those of the run: for `generate` a prefill of the prompt into the
sharded MoA cache (`ShardedMoAAttention`) and one decode step; for `profile` the lean path's
backward pass (dO of every layer, q, k, v recorded) and its tiled influence pass of one layer.
The attention kernels themselves (Pallas prefill/chunk/decode, cuDNN flash attention) are
opaque calls of their outputs' shapes: on the GPU they keep their working set on chip, while a
CPU compile of them (or of XLA's attention) would materialise T x S maps the GPU never holds.
XLA's CPU backend has no bf16/f16 matrix product and converts the weights to float32 first
(copies a GPU never makes, as large as the weights in float32), so on the CPU a bf16/f16 model's
model programs are compiled in float32 and their bytes scaled by the itemsize ratio (1/2): exact
for weights, caches and compute-dtype activations, half the size of float32-by-design buffers
(RMSNorm's float32 copy, logits). The influence pass is float32 by design: compiled as is.
A run whose peak exceeds the usable device memory is refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moa_jax.attention import cache as cache_lib
from moa_jax.attention.moa import MoAAttention
from moa_jax.attention.sharded import ShardedCache, ShardedMoAAttention
from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama, count_params
from moa_jax.profile.influence import block_influence_tiled
from moa_jax.profile.probes import OutputProbeAttention
from moa_jax.profile.profiler import response_loss
from moa_jax.workdir import atomic_write_text

TASKS = ("generate", "profile")
GB = 1e9


def _opaque(like, *operands):
  """A stand-in kernel: an opaque call reading `operands` and returning buffers shaped like
  `like` (a pytree of arrays / ShapeDtypeStructs). Only ever compiled, never run."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  zeros = lambda *_: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return jax.pure_callback(zeros, shapes, *operands)


class _OpaqueMoA(MoAAttention):
  """MoAAttention with opaque kernels (prefill, chunk and decode); the cache write is real."""

  def __call__(self, layer, q, k, v, q_pos, cache):
    out = _opaque(q, q, k, v, q_pos, cache.k, cache.v, cache.pos)
    return out, cache_lib.write(cache, k, v, q_pos)


@jax.custom_vjp
def _flash(q, k, v):
  return _opaque(q, q, k, v)


def _flash_forward(q, k, v):
  b, t, n, _ = q.shape
  out, lse = _opaque((q, jax.ShapeDtypeStruct((b, n, t), jnp.float32)), q, k, v)
  return out, (q, k, v, out, lse)


def _flash_backward(residuals, d_out):
  return _opaque(residuals[:3], *residuals, d_out)


_flash.defvjp(_flash_forward, _flash_backward)


class _OpaqueFlash:
  """FusedCausalAttention with an opaque flash kernel (saves out and the row statistics)."""

  def __call__(self, layer, q, k, v, q_pos, cache):
    return _flash(q, k, v), None


# XLA's CPU scheduler runs independent work concurrently by default, holding far more
# temporaries at once than a GPU's memory-aware schedule (the tiled influence pass: 2.5-4.5x);
# it is read when JAX starts its CPU backend.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _stats(lowered, scale: float = 1.0) -> dict[str, int]:
  """Per-device bytes of a lowered program once compiled (times `scale`): arguments, outputs,
  aliased, temporaries and peak = arguments + outputs - aliased + temporaries."""
  m = lowered.compile().memory_analysis()
  stats = {
    key: int(value * scale)
    for key, value in dict(
      arguments=m.argument_size_in_bytes,
      outputs=m.output_size_in_bytes,
      aliased=m.alias_size_in_bytes,
      temporaries=m.temp_size_in_bytes,
    ).items()
  }
  stats["peak"] = stats["arguments"] + stats["outputs"] - stats["aliased"] + stats["temporaries"]
  return stats


def _devices(count: int):
  """`count` devices to compile for: the default backend's, else (fake) CPU devices. Before JAX
  starts its backends, asks for `count` CPU devices and the memory-minimising CPU schedule."""
  from jax._src import xla_bridge

  if not xla_bridge.backends_are_initialized():
    if CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_SCHEDULER_FLAG}".strip()
    if jax.config.jax_num_cpu_devices < count:
      jax.config.update("jax_num_cpu_devices", count)
  for devices in (jax.devices(), jax.devices("cpu")):
    if len(devices) >= count:
      return devices[:count]
  raise ValueError(
    f"the mesh needs {count} devices to compile for; this process has "
    f"{len(jax.devices('cpu'))} CPU devices: run it with "
    f"XLA_FLAGS=--xla_force_host_platform_device_count={count}"
  )


def model_config(section) -> LlamaConfig:
  """The model's shapes: a preset (model.preset) or a checkpoint's config.json (model.path)."""
  dtype = section.dtype or None
  if section.preset:
    return LlamaConfig.preset(
      section.preset, **({} if dtype is None else dict(dtype=dtype, param_dtype=dtype))
    )
  from moa_jax.models.hf import read_hf_config, resolve_checkpoint_dir

  hf = read_hf_config(resolve_checkpoint_dir(section.path))
  return LlamaConfig.from_hf_dict(hf, dtype=dtype, param_dtype=dtype)


def _moa_windows(config, model: LlamaConfig):
  """(windows, sink) of the MoA attention: a plan's, or one uniform window per KV head at KV
  density `density`."""
  if config.plan:
    from moa_jax.plans.plan import Plan

    plan = Plan.load(config.plan).validate(model)
    return plan.windows, plan.sink
  window = max(int(config.density * config.length) - config.sink, 1)
  return np.full((model.num_layers, model.num_kv_heads), window), config.sink


def _abstract(shape, dtype, mesh, spec) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _generate_programs(
  config, model: LlamaConfig, mesh, graphdef, state, scale
) -> tuple[dict, dict]:
  windows, sink = _moa_windows(config, model)
  attention = ShardedMoAAttention(_OpaqueMoA(windows, sink=sink), mesh)
  b, length = config.batch_size, config.length
  specs = attention.specs(b)
  prompt = length - config.new_tokens
  step = config.prefill_chunk or prompt
  empty = jax.eval_shape(lambda: attention.init_cache(model, b, length))
  caches = lambda fresh: [  # the caches on the mesh, fresh (for prefill) or filled (decode)
    ShardedCache(
      tuple(_abstract(x.shape, x.dtype, mesh, specs["cache"]) for x in c.k),
      tuple(_abstract(x.shape, x.dtype, mesh, specs["cache"]) for x in c.v),
      tuple(_abstract(x.shape, x.dtype, mesh, specs["pos"]) for x in c.pos),
      c.shards,
      fresh,
    )
    for c in empty
  ]

  def forward(state, tokens, positions, caches):  # last-token logits and the caches
    lm = nnx.merge(graphdef, state)
    hidden, caches = lm.hidden_states(tokens, positions, attention=attention, caches=caches)
    return jnp.einsum(
      "bd,vd->bv", hidden[:, -1], lm.output_embedding(), preferred_element_type=jnp.float32
    ), caches

  program = jax.jit(forward, donate_argnums=3)
  rows = lambda t: _abstract((b, t), jnp.int32, mesh, specs["rows"])
  programs = {
    "prefill": _stats(program.lower(state, rows(step), rows(step), caches(True)), scale),
    "decode": _stats(program.lower(state, rows(1), rows(1), caches(False)), scale),
  }
  extra = dict(
    cache=int(sharding.device_bytes(caches(True)) * scale),
    cache_balance=attention.balance_report(model, length),
    prompt_tokens=prompt,
    prefill_tokens_per_call=step,
  )
  return programs, extra


def _profile_programs(
  config, model: LlamaConfig, mesh, graphdef, state, scale
) -> tuple[dict, dict]:
  b, t = config.batch_size, config.length
  rows_axes = sharding.batch_axes(mesh, b)
  rows = lambda *shape: _abstract((b, *shape), jnp.int32, mesh, P(rows_axes, None))
  n, k, h = model.num_heads, model.num_kv_heads, model.head_dim

  def backward(state, tokens, positions, hidden_index, weight):  # profiler.output_grads' pass
    def loss_fn(probes):
      attention = OutputProbeAttention(probes)
      attention.attention = _OpaqueFlash()
      lm = nnx.merge(graphdef, state)
      value = response_loss(lm, tokens, positions, hidden_index, weight, attention, config.loss)
      return value, [attention.records[layer] for layer in range(model.num_layers)]

    zeros = [jnp.zeros((b, t, n, h), model.dtype) for _ in range(model.num_layers)]
    return jax.grad(loss_fn, has_aux=True)(zeros)

  width = config.response_tokens
  weight = _abstract((b, width), jnp.float32, mesh, P(rows_axes, None))
  grads = jax.jit(backward).lower(state, rows(t), rows(t), rows(width), weight)
  dtype = jnp.bfloat16 if scale < 1 else model.dtype  # the records' dtype in the real run
  heads = lambda heads: _abstract(
    (b, t, heads, h), dtype, mesh, P(rows_axes, None, sharding.TENSOR, None)
  )
  influence = jax.jit(
    lambda q, k, v, d_out, lengths: block_influence_tiled(
      q, k, v, d_out, lengths, block=config.block, tile=config.tile
    ).sum(0)
  )
  tiled = influence.lower(
    heads(n), heads(k), heads(k), heads(n), _abstract((b,), jnp.int32, mesh, P(rows_axes))
  )
  programs = {"backward": _stats(grads, scale), "influence": _stats(tiled)}
  # The tiled pass runs layer after layer while every layer's records (the backward's
  # outputs) and the weights stay in memory.
  programs["influence"]["peak"] += programs["backward"]["outputs"] + int(
    sharding.device_bytes(state) * scale
  )
  return programs, dict(cache=0, records=programs["backward"]["outputs"])


@dataclasses.dataclass
class MemoryPlan:
  """Per-device bytes of one run (see the module docstring); `table()` prints it."""

  model: str
  params: int
  dtype: str
  mesh: tuple[int, ...]
  task: str
  batch_size: int
  length: int
  weights: int
  cache: int
  activations: int
  peak: int
  device_memory: int
  usable: int
  programs: dict
  details: dict

  @property
  def fits(self) -> bool:
    return self.peak <= self.usable

  def table(self) -> str:
    gb = lambda x: f"{x / GB:7.2f} GB" if x >= GB / 10 else f"{x / 1e6:7.2f} MB"
    lines = [
      f"{self.model} ({self.params / 1e9:.2f}B params, {self.dtype}), {self.task} at "
      f"{self.length} tokens x {self.batch_size}, mesh (data, fsdp, tensor) = {self.mesh}",
      f"  per device: weights {gb(self.weights)}  cache {gb(self.cache)}  "
      f"activations {gb(self.activations)}  peak {gb(self.peak)}  of "
      f"{gb(self.usable)} usable ({self.device_memory / GB:.0f} GB device)",
    ]
    for name, stats in self.programs.items():
      lines.append(
        f"  {name:9s} program: " + "  ".join(f"{key} {gb(value)}" for key, value in stats.items())
      )
    return "\n".join(lines)

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "fits": self.fits}


def plan_memory(config) -> MemoryPlan:
  """The memory plan of the run a configs/memory.py config describes."""
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r}; choose one of {TASKS}")
  shape = tuple(int(s) for s in config.mesh.shape)
  if any(s < 1 for s in shape):
    raise ValueError(f"plan-memory needs explicit mesh sizes, got mesh.shape={shape}")
  if config.task == "generate" and not 0 < config.new_tokens < config.length:
    raise ValueError(f"new_tokens must be in [1, length), got {config.new_tokens}")
  devices = _devices(math.prod(shape))
  mesh = sharding.make_mesh(shape, devices)
  model = model_config(config.model)
  compiled = model  # the model the programs are compiled for (see the module docstring)
  if devices[0].platform == "cpu" and jnp.dtype(model.dtype).itemsize < 4:
    compiled = model.replace(dtype="float32", param_dtype="float32")
  scale = jnp.dtype(model.dtype).itemsize / jnp.dtype(compiled.dtype).itemsize
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(compiled, rngs=nnx.Rngs(0))))
  state = sharding.abstract_model_state(compiled, mesh)
  build = _generate_programs if config.task == "generate" else _profile_programs
  programs, details = build(config, compiled, mesh, graphdef, state, scale)
  details["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  details["compiled_dtype"] = compiled.dtype
  device_memory = int(config.device_memory_gb * GB)
  return MemoryPlan(
    model=config.model.preset or str(config.model.path),
    params=count_params(model),
    dtype=model.param_dtype,
    mesh=shape,
    task=config.task,
    batch_size=config.batch_size,
    length=config.length,
    weights=sharding.device_bytes(sharding.abstract_model_state(model, mesh)),
    cache=details.pop("cache"),
    activations=max(stats["temporaries"] for stats in programs.values()),
    peak=max(stats["peak"] for stats in programs.values()),
    device_memory=device_memory,
    usable=int(device_memory * config.usable_fraction),
    programs=programs,
    details=details,
  )


def plan_memory_command(config, workdir: Path | None) -> MemoryPlan:
  """`python -m moa_jax plan-memory`: print the plan (and write workdir/memory_plan.json);
  a run that does not fit is refused with a one-line error."""
  from moa_jax import distributed, validate

  validate.plan_memory(config, workdir)
  plan = plan_memory(config)
  print(plan.table())
  if workdir is not None and distributed.is_writer():
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "memory_plan.json", json.dumps(plan.to_json(), indent=1) + "\n")
  if not plan.fits:
    raise ValueError(
      f"{plan.model} {plan.task} at {plan.length} tokens x {plan.batch_size} "
      f"on mesh {plan.mesh} needs {plan.peak / GB:.1f} GB per device, more than "
      f"the {plan.usable / GB:.1f} GB usable: use more devices, a smaller "
      f"batch_size or length (or prefill_chunk)"
    )
  return plan
