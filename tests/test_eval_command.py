"""`python -m moa_jax eval` on a random tiny model: every task family, plans in both formats, a
killed run that resumes without recomputing its finished cells, and bad input as one line."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moa_jax import __main__ as entry
from moa_jax.cli import load_config
from moa_jax.eval.command import run_eval
from moa_jax.plans.plan import Plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "eval.py")
LONGBENCH_TINY = ROOT / "tests" / "data" / "longbench_tiny"


def tiny_config(*overrides):
  return load_config(f"{CONFIG}:tiny", overrides)


def write_plans(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """One plan for the tiny model (2 layers, 4 heads, 2 KV heads) as our JSON and the official."""
  plan = Plan(
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    alphas=np.array([[128.0, 0.0], [64.0, 192.0]]),
    betas=np.array([[0.0, 0.25], [0.5, 0.0]]),
    sink=64,
    block=64,
  )
  ours, official = directory / "plan.json", directory / "official.json"
  plan.save(ours)
  official.write_text(plan.to_official_json())
  return ours, official


def cell_files(workdir: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{relative path: (inode, mtime_ns)} of the finished cell files."""
  return {
    str(p.relative_to(workdir)): (p.stat().st_ino, p.stat().st_mtime_ns)
    for p in (workdir / "cells").rglob("*.json")
  }


@pytest.mark.slow
def test_killed_eval_resumes_without_recomputing_and_plans_in_both_formats(tmp_path):
  ours, official = write_plans(tmp_path)
  overrides = [
    "eval.tasks=passkey",
    "eval.lengths=256,",
    "eval.methods=dense",
    f"eval.plans=moa={ours},official={official}",
    "eval.with_ce=False",
    "eval.depths=0.5,",
    "eval.batch_size=1",
  ]
  workdir = tmp_path / "run"
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "moa_jax",
      "eval",
      f"--config={CONFIG}:tiny",
      *(f"--config.{o}" for o in overrides),
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 300
  while not cell_files(workdir) and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  _, stderr = process.communicate()
  assert process.returncode == -signal.SIGKILL, stderr[-2000:]
  finished = cell_files(workdir)
  assert 1 <= len(finished) < 3 and not (workdir / "results.json").exists()

  result = run_eval(tiny_config(*overrides), workdir, "pytest")
  cells = result["meta"]["cells"]
  assert cells["total"] == 3
  assert len(cells["reused"]) == len(finished)
  assert len(cells["computed"]) == 3 - len(finished)
  now = cell_files(workdir)
  assert len(now) == 3 and all(now[path] == stamp for path, stamp in finished.items())

  records = result["records"]
  assert {r["method"] for r in records} == {"dense", "moa", "official"}
  strip = lambda method: [
    {k: v for k, v in r.items() if k != "method"} for r in records if r["method"] == method
  ]
  assert strip("moa") == strip("official")  # the official JSON reads back the same rules
  assert result["meta"]["kv_density"]["moa"]["256"] < 1.0
  meta = json.loads((workdir / "results.json").read_text())["meta"]
  assert meta["command"] == "pytest" and meta["config"]["eval"]["tasks"] == ["passkey"]
  assert (workdir / "heatmap_passkey.png").is_file()
  assert "| moa |" in (workdir / "report.md").read_text()

  again = run_eval(tiny_config(*overrides), workdir)
  assert again["meta"]["cells"]["computed"] == [] and cell_files(workdir) == now


def test_longbench_and_longtext_cells(tmp_path):
  result = run_eval(
    tiny_config(
      "eval.tasks=longbench/hotpotqa,longtext",
      "eval.lengths=256,",
      f"eval.longbench.data_dir={LONGBENCH_TINY}",
      "eval.longbench.num_samples=2",
      "eval.longtext.num_documents=1",
    ),
    tmp_path,
  )
  by_cell = {(r["task"], r["method"]): r for r in result["records"]}
  assert set(by_cell) == {
    (t, m) for t in ("longbench/hotpotqa", "longtext") for m in ("dense", "uniform")
  }
  for method in ("dense", "uniform"):
    bench = by_cell[("longbench/hotpotqa", method)]
    assert bench["num_samples"] == 2 and 0 <= bench["score"] <= 100
    text = by_cell[("longtext", method)]
    assert text["accuracy"] is None and text["target_tokens"] == 16
    assert text["perplexity"] == pytest.approx(np.exp(text["ce"]))
  assert by_cell[("longtext", "dense")]["ce"] != by_cell[("longtext", "uniform")]["ce"]
  files = result["meta"]["longtext"]["files"]
  assert files[0]["name"] == "pydoc_data/topics.py" and len(files[0]["sha256"]) == 64
  assert result["summary"]["perplexity"]["dense"]["longtext"]["256"] > 1
  assert (tmp_path / "perplexity_vs_length.png").is_file()
  assert "LongBench score" in (tmp_path / "report.md").read_text()


def one_line_error(capsys, *overrides, workdir) -> str:
  argv = [
    "moa_jax",
    "eval",
    f"--config={CONFIG}:tiny",
    *(f"--config.{o}" for o in overrides),
    f"--workdir={workdir}",
  ]
  with pytest.raises(SystemExit) as exit_info:
    entry.main(argv)
  message = str(exit_info.value.code)
  assert message.startswith("error: ") and "\n" not in message
  assert not (workdir / "cells").exists()  # nothing was evaluated
  return message


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
  import datasets

  assert "unknown task 'lines2'" in one_line_error(capsys, "eval.tasks=lines2", workdir=tmp_path)
  other = Plan(
    num_layers=3, num_heads=4, num_kv_heads=2, alphas=np.zeros((3, 2)), betas=np.ones((3, 2))
  )
  other.save(tmp_path / "other.json")
  message = one_line_error(capsys, f"eval.plans=moa={tmp_path / 'other.json'}", workdir=tmp_path)
  assert "other.json" in message and "(3, 4, 2)" in message and "(2, 4, 2)" in message
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
  monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
  message = one_line_error(capsys, "eval.tasks=longbench/hotpotqa", workdir=tmp_path)
  assert "cannot load LongBench hotpotqa from the hub" in message
  assert "eval.longbench.data_dir" in message
