"""`python -m moa_jax sweep --config=configs/sweep.py[:variant] --workdir=DIR`: a sweep of
compress (+ eval) runs, on this machine or on SLURM (`--config.launcher=slurm`).

The sweep is the config's `sweep` field (`moa_jax.sweep.hyper`). Points that share model, seed,
calibration and profile share one job for those stages; every point is then its own job
(`moa_jax.sweep.jobs`). A re-run of the same command runs only what is not finished; a failed
point is reported with its log and the others are kept. Layout of DIR:

  sweep.json                  the points (name, overrides) and their groups
  shared/<group>/             calibration/, profile/ and eval/ (dense) of a group
  points/<name>/              the point's compress workdir (plan.json, report.md), eval/, DONE.json
  logs/local/, logs/slurm/    one log per job
  sweep_results.json, sweep.md, sweep.png   the gathered table and plot
  status.json                 submitted, finished and failed points of the last run
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moa_jax import validate
from moa_jax.sweep import gather, hyper, jobs, launchers
from moa_jax.workdir import atomic_write_text


def _log(message: str) -> None:
  print(f"[moa_jax] sweep: {message}", flush=True)


def plan_tasks(config, workdir: Path) -> tuple[list[hyper.SweepPoint], list[launchers.Task]]:
  """The sweep's points and the tasks still to run (shared jobs first)."""
  points = hyper.expand(config)
  cache = str((workdir / config.compilation_cache).resolve()) if config.compilation_cache else ""
  groups: dict[str, list[hyper.SweepPoint]] = {}
  for point in points:
    groups.setdefault(jobs.group_key(point.config), []).append(point)
  tasks = []
  for key, members in groups.items():
    shared = workdir / "shared" / key
    todo = [
      p for p in members if not jobs.is_done(workdir / "points" / p.name, jobs.point_key(p.config))
    ]
    if not todo:
      continue
    after = None
    if not jobs.is_done(shared, jobs.shared_key(members[0].config)):
      after = f"shared/{key}"
      tasks.append(launchers.Task(after, "shared", (members[0].config, str(shared), cache)))
    tasks += [
      launchers.Task(
        f"points/{p.name}",
        "point",
        (p.config, str(workdir / "points" / p.name), str(shared), cache),
        after,
      )
      for p in todo
    ]
  atomic_write_text(
    workdir / "sweep.json",
    json.dumps(
      {
        "points": [
          {"name": p.name, "overrides": p.overrides, "group": jobs.group_key(p.config)}
          for p in points
        ]
      },
      indent=1,
      default=str,
    ),
  )
  return points, tasks


def run_sweep(config, workdir: str | Path) -> dict[str, Any]:
  """Run what is not finished of the sweep in `config` under `workdir`, gather the results;
  returns {submitted (jobs started by this run), finished, failed: {point: why and log}}."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  launcher = launchers.launcher(config, workdir / "logs")
  points, tasks = plan_tasks(config, workdir)
  finished_before = len(points) - sum(t.kind == "point" for t in tasks)
  _log(
    f"{len(points)} points, {finished_before} finished; running {len(tasks)} jobs "
    f"({config.launcher})"
  )

  def report(name: str, outcome: launchers.Outcome) -> None:
    if outcome.ok:
      _log(f"{name} finished")
    else:
      _log(f"{name} FAILED ({outcome.detail}); log: {outcome.log}")

  outcomes, submitted = launcher.run(tasks, report) if tasks else ({}, [])
  results, failed = {}, {}
  for point in points:
    folder = workdir / "points" / point.name
    if jobs.is_done(folder, jobs.point_key(point.config)):
      done = json.loads((folder / jobs.DONE).read_text())
      if "results" in done:
        results[point.name] = (point.overrides, json.loads(Path(done["results"]).read_text()))
    else:
      outcome = outcomes.get(f"points/{point.name}")
      failed[point.name] = f"{outcome.detail}; log: {outcome.log}" if outcome else "not run"
  gather.write(workdir, results, failed)
  status = {
    "submitted": submitted,
    "finished": sorted(set(p.name for p in points) - set(failed)),
    "failed": failed,
  }
  atomic_write_text(workdir / "status.json", json.dumps(status, indent=1) + "\n")
  _log(
    f"{len(status['finished'])} of {len(points)} points finished; table {workdir / 'sweep.md'}"
    f", plot {workdir / 'sweep.png'}"
  )
  return status


def sweep_command(config, workdir: Path | None) -> dict[str, Any]:
  """`python -m moa_jax sweep --config=configs/sweep.py[:variant] --workdir=DIR`."""
  validate.sweep(config, workdir)
  status = run_sweep(config, workdir)
  if status["failed"]:
    details = "; ".join(f"{name}: {why}" for name, why in sorted(status["failed"].items()))
    raise SystemExit(
      f"error: {len(status['failed'])} sweep points failed ({details}); the same "
      "command re-runs only those"
    )
  return status
