"""experiments/bench_multi_gpu.py's CPU smoke mode: every phase runs on 8 fake CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "bench_multi_gpu.py"


@pytest.mark.slow
def test_smoke_mode_runs_every_phase(tmp_path):
  out = tmp_path / "multi_gpu.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
    [sys.executable, str(SCRIPT), "--smoke", "--reps=1", f"--out={out}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["smoke"] and result["device_count"] == 8
  phases = result["phases"]
  assert not [name for name, phase in phases.items() if "error" in phase], phases
  assert phases["correctness"]["greedy_tokens_equal"]
  assert phases["correctness"]["logits_within_bf16"]
  assert [row["devices"] for row in phases["scaling"]["rows"]] == [1, 2, 4, 8]
  assert phases["generate_70b"]["decode_per_token_s"] > 0
  assert phases["profile_70b"]["median_s"] > 0
