"""A Llama on a device mesh: the `mesh` config section, parameter sharding rules, sharded loading
and initialisation, and batch placement.

The mesh has three axes (`AXES`): `data` (replicas of the model, each on its own share of the
batch), `fsdp` (the model dimension D of every weight is split over it; the batch is split over
it too) and `tensor` (Megatron-style tensor parallelism: attention over KV heads, the MLP over
its intermediate dimension F; the embeddings are split over the vocabulary V on both model
axes, D whole, which keeps the residual stream split over the batch rather than over D). Every
weight keeps HF's [out, in] layout:

    q/k/v_proj [heads * H, D] -> (tensor, fsdp)    o_proj [D, N * H] -> (fsdp, tensor)
    gate/up_proj [F, D]       -> (tensor, fsdp)    down_proj [D, F]  -> (fsdp, tensor)
    embed_tokens, lm_head [V, D] -> ((tensor, fsdp), None)   norms [D] -> replicated

The tensor axis must divide the KV heads K (each device then holds whole KV groups: K / tensor
KV heads with their G query heads each) and F; any other dimension an axis does not divide is
replicated over that axis instead (e.g. a tokenizer's odd vocabulary size).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)  # the batch is split over both (FSDP is data parallel over weights)

# HF parameter name pattern -> mesh axis (or None) per dimension of the [out, in] weight.
RULES = (
  (r"(q|k|v)_proj\.weight$", (TENSOR, FSDP)),
  (r"o_proj\.weight$", (FSDP, TENSOR)),
  (r"(gate|up)_proj\.weight$", (TENSOR, FSDP)),
  (r"down_proj\.weight$", (FSDP, TENSOR)),
  (r"(embed_tokens|lm_head)\.weight$", ((TENSOR, FSDP), None)),
  (r"norm\.weight$", (None,)),
)


def mesh_section(shape: Sequence[int] = (1, 1, 1)):
  """The `mesh` config section (an ml_collections ConfigDict) read by `mesh_from_section` and
  `moa_jax.distributed.initialize`."""
  from ml_collections import config_dict  # only configs need it (the GPU image lacks it)

  section = config_dict.ConfigDict()
  section.shape = tuple(shape)  # devices along (data, fsdp, tensor); one entry may be -1 (rest)
  # Multi-process runs: jax.distributed.initialize happens by itself under SLURM with more than
  # one task (srun -n 2 ...) or when `coordinator` is set (all three fields, e.g. 127.0.0.1:1234,
  # 2, 0); `distributed` forces it (cluster auto-detection by JAX).
  section.distributed = False
  section.coordinator = ""  # host:port of process 0
  section.num_processes = 0
  section.process_id = -1
  return section


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(
      f"mesh.shape must be 3 positive sizes for {AXES} (one may be -1), got {tuple(shape)}"
    )
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = max(len(devices) // known, 1)
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices; this run has "
      f"{len(devices)} ({devices[0].platform})"
    )
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def mesh_from_section(section) -> Mesh:
  """The mesh of a `mesh_section`."""
  return make_mesh(section.shape)


def config_mesh(config) -> Mesh | None:
  """The mesh of an experiment config's `mesh` section; None without one or for one device."""
  section = config.get("mesh") if hasattr(config, "get") else None
  if section is None or all(size == 1 for size in section.shape):
    return None
  mesh = mesh_from_section(section)
  return mesh if mesh.size > 1 else None


def check_fits_mesh(config: LlamaConfig, mesh: Mesh) -> None:
  """Raise a one-line ValueError unless the tensor axis divides the KV heads and the MLP."""
  tensor = mesh.shape[TENSOR]
  for field in ("num_kv_heads", "intermediate_size"):
    if getattr(config, field) % tensor:
      raise ValueError(
        f"mesh tensor axis {tensor} does not divide {field}="
        f"{getattr(config, field)}: choose a tensor size that does"
      )


def param_spec(name: str, shape: Sequence[int], mesh: Mesh) -> P:
  """The PartitionSpec of the parameter `name` (HF name) of this shape on `mesh`."""
  for pattern, axes in RULES:
    if re.search(pattern, name):
      if len(axes) != len(shape):
        raise ValueError(
          f"parameter {name!r} has shape {tuple(shape)}; its rule shards {len(axes)} dimensions"
        )
      return P(*(_fit(axis, size, mesh) for axis, size in zip(axes, shape)))
  raise ValueError(f"no sharding rule for parameter {name!r}")


def _fit(axis, size: int, mesh: Mesh):
  """The longest prefix of the axis (or axes) whose device count divides `size`, or None."""
  axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
  while axes and size % math.prod(mesh.shape[a] for a in axes):
    axes = axes[:-1]
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _abstract_state(config: LlamaConfig, seed: int = 0):
  return nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed))))


def _state_shardings(abstract_state, mesh: Mesh):
  """A State of NamedShardings beside an (abstract) parameter State."""
  return nnx.from_flat_state(
    [
      (
        path,
        var.replace(
          NamedSharding(mesh, param_spec(".".join(map(str, path)), var.get_value().shape, mesh))
        ),
      )
      for path, var in nnx.to_flat_state(abstract_state)
    ]
  )


