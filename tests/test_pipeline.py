"""The compress command end to end on the tiny config: runs, resumes after a kill, writes a plan
that loads and validates; stage outputs are atomic."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moa_jax.cli import load_config
from moa_jax.models.loading import load_model
from moa_jax.plans.plan import Plan
from moa_jax.workdir import Workdir

REPO = Path(__file__).resolve().parent.parent
COMPRESS = [sys.executable, "-m", "moa_jax", "compress", "--config=configs/compress.py:tiny"]


def _run(workdir, *extra, timeout=300):
  return subprocess.run(
    [*COMPRESS, f"--workdir={workdir}", *extra],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=timeout,
  )


@pytest.mark.slow
def test_compress_resumes_after_kill_and_writes_a_valid_plan(tmp_path):
  workdir = tmp_path / "run"
  process = subprocess.Popen(
    [*COMPRESS, f"--workdir={workdir}"],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 240
  while not (workdir / "calibration" / "COMPLETE.json").exists():
    assert process.poll() is None, "compress exited before finishing its calibration stage"
    assert time.time() < deadline, "calibration stage did not complete in time"
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (workdir / "plan.json").exists()
  leftovers = [p.name for p in workdir.iterdir() if p.name.startswith(".")]
  assert leftovers == [] or all(".partial-" in name for name in leftovers)

  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "calibration: complete, skipped" in result.stdout
  assert not [p for p in workdir.iterdir() if ".partial-" in p.name]
  config = load_config("configs/compress.py:tiny")
  model, _, _ = load_model(config.model)
  plan = Plan.load(workdir / "plan.json").validate(model.config)
  budget, lower = config.optimize.density, config.optimize.lower
  for n in config.optimize.constraint_lengths:
    assert lower * budget - 1e-9 <= plan.kv_density(n) <= budget + 1e-9
  assert (workdir / "report.md").read_text().startswith("# MoA compression report")
  assert json.loads((workdir / "plan.json").read_text())["provenance"]["calibration"]

  again = _run(workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in ("calibration", "profile", "optimize", "choose"):
    assert f"{stage}: complete, skipped" in again.stdout


def test_compress_needs_a_workdir():
  result = subprocess.run(COMPRESS, cwd=REPO, text=True, capture_output=True, timeout=120)
  assert result.returncode != 0
  assert "compress needs --workdir" in result.stderr


def test_unknown_model_preset_is_a_clear_error(tmp_path):
  result = _run(tmp_path, "--config.model.preset=llama-9-giant", timeout=120)
  assert result.returncode != 0
  assert "llama-9-giant" in result.stderr.strip().splitlines()[-1]


def test_stage_is_atomic_and_keyed(tmp_path):
  work = Workdir(tmp_path)
  with pytest.raises(RuntimeError):
    with work.stage("profile", "k1") as out:
      (out / "influence.npz").write_text("half")
      raise RuntimeError("killed mid-stage")
  assert not work.path("profile").exists()
  assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
  with work.stage("profile", "k1") as out:
    (out / "influence.npz").write_text("whole")
  assert work.is_complete("profile", "k1") and not work.is_complete("profile", "k2")
  with work.stage("profile", "k2") as out:
    (out / "influence.npz").write_text("new")
  assert (work.path("profile") / "influence.npz").read_text() == "new"
