"""Sweeps: expansion, gathering and launcher parameters on their own; the tiny sweep (three
KV budgets) end to end with the local launcher and, marked `slurm`, through a real single-node
SLURM cluster (tools/slurm/local_cluster.sh) via submitit: the profile computed once, a killed
point reported and redone alone, the same plans as the local launcher."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moa_jax.cli import load_config
from moa_jax.sweep import command, gather, hyper, jobs, launchers

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tools" / "slurm" / "local_cluster.sh"
TINY = "configs/sweep.py:tiny"
DENSITIES = (0.5, 0.625, 0.75)
NAMES = [f"density={d}" for d in DENSITIES]


# --- sweep expansion ---------------------------------------------------------------------------


def test_sweep_product_zip_chain():
  a = hyper.sweep("config.optimize.density", (0.25, 0.5))
  b = hyper.sweep("seed", (0, 1, 2))
  assert a == (((("config.optimize.density", 0.25),), (("config.optimize.density", 0.5),)))
  product = hyper.product([a, b])
  assert len(product) == 6 and product[1] == (("config.optimize.density", 0.25), ("seed", 1))
  zipped = hyper.zipit([b, hyper.sweep("calibration.seed_unused", ("x", "y", "z"))])
  assert zipped[2] == (("seed", 2), ("calibration.seed_unused", "z"))
  assert hyper.chain([a, b])[2:] == b
  with pytest.raises(ValueError, match="one length"):
    hyper.zipit([a, b])


def _sweep_config(sweep, variant="tiny"):
  config = load_config(f"configs/sweep.py:{variant}")
  with config.unlocked():
    config.sweep = sweep
  return config


def test_expand_names_configs_and_errors():
  config = _sweep_config(
    hyper.product(
      [
        hyper.sweep("config.optimize.density", (0.5, 0.75)),
        hyper.sweep("eval.lengths", ((256,), (256, 512))),
      ]
    )
  )
  points = hyper.expand(config)
  assert [p.name for p in points] == [
    "density=0.5-lengths=256",
    "density=0.5-lengths=256,512",
    "density=0.75-lengths=256",
    "density=0.75-lengths=256,512",
  ]
  assert points[3].config.optimize.density == 0.75 and points[3].config.eval.lengths == (256, 512)
  assert config.optimize.density == 0.5 and points[0].config.is_locked
  for run_field in hyper.RUN_FIELDS:
    assert run_field not in points[0].config
  # the same last component in two sections: full names
  both = hyper.expand(
    _sweep_config(hyper.zipit([hyper.sweep("seed", (0, 1)), hyper.sweep("eval.seed", (0, 1))]))
  )
  assert [p.name for p in both] == ["seed=0-eval.seed=0", "seed=1-eval.seed=1"]
  assert [p.name for p in hyper.expand(_sweep_config(()))] == ["base"]
  with pytest.raises(ValueError, match="'optimize.densty' is not a config field"):
    hyper.expand(_sweep_config(hyper.sweep("optimize.densty", (0.5,))))
  with pytest.raises(ValueError, match="'launcher' is not a config field"):
    hyper.expand(_sweep_config(hyper.sweep("launcher", ("slurm",))))
  with pytest.raises(ValueError, match="repeated points: density=0.5"):
    hyper.expand(_sweep_config(hyper.sweep("optimize.density", (0.5, 0.5))))
  with pytest.raises(ValueError, match="sweep value 'x' for optimize.density"):
    hyper.expand(_sweep_config(hyper.sweep("optimize.density", ("x",))))
  with pytest.raises(ValueError, match="not a \\(field, value\\) pair"):
    hyper.expand(_sweep_config(((("optimize.density",),),)))


def test_groups_share_stages_only_when_their_sections_agree(tmp_path):
  config = _sweep_config(
    hyper.product(
      [
        hyper.sweep("optimize.density", (0.5, 0.75)),
        hyper.sweep("profile.loss", ("nll", "log_odds")),
      ]
    )
  )
  points, tasks = command.plan_tasks(config, tmp_path)
  shared = [t for t in tasks if t.kind == "shared"]
  assert len(points) == 4 and len(shared) == 2  # one per profile loss
  for task in tasks:
    if task.kind == "point":
      cfg = task.args[0]
      assert task.after == f"shared/{jobs.group_key(cfg)}"
      assert Path(task.args[2]).name == jobs.group_key(cfg)
  assert json.loads((tmp_path / "sweep.json").read_text())["points"][0]["name"] == (
    "density=0.5-loss=nll"
  )


def test_link_stage_is_hard_links_and_replaces_a_different_stage(tmp_path):
  src, dst = tmp_path / "shared" / "profile", tmp_path / "point" / "profile"
  src.mkdir(parents=True)
  (src / "influence.npz").write_bytes(b"abc")
  (src / "COMPLETE.json").write_text('{"fingerprint": "k1"}')
  dst.mkdir(parents=True)
  (dst / "COMPLETE.json").write_text('{"fingerprint": "old"}')
  jobs.link_stage(src, dst)
  assert (dst / "influence.npz").stat().st_ino == (src / "influence.npz").stat().st_ino
  assert (dst / "COMPLETE.json").read_text() == '{"fingerprint": "k1"}'
  jobs.link_stage(src, dst)  # already the same stage: untouched
  assert not list(dst.parent.glob(".*partial*"))


def test_slurm_parameters():
  section = launchers.slurm_section()
  section.partition, section.extra, section.setup = "gpu", "account=abc, qos=high", ("a",)
  params = launchers.slurm_parameters(section)
  assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 1
  assert params["slurm_additional_parameters"] == {"account": "abc", "qos": "high"}
  assert params["slurm_setup"] == ["a"] and params["timeout_min"] == 120
  section.gpus_per_job, section.partition = 0, ""
  assert "gpus_per_node" not in launchers.slurm_parameters(section)
  section.extra = "account"
  with pytest.raises(ValueError, match="slurm.extra entry 'account' is not key=value"):
    launchers.slurm_parameters(section)
  section.extra, section.timeout_min = "", 1
  with pytest.raises(ValueError, match="timeout_min must be >= 2"):
    launchers.slurm_parameters(section)


def _fake_slurm_clients(folder: Path, sacct: str, squeue: str = "") -> None:
  """sacct and squeue scripts in `folder` printing the given text (a ! prefix: fail)."""
  folder.mkdir(exist_ok=True)
  for name, text in (("sacct", sacct), ("squeue", squeue)):
    fail = text.startswith("!")
    body = f"echo '{text[1:]}' >&2; exit 1" if fail else f"printf '%s' '{text}'"
    (folder / name).write_text(f'#!/bin/sh\necho "$@" >> {folder}/calls\n{body}\n')
    (folder / name).chmod(0o755)


def test_job_states_from_sacct_then_squeue(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  _fake_slurm_clients(
    bin_dir,
    "4|COMPLETED\n5_0|RUNNING\n5_[0-2,4%2]|PENDING\n6|CANCELLED by 0\n",
    "7|PENDING\n",
  )
  ids = ["4", "5_0", "5_1", "5_4", "6", "7", "8"]
  assert launchers.job_states(ids) == {
    "4": "COMPLETED",
    "5_0": "RUNNING",  # its own line, not the array's
    "5_1": "PENDING",
    "5_4": "PENDING",
    "6": "CANCELLED",
    "7": "PENDING",  # not in accounting yet: the controller's state
  }  # 8: unknown to both
  calls = (bin_dir / "calls").read_text().splitlines()
  assert calls == ["-X -n -P -o JobID,State -j 4,5,6,7,8", "-h -r -o %i|%T -j 7,8"]
  assert launchers.job_states([]) == {}
  # A cluster that does not answer: an error, never 'not running' (that would submit twice).
  monkeypatch.setattr(launchers.time, "sleep", lambda s: None)
  _fake_slurm_clients(bin_dir, "!sacct: error: slurmdbd: connection refused")
  with pytest.raises(ChildProcessError, match="sacct failed .*connection refused.*nothing is sub"):
    launchers.job_states(["4"])


# --- gathering ---------------------------------------------------------------------------------


def _fake_results(density: float, moa: float, uniform: float) -> dict:
  acc = {
    "dense": {"passkey": {"256": 1.0}},
    "uniform": {"passkey": {"256": uniform}},
    "moa": {"passkey": {"256": moa}},
  }
  ppl = {
    m: {"longtext": {"256": 10 / (v + 0.1)}}
    for m, v in (("dense", 1.0), ("uniform", uniform), ("moa", moa))
  }
  kv = {"dense": {"256": 1.0}, "uniform": {"256": density}, "moa": {"256": density - 0.01}}
  return {
    "summary": {"accuracy": acc, "perplexity": ppl},
    "meta": {"kv_density": kv, "config": {"eval": {"density": density}}},
  }


def test_gather_table_and_plot(tmp_path):
  results = {
    f"density={d}": ({"optimize.density": d}, _fake_results(d, m, u))
    for d, m, u in ((0.25, 0.5, 0.1), (0.5, 0.9, 0.4))
  }
  out = gather.write(tmp_path, results, {"density=0.75": "exit status 1; log: x.log"})
  rows = out["rows"]
  assert len([r for r in rows if r["method"] == "dense"]) == 2  # passkey + longtext, once
  moa = sorted(
    (r["kv_density"], r["accuracy"])
    for r in rows
    if r["method"] == "moa" and r["task"] == "passkey"
  )
  assert moa == [(0.24, 0.5), (0.49, 0.9)]
  table = (tmp_path / "sweep.md").read_text()
  assert "| passkey | 256 | moa | density=0.5 | 0.5 | 0.4900 | 0.900 |" in table
  assert "density=0.75: exit status 1; log: x.log" in table
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
  assert json.loads((tmp_path / "sweep_results.json").read_text())["failed"]


# --- the tiny sweep end to end ----------------------------------------------------------------


def _plans(workdir: Path) -> dict[str, dict]:
  plans = {}
  for name in NAMES:
    plan = json.loads((workdir / "points" / name / "plan.json").read_text())
    plan.pop("provenance", None)
    plans[name] = plan
  return plans


def _logs_with(workdir: Path, pattern: str, text: str) -> list[Path]:
  return [p for p in workdir.glob(pattern) if text in p.read_text(errors="replace")]


def _check_finished(workdir: Path, job_logs: str) -> None:
  """Three plans and an eval per point, the profile computed once, table and plot."""
  for name, density in zip(NAMES, DENSITIES):
    folder = workdir / "points" / name
    assert json.loads((folder / "plan.json").read_text())["kv_densities"]["256"] <= density
    result = json.loads((folder / "eval" / "results.json").read_text())
    assert set(result["meta"]["methods"]) == {"dense", "uniform", "moa"}
    assert result["meta"]["config"]["eval"]["density"] == density
    shared = next((workdir / "shared").iterdir())
    assert (folder / "profile" / "influence.npz").stat().st_ino == (
      shared / "profile" / "influence.npz"
    ).stat().st_ino
  assert len(_logs_with(workdir, job_logs, "profile: done in")) == 1
  assert len(_logs_with(workdir, job_logs, "profile: complete, skipped")) >= len(NAMES)
  gathered = json.loads((workdir / "sweep_results.json").read_text())
  assert gathered["points"] == sorted(NAMES) and not gathered["failed"]
  assert {(r["method"], r["task"]) for r in gathered["rows"]} == {
    (m, t) for m in ("dense", "uniform", "moa") for t in ("passkey", "longtext")
  }
  assert (workdir / "sweep.png").stat().st_size > 10_000
  assert "| longtext | 256 | dense |" in (workdir / "sweep.md").read_text()


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """One XLA compilation cache for every sweep of this module: the second run of the same
  programs compiles nothing (about half the CPU time of the tiny sweep)."""
  return str(tmp_path_factory.mktemp("xla_cache"))


def _tiny(xla_cache: str, launcher: str = "local", **overrides):
  config = load_config(TINY)
  with config.unlocked():
    config.compilation_cache, config.launcher = xla_cache, launcher
  for field, value in overrides.items():
    hyper._set(config, field, value)
  return config


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, xla_cache):
  """The tiny sweep with the local launcher (two processes at a time)."""
  workdir = tmp_path_factory.mktemp("sweep_local")
  status = command.run_sweep(_tiny(xla_cache), workdir)
  return workdir, status


@pytest.mark.slow
def test_tiny_sweep_local(local_sweep):
  workdir, status = local_sweep
  assert status["submitted"] == ["shared/" + next((workdir / "shared").iterdir()).name] + [
    f"points/{n}" for n in NAMES
  ]
  assert status["finished"] == sorted(NAMES) and not status["failed"]
  _check_finished(workdir, "logs/local/*.log")
  again = command.run_sweep(_tiny(""), workdir)
  assert again["submitted"] == [] and again["finished"] == sorted(NAMES)


@pytest.mark.slow
def test_failed_shared_job_fails_its_points_and_keeps_going(tmp_path, xla_cache):
  missing = tmp_path / "no_such_calibration.jsonl"
  status = command.run_sweep(_tiny(xla_cache, **{"calibration.path": str(missing)}), tmp_path)
  assert status["finished"] == [] and sorted(status["failed"]) == sorted(NAMES)
  shared_log = next((tmp_path / "logs" / "local").glob("shared-*.log"))
  assert str(missing) in shared_log.read_text()
  for why in status["failed"].values():
    assert "its shared job shared/" in why and str(shared_log) in why
  assert not list((tmp_path / "logs" / "local").glob("points-*.log"))  # never started
  assert "## Failed points" in (tmp_path / "sweep.md").read_text()


def test_sweep_command_bad_input_is_one_line(tmp_path):
  from moa_jax.__main__ import main

  for extra, message in (
    ((f"--workdir={tmp_path}", "--config.launcher=pbs"), "launcher"),
    ((f"--workdir={tmp_path}", "--config.slurm.extra=qos"), "slurm.extra"),
    ((), "--workdir"),
  ):
    with pytest.raises(SystemExit) as exit_:
      main(["moa_jax", "sweep", f"--config={TINY}", *extra])
    text = str(exit_.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text
  assert not list(tmp_path.iterdir())  # nothing written before the input is checked


# --- through a real SLURM ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
  """A single-node SLURM (started here unless one already runs; stopped after, also when tests
  fail). Skipped with the script's reason on a machine without root or apt."""
  was_running = (
    subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True).stdout.count("running")
    == 5
  )
  started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True)
  if started.returncode == 2:
    pytest.skip(started.stderr.strip())
  assert started.returncode == 0, started.stdout + started.stderr
  state = os.environ.get("MOA_SLURM_STATE", "/tmp/moa_slurm")
  previous = os.environ.get("SLURM_CONF")
  os.environ["SLURM_CONF"] = f"{state}/slurm.conf"
  try:
    yield
  finally:
    if previous is None:
      os.environ.pop("SLURM_CONF")
    else:
      os.environ["SLURM_CONF"] = previous
    if not was_running:
      pids = [int(f.read_text()) for f in Path(state).glob("*/*.pid")]
      subprocess.run([str(CLUSTER), "stop"], check=True, capture_output=True)
      assert len(pids) == 5 and not [p for p in pids if Path(f"/proc/{p}").exists()]