def param_shardings(config: LlamaConfig, mesh: Mesh) -> dict[str, NamedSharding]:
  """HF parameter name -> NamedSharding of every parameter of a Llama with this config."""
  check_fits_mesh(config, mesh)
  _, abstract = _abstract_state(config)
  return {
    ".".join(map(str, path)): sharding.get_value()
    for path, sharding in nnx.to_flat_state(_state_shardings(abstract, mesh))
  }


def abstract_model_state(config: LlamaConfig, mesh: Mesh):
  """The parameter State as ShapeDtypeStructs carrying their shardings (no memory used)."""
  check_fits_mesh(config, mesh)
  _, abstract = _abstract_state(config)
  return nnx.from_flat_state(
    [
      (
        path,
        var.replace(
          jax.ShapeDtypeStruct(
            var.get_value().shape,
            var.get_value().dtype,
            sharding=NamedSharding(
              mesh, param_spec(".".join(map(str, path)), var.get_value().shape, mesh)
            ),
          )
        ),
      )
      for path, var in nnx.to_flat_state(abstract)
    ]
  )


def init_model(config: LlamaConfig, mesh: Mesh, seed: int = 0) -> Llama:
  """A randomly initialised Llama created sharded on the mesh (each device computes only its
  shards, nothing is ever whole on one device); equal to `Llama(config, rngs=nnx.Rngs(seed))`."""
  check_fits_mesh(config, mesh)
  graphdef, abstract = _abstract_state(config, seed)
  shardings = _state_shardings(abstract, mesh)
  state = jax.jit(
    lambda: nnx.split(Llama(config, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings
  )()
  return nnx.merge(graphdef, state)


def shard_model(model: Llama, mesh: Mesh) -> Llama:
  """The model with its parameters moved onto the mesh by the rules (for models already in
  memory; checkpoints load sharded through `load_pretrained(..., mesh=mesh)`)."""
  check_fits_mesh(model.config, mesh)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, _state_shardings(state, mesh)))


def read_sharded(handle, name: str, sharding: NamedSharding, dtype) -> jax.Array:
  """Tensor `name` of an open safetensors file read block by block onto its devices.

  Each distinct block that this process's devices hold is sliced out of the file (`get_slice`),
  cast to `dtype`, copied to every device holding it and released before the next block is
  read: beyond the placed shards the host holds one block (at most one tensor) at a time.
  """
  tensor = handle.get_slice(name)
  shape = tuple(tensor.get_shape())
  indices = sharding.addressable_devices_indices_map(shape)
  blocks: dict[tuple, list] = {}  # replicas of a block share one read
  for device, index in indices.items():
    blocks.setdefault(tuple((s.start, s.stop) for s in index), []).append(device)
  placed = {}
  for devices in blocks.values():
    block = np.asarray(tensor[indices[devices[0]]]).astype(dtype, copy=False)
    placed.update({device: jax.device_put(block, device) for device in devices})
    jax.block_until_ready([placed[device] for device in devices])
    del block
  return jax.make_array_from_single_device_arrays(
    shape, sharding, [placed[device] for device in indices]
  )


def model_mesh(model) -> Mesh | None:
  """The mesh a model's parameters live on, or None (a model on one device)."""
  leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


def batch_axes(mesh: Mesh, batch: int) -> tuple[str, ...] | None:
  """The batch axes among (data, fsdp) whose device count divides `batch` (both if possible)."""
  for axes in (BATCH_AXES, (DATA,), (FSDP,)):
    size = math.prod(mesh.shape[a] for a in axes)
    if size > 1 and batch % size == 0:
      return axes
  return None


def shard_batch(model, *arrays):
  """Arrays [B, ...] placed batch-split over (data, fsdp) of the model's mesh (unchanged when
  the model is on one device). Multi-process: every process passes the same global arrays."""
  mesh = model_mesh(model)
  if mesh is None:
    return arrays if len(arrays) != 1 else arrays[0]
  placed = []
  for x in arrays:
    x = np.asarray(x)
    spec = P(batch_axes(mesh, x.shape[0]), *([None] * (x.ndim - 1)))
    sharding = NamedSharding(mesh, spec)
    placed.append(jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i]))
  return tuple(placed) if len(placed) != 1 else placed[0]


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-process) array on every process's host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def device_bytes(tree) -> int:
  """The largest per-device byte count of a pytree of arrays or sharded ShapeDtypeStructs
  (arrays without a NamedSharding count whole on one device)."""
  per_device: dict[int, int] = {}
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    itemsize = jnp.dtype(x.dtype).itemsize
    if isinstance(sharding, NamedSharding):
      nbytes = math.prod(sharding.shard_shape(x.shape)) * itemsize
      for device in sharding.mesh.devices.flat:
        per_device[device.id] = per_device.get(device.id, 0) + nbytes
    else:
      per_device[-1] = per_device.get(-1, 0) + math.prod(x.shape) * itemsize
  return max(per_device.values(), default=0)
