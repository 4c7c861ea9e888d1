"""Runs of several processes (hosts) through `jax.distributed`: start-up, who writes, barriers.

A run is one of several processes when SLURM started more than one task (`srun -n 2 ...`: JAX
reads the coordinator, process count and index from SLURM's environment), when the config's
`mesh` section names a coordinator (`--config.mesh.coordinator=127.0.0.1:1234
--config.mesh.num_processes=2 --config.mesh.process_id=0`, one command per process), or when
`mesh.distributed` is True (JAX detects the cluster). Every process then runs the same program
on the global mesh (`jax.devices()` lists all processes' devices); only process 0 writes files.
CPU devices exchange data through the gloo collectives, so tests run several processes on one
machine without accelerators.
"""

from __future__ import annotations

import os

import jax

# Tasks of this job step (srun sets it; a batch script's own step has one task even when the
# job has several), else of the job.
SLURM_TASKS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")


def requested(mesh_section=None) -> bool:
  """True when this run is meant to be one of several processes (see the module docstring)."""
  if mesh_section is not None and (mesh_section.distributed or mesh_section.coordinator):
    return True
  tasks = next((os.environ[name] for name in SLURM_TASKS if name in os.environ), "1")
  return int(tasks) > 1 and "SLURM_PROCID" in os.environ


def initialize(config=None) -> bool:
  """Join the other processes when the run asks for it (`requested`); True if it did.

  config: an experiment config (its `mesh` section, if any, is read) or None (environment only).
  Must run before any JAX computation; a second call does nothing.
  """
  section = config.get("mesh") if config is not None and hasattr(config, "get") else None
  if jax.distributed.is_initialized():
    return True
  if not requested(section):
    return False
  kwargs = {}
  if section is not None and section.coordinator:
    if section.num_processes < 1 or not 0 <= section.process_id < section.num_processes:
      raise ValueError(
        f"mesh.coordinator={section.coordinator!r} needs mesh.num_processes >= 1 "
        f"and 0 <= mesh.process_id < num_processes, got {section.num_processes} "
        f"and {section.process_id}"
      )
    kwargs = dict(
      coordinator_address=section.coordinator,
      num_processes=section.num_processes,
      process_id=section.process_id,
    )
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
  jax.distributed.initialize(**kwargs)
  return True


def fake_cpu_devices_env(count: int, environ=os.environ) -> dict[str, str]:
  """`environ` plus what makes JAX start with `count` CPU devices (set it before JAX starts
  its backends, or give it to a subprocess).

  XLA's CPU client runs each device's part of a program on one thread of a pool of
  max(cores, devices) threads, and a collective waits until every device's thread reaches it. With
  exactly `count` threads, one of them busy with other work (a transfer, the next program) leaves
  a device's part unstarted and the others wait forever; a pool of 2 x count threads keeps room.
  """
  flags = f"{environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
  return {
    **environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": flags.strip(),
    "PJRT_NPROC": str(max(os.cpu_count() or 1, 2 * count)),
  }


def is_writer() -> bool:
  """True on the one process that writes files (process 0; a single-process run)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier `name` (nothing to wait for alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