@contextlib.contextmanager
def _drained():
  """The test cluster's node drained (no job starts; running ones go on), resumed after."""
  node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout
  update = ["scontrol", "update", f"NodeName={node.strip()}"]
  subprocess.run([*update, "State=DRAIN", "Reason=moa_jax test"], check=True)
  try:
    yield
  finally:
    subprocess.run([*update, "State=RESUME"], check=True)


def _slurm_state(job_id: str) -> str:
  out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
  return out.stdout.strip()


def _wait_for(predicate, seconds: float, what: str):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.5)
  raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _start_sweep(workdir: Path, xla_cache: str, output: Path) -> subprocess.Popen:
  argv = [
    sys.executable,
    "-m",
    "moa_jax",
    "sweep",
    f"--config={TINY}",
    f"--workdir={workdir}",
    "--config.launcher=slurm",
    f"--config.compilation_cache={xla_cache}",
  ]
  with open(output, "w") as out:
    return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.slurm
def test_tiny_sweep_slurm_kill_rerun_and_same_plans(
  slurm_cluster, local_sweep, xla_cache, tmp_path
):
  workdir, record = tmp_path / "sweep", tmp_path / "sweep" / "logs" / "slurm" / "jobs.json"
  output, victim, second = tmp_path / "second.out", f"points/{NAMES[1]}", None
  try:
    # The command stops waiting (its jobs go on); the same command again waits for them. The
    # node is drained until then: the jobs stay pending whatever the second command's start-up
    # takes (on a loaded machine it took longer than the whole shared job).
    with _drained():
      first = _start_sweep(workdir, xla_cache, tmp_path / "first.out")
      try:
        ids = _wait_for(
          lambda: record.is_file() and json.loads(record.read_text()),
          300,
          "the sweep's jobs to be submitted",
        )
      finally:
        first.terminate()
        first.wait(timeout=60)
      assert len(ids) == 4 and all(f"points/{n}" in ids for n in NAMES)
      second = _start_sweep(workdir, xla_cache, output)
      _wait_for(
        lambda: "0 jobs submitted, 4 reattached" in output.read_text(),
        300,
        "the second run to take over the pending jobs",
      )
    _wait_for(lambda: _slurm_state(ids[victim]) == "RUNNING", 240, f"{victim} to run")
    subprocess.run(["scancel", ids[victim]], check=True)
    killed = time.monotonic()
    _wait_for(
      lambda: f"{victim} FAILED" in output.read_text(), 60, "the killed point to be reported"
    )
    assert time.monotonic() - killed < 60
    assert second.wait(timeout=300) == 1  # the others finish first
  finally:
    if second is not None and second.poll() is None:
      second.kill()
  text = output.read_text()
  failure = next(line for line in text.splitlines() if f"{victim} FAILED" in line)
  assert f"log: {workdir}/logs/slurm/{ids[victim]}/" in failure, failure
  assert f"error: 1 sweep points failed ({NAMES[1]}: " in text
  status = json.loads((workdir / "status.json").read_text())
  assert status["finished"] == [NAMES[0], NAMES[2]] and list(status["failed"]) == [NAMES[1]]
  # A re-run submits only the killed point; then nothing is left to submit.
  config = _tiny(xla_cache, "slurm")
  again = command.run_sweep(config, workdir)
  assert again["submitted"] == [victim] and not again["failed"], again
  after = json.loads(record.read_text())
  assert after[victim] != ids[victim] and {k: v for k, v in after.items() if k != victim} == {
    k: v for k, v in ids.items() if k != victim
  }  # the others ran once, in their first jobs
  _check_finished(workdir, "logs/slurm/*/*.out")
  assert command.run_sweep(config, workdir)["submitted"] == []
  assert _plans(workdir) == _plans(local_sweep[0])
