"""The model on a device mesh: sharding rules, the balanced split of MoA caches, and (in
subprocesses with 8 fake CPU devices, or two processes of 4 through jax.distributed) logits,
greedy MoA tokens and E_bar equal to one device's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import sharded_checks
from flax import nnx

from moa_jax import distributed
from moa_jax.attention.cache import make_layout
from moa_jax.attention.sharded import split_heads
from moa_jax.distributed import fake_cpu_devices_env
from moa_jax.models import sharding
from moa_jax.models.config import LlamaConfig
from moa_jax.models.hf import load_pretrained, save_pretrained
from moa_jax.models.llama import Llama

CHECKS = Path(__file__).with_name("sharded_checks.py")
RELATIVE = 1e-5  # float32: max |sharded - one device| / max |one device|


def run_checks(*args: str, devices: int) -> subprocess.Popen:
  # XLA's default collective abort (40 s) can fire from slowness alone on 2 busy cores; at 300 s
  # a real hang still ends with XLA's message naming the collective, before `finish` gives up.
  env = fake_cpu_devices_env(devices)
  env["XLA_FLAGS"] += (
    " --xla_cpu_collective_call_terminate_timeout_seconds=300"
    " --xla_cpu_collective_timeout_seconds=300"
  )
  return subprocess.Popen(
    [sys.executable, str(CHECKS), *args],
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )


def finish(*processes: subprocess.Popen, timeout: int = 600) -> None:
  """Wait for each process; on a failure or timeout kill them all (nothing leaks into the next
  test) and fail with the end of the output."""
  try:
    for process in processes:
      try:
        output, _ = process.communicate(timeout=timeout)
      except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
        pytest.fail(f"{process.args[2:]} still running after {timeout} s:\n{output[-3000:]}")
      assert process.returncode == 0, output[-3000:]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()


def test_fake_cpu_devices_env_gives_the_pool_room_beyond_one_thread_per_device():
  env = fake_cpu_devices_env(8, {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "HOME": "/root"})
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
  assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/root"
  assert int(env["PJRT_NPROC"]) >= 16


def test_make_mesh_and_its_errors():
  mesh = sharding.make_mesh((1, 1, -1))
  assert mesh.axis_names == sharding.AXES and mesh.devices.shape == (1, 1, jax.device_count())
  with pytest.raises(ValueError, match=r"needs 8 devices; this run has 1"):
    sharding.make_mesh((2, 2, 2))
  with pytest.raises(ValueError, match=r"mesh.shape must be 3 positive sizes"):
    sharding.make_mesh((1, 8))


def test_mesh_section_defaults():
  section = sharding.mesh_section()
  assert section.shape == (1, 1, 1) and not distributed.requested(section)
  section.coordinator = "127.0.0.1:1"
  assert distributed.requested(section)


def test_param_rules_on_a_mesh_shape():
  mesh = jax.sharding.AbstractMesh((2, 2, 4), sharding.AXES)
  spec = lambda name, shape: tuple(sharding.param_spec(name, shape, mesh))
  assert spec("model.layers.0.self_attn.k_proj.weight", (8 * 128, 4096)) == ("tensor", "fsdp")
  assert spec("model.layers.0.self_attn.o_proj.weight", (4096, 32 * 128)) == ("fsdp", "tensor")
  assert spec("model.layers.0.mlp.down_proj.weight", (4096, 14336)) == ("fsdp", "tensor")
  assert spec("lm_head.weight", (128256, 4096)) == (("tensor", "fsdp"), None)
  assert spec("lm_head.weight", (260, 4096)) == ("tensor", None)  # 8 does not divide 260
  assert spec("model.norm.weight", (4096,)) == (None,)
  with pytest.raises(ValueError, match="no sharding rule"):
    spec("model.rotary.weight", (4,))


def test_tensor_axis_must_divide_kv_heads():
  mesh = jax.sharding.AbstractMesh((1, 1, 4), sharding.AXES)
  with pytest.raises(ValueError, match=r"tensor axis 4 does not divide num_kv_heads=2"):
    sharding.check_fits_mesh(LlamaConfig.tiny(), mesh)


def test_split_heads_deals_mixed_windows_out_by_capacity():
  """8 KV heads, 2 devices: 3 wide and 5 narrow heads. Kept on their own devices, both devices
  need 3 wide slots of the 4 (device 0 holds 3 wide heads); dealt out, 2 wide + 2 narrow."""
  windows = np.repeat([900, 900, 900, 100, 100, 100, 100, 100], 2)  # [N] query heads, G = 2
  layout = make_layout(windows, 8, 1024, sink=64, slot_multiple=64)
  kept, dealt = split_heads(layout, 2, balance=False), split_heads(layout, 2)
  assert kept.used == dealt.used == 3 * 1024 + 5 * 192
  assert kept.allocated == 2 * (3 * 1024 + 192) and not kept.moves_heads
  assert dealt.allocated == 2 * (2 * 1024 + 2 * 192) and dealt.moves_heads
  assert sorted(h for row in dealt.heads for h in row) == list(range(8))
  for row, row_windows in zip(dealt.heads, dealt.windows):  # each local head keeps its windows
    assert list(row_windows) == [windows[2 * h + i] for h in row for i in range(2)]
  capacities = [g.capacity for g in dealt.local.groups for _ in g.heads]
  assert capacities == [1024, 1024, 192, 192]


def test_split_heads_keeps_uniform_plans_in_place():
  layout = make_layout(np.full(16, 300), 8, 1024, sink=64)
  split = split_heads(layout, 4)
  assert not split.moves_heads and split.allocated == split.used == 8 * 384


def test_sharded_matches_one_device(tmp_path):
  """Meshes 1x8, 2x4, 8x1 (8 fake CPU devices): logits, greedy tokens on the MoA cache and the
  profile's E_bar as on one device; a sharded checkpoint load stays within one tensor."""
  out = tmp_path / "mesh.json"
  finish(run_checks("mesh", str(out), devices=8))
  results = json.loads(out.read_text())
  assert results["devices"] == 8
  for shape, result in results["model"].items():
    assert result["logits"] < RELATIVE, shape
    assert result["tokens"], shape
  for shape, error in results["profile"].items():
    assert error < RELATIVE, shape
  assert results["plain_reference_tokens"] and results["generate_command"]
  assert results["init_model"] < 1e-6
  two_by_four = results["model"]["(1, 2, 4)"]["balance"]
  assert two_by_four["balanced"]["allocated_slots"] < two_by_four["contiguous"]["allocated_slots"]
  memory = results["load_memory"]
  assert memory["q_proj_spec"] == "P('tensor', 'fsdp')"
  assert memory["equal"] and memory["largest_tensor"] < memory["total_bytes"] / 2
  # One block (1/8 of a tensor) at a time: a loader that held a whole tensor would fail.
  assert memory["peak_beyond_held"] <= memory["largest_tensor"] / 2


