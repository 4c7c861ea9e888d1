"""The memory plan (dry run): exact weights and cache bytes, compiled activations, refusal of a run
that cannot fit, and the CLI on a mesh of fake CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moa_jax.cli import load_config
from moa_jax.memory import plan_memory, plan_memory_command
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import count_params

ONE_DEVICE = ["mesh.shape=(1,1,1)"]


def test_generate_plan_counts_weights_and_cache_exactly():
  config = load_config("configs/memory.py:tiny", ONE_DEVICE)
  plan = plan_memory(config)
  model = LlamaConfig.tiny()
  assert plan.weights == count_params(model) * 4  # float32
  # Uniform stand-in plan: window 0.5 * 512 - 64 = 192, capacity 64 + 192 = 256 slots per head.
  capacity = 256
  kv = model.num_layers * model.num_kv_heads * capacity * model.head_dim * 2 * 4  # k and v
  assert plan.cache == kv + model.num_layers * capacity * 4  # + int32 positions, one group
  assert set(plan.programs) == {"prefill", "decode"} and plan.fits
  assert 0 < plan.activations < plan.peak
  assert plan.peak >= plan.weights + plan.cache


def test_profile_plan_holds_every_layers_records():
  config = load_config("configs/memory.py:tiny", ONE_DEVICE + ["task=profile", "length=256"])
  plan = plan_memory(config)
  model = LlamaConfig.tiny()
  t, n, k, h = 256, model.num_heads, model.num_kv_heads, model.head_dim
  records = model.num_layers * t * h * (2 * n + 2 * k) * 4  # dO, q (N heads), k, v (K heads)
  backward = plan.programs["backward"]
  assert records <= backward["outputs"] < records + 1024  # + XLA's output tuple pointers
  assert plan.programs["influence"]["peak"] >= records + plan.weights


def test_a_run_that_does_not_fit_is_refused_in_one_line(capsys):
  config = load_config("configs/memory.py:tiny", ONE_DEVICE + ["device_memory_gb=0.0001"])
  with pytest.raises(
    ValueError,
    match=r"^tiny generate at 512 tokens x 1 on mesh \(1, 1, 1\) "
    r"needs 0\.0 GB per device, more than the 0\.0 GB usable",
  ):
    plan_memory_command(config, None)
  assert "per device: weights" in capsys.readouterr().out


def test_cli_plans_a_mesh_of_fake_cpu_devices(tmp_path):
  """A fresh process: the command asks JAX for 8 CPU devices itself (mesh (2, 2, 2))."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "moa_jax",
      "plan-memory",
      "--config=configs/memory.py:tiny",
      f"--workdir={tmp_path}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((tmp_path / "memory_plan.json").read_text())
  assert result["mesh"] == [2, 2, 2] and result["fits"]
  # tensor 2 splits the 2 KV heads: each device holds half of the one-device cache.
  assert np.isclose(result["cache"], 2 * 256 * 16 * 2 * 4 * 1 + 2 * 256 * 4)