@pytest.mark.slow
def test_sharded_pallas_kernels_match_the_reference(tmp_path):
  """MoA's Triton kernels (interpret mode) under shard_map on (1, 2, 4): prefill into the
  sharded cache and decode give the reference path's greedy tokens on one device."""
  out = tmp_path / "kernels.json"
  finish(run_checks("kernels", str(out), devices=8))
  result = json.loads(out.read_text())
  assert result["tokens"], result


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_one_process_logits(tmp_path):
  """Two processes of 4 CPU devices each, joined through jax.distributed on 127.0.0.1, load a
  checkpoint sharded on the global (1, 2, 4) mesh: the logits are one process's."""
  config = sharded_checks.config()
  model = Llama(config, rngs=nnx.Rngs(4))
  checkpoint = save_pretrained(model, config, tmp_path / "ckpt")
  coordinator = f"127.0.0.1:{free_port()}"
  out = tmp_path / "logits.npy"
  processes = [
    run_checks("process", str(out), str(checkpoint), coordinator, "2", str(i), devices=4)
    for i in range(2)
  ]
  finish(*processes, timeout=300)
  loaded, _ = load_pretrained(checkpoint)
  want = sharded_checks.logits(loaded, *sharded_checks.tokens())
  assert sharded_checks.relative_error(np.load(out), want) < RELATIVE


@pytest.mark.parametrize(
  "env, expected",
  [
    ({}, False),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, True),  # srun -n 2, an older SLURM
    ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, False),  # sbatch
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False),  # one submitit job
  ],
)
def test_slurm_tasks_ask_for_several_processes(monkeypatch, env, expected):
  for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.requested(sharding.mesh_section()) is expected
