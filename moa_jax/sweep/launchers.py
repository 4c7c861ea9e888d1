"""Launchers: run a sweep's tasks on this machine (a pool of processes) or on SLURM (submitit).

A task is a job function of `moa_jax.sweep.jobs` with its arguments and, for a point whose
shared job runs in the same launch, the name of that job (`after`). `run(tasks, report)` blocks
until every task has ended and returns an Outcome per task and the names of the tasks it
started (not those it found still running); `report(name, outcome)` is called as each one
ends. A failed task never stops the others; tasks that wait for a failed one fail too.

SLURM: the shared jobs are submitted one by one, the points of each group as one job array with
`--dependency=afterok:<shared job>`; states are read through sacct every `poll_s` seconds, so a
job killed outside (scancel, out of memory, node failure) is reported as failed within about
`poll_s` + 10 seconds. Job ids go to DIR/logs/slurm/jobs.json: a re-run while jobs of the last
run are still pending or running waits for those instead of submitting them again (their states
from one sacct call, squeue for jobs accounting has not recorded yet; when neither answers,
nothing is submitted).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moa_jax.workdir import atomic_write, atomic_write_text

ACTIVE_STATES = (
  "PENDING",
  "RUNNING",
  "REQUEUED",
  "COMPLETING",
  "CONFIGURING",
  "SUSPENDED",
  "RESIZING",
  "READY",
)


@dataclasses.dataclass(frozen=True)
class Task:
  """name: unique ('shared/<group>', 'points/<point>'); kind: 'shared' or 'point' (a function of
  moa_jax.sweep.jobs); args: its arguments; after: the task it waits for, or None."""

  name: str
  kind: str
  args: tuple
  after: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
  ok: bool
  log: str  # where the task's output went
  detail: str = ""  # why it failed


Report = Callable[[str, Outcome], None]


def _safe(name: str) -> str:
  return name.replace("/", "-")


def _last_line(path: Path) -> str:
  try:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
  except OSError:
    return ""
  lines = [line for line in lines if line]
  return lines[-1][:300] if lines else ""


class LocalLauncher:
  """At most `workers` tasks at a time, each in a fresh `python -m moa_jax.sweep.jobs`
  process with its output in DIR/logs/local/<task>.log."""

  def __init__(self, folder: Path, workers: int = 1, poll_s: float = 0.5):
    if workers < 1:
      raise ValueError(f"local.workers must be >= 1, got {workers}")
    self.folder, self.workers, self.poll_s = Path(folder), workers, poll_s

  def run(self, tasks: Sequence[Task], report: Report) -> tuple[dict[str, Outcome], list[str]]:
    from moa_jax.sweep import jobs

    self.folder.mkdir(parents=True, exist_ok=True)
    pending, running, outcomes, started = list(tasks), {}, {}, []

    def finish(name: str, outcome: Outcome) -> None:
      outcomes[name] = outcome
      report(name, outcome)

    try:
      while pending or running:
        for task in list(pending):
          if len(running) >= self.workers:
            break
          if task.after is not None and task.after not in outcomes:
            continue
          pending.remove(task)
          if task.after is not None and not outcomes[task.after].ok:
            finish(
              task.name,
              Outcome(False, outcomes[task.after].log, f"its shared job {task.after} failed"),
            )
            continue
          spec = self.folder / f"{_safe(task.name)}.pkl"
          atomic_write(spec, lambda f, task=task: pickle.dump((task.kind, task.args), f))
          log = self.folder / f"{_safe(task.name)}.log"
          with open(log, "w") as out:
            process = subprocess.Popen(
              [sys.executable, "-m", jobs.__name__, str(spec)],
              stdout=out,
              stderr=subprocess.STDOUT,
              stdin=subprocess.DEVNULL,
            )
          running[task.name] = (process, log)
          started.append(task.name)
        for name, (process, log) in list(running.items()):
          code = process.poll()
          if code is not None:
            del running[name]
            detail = "" if code == 0 else f"exit status {code}: {_last_line(log)}"
            finish(name, Outcome(code == 0, str(log), detail))
        time.sleep(self.poll_s)
    finally:
      for process, _ in running.values():  # interrupted: stop the processes we started
        process.terminate()
        process.wait()
    return outcomes, started


def local_section():
  """The `local` section of a sweep config: how many jobs run at a time on this machine."""
  from ml_collections import config_dict

  s = config_dict.ConfigDict()
  s.workers = 1  # each job uses every core (XLA's threads): more helps only when jobs wait
  return s


def slurm_section():
  """The `slurm` section of a sweep config: the resources of every job (shared and points)."""
  from ml_collections import config_dict

  s = config_dict.ConfigDict()
  s.partition = ""  # '' = the cluster's default partition
  s.timeout_min = 120  # per job (>= 2)
  s.mem_gb = 32.0
  s.cpus_per_job = 8
  s.gpus_per_job = 1  # 0: CPU jobs
  s.max_parallel = 0  # points running at once (0: as many as SLURM schedules)
  s.extra = ""  # more sbatch options, 'key=value,key=value' (e.g. 'account=abc,qos=high')
  s.setup = ()  # shell lines run before each job (e.g. 'module load cuda')
  return s


def slurm_parameters(section) -> dict[str, Any]:
  """submitit AutoExecutor parameters of the config's `slurm` section."""
  extra = {}
  for entry in [e.strip() for e in section.extra.split(",") if e.strip()]:
    key, sep, value = entry.partition("=")
    if not sep or not key.strip():
      raise ValueError(
        f"slurm.extra entry {entry!r} is not key=value (sbatch option without"
        " the leading --, e.g. 'account=abc,qos=high')"
      )
    extra[key.strip()] = value.strip()
  if section.timeout_min < 2:  # submitit's default USR2 signal 90 s before the end fires at once
    raise ValueError(f"slurm.timeout_min must be >= 2, got {section.timeout_min}")
  params = dict(
    timeout_min=section.timeout_min,
    mem_gb=section.mem_gb,
    cpus_per_task=section.cpus_per_job,
    slurm_additional_parameters=extra,
    slurm_setup=list(section.setup),
    slurm_array_parallelism=section.max_parallel or 256,
  )
  if section.gpus_per_job:
    params["gpus_per_node"] = section.gpus_per_job
  if section.partition:
    params["slurm_partition"] = section.partition
  return params


def _slurm_output(argv: list[str], tries: int = 3) -> str:
  """The output of a SLURM client command, tried `tries` times 2 s apart; an unknown job id is
  no error (empty output). Fails with a one-line ChildProcessError."""
  for attempt in range(tries):
    try:
      done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
      why = "no answer within 60 s"
    else:
      if done.returncode == 0 or "Invalid job id" in done.stderr:
        return done.stdout
      why = done.stderr.strip().replace("\n", " ") or f"exit status {done.returncode}"
    if attempt + 1 < tries:
      time.sleep(2)
  raise ChildProcessError(
    f"{argv[0]} failed ({why}): cannot tell whether the last run's jobs still run, so"
    " nothing is submitted; run the same command again when the cluster answers"
  )


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
  """The SLURM state of each of `job_ids` ('<job>' or '<job>_<array task>') that the cluster
  knows: from accounting (sacct, one call), else from the controller (squeue: a job that
  accounting has not recorded yet). An unknown id is left out; a failing command is an error,
  never 'not running' (a job that may still run must not be submitted twice)."""
  if not job_ids:
    return {}
  bases = ",".join(sorted({j.split("_")[0] for j in job_ids}))
  known: dict[str, str] = {}
  accounting = _slurm_output(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", bases])
  for line in accounting.splitlines():
    job, _, state = line.strip().partition("|")
    if not state:
      continue
    state = state.split()[0]  # 'CANCELLED by 0'
    if "_[" in job:  # array tasks not started yet, as one line: '7_[0-2,5%4]'
      base, _, spec = job.partition("_[")
      for part in spec.rstrip("]").split("%")[0].split(","):
        first, _, last = part.partition("-")
        for i in range(int(first), int(last or first) + 1):
          known.setdefault(f"{base}_{i}", state)  # a task's own line wins
    else:
      known[job] = state
  missing = ",".join(j for j in job_ids if j not in known)
  if missing:
    for line in _slurm_output(["squeue", "-h", "-r", "-o", "%i|%T", "-j", missing]).splitlines():
      job, _, state = line.strip().partition("|")
      known.setdefault(job, state)
  return {j: known[j] for j in job_ids if known.get(j)}


class SlurmLauncher:
  """Jobs through submitit on the SLURM cluster that sbatch reaches; logs in DIR/logs/slurm/."""

  def __init__(self, folder: Path, section, name: str = "moa-sweep", poll_s: float = 5.0):
    self.folder, self.name, self.poll_s = Path(folder), name, poll_s
    self.parameters = slurm_parameters(section)
    self.record = self.folder / "jobs.json"

  def _executor(self, dependency: str | None):
    import submitit

    executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm")
    executor.update_parameters(name=self.name, **self.parameters)
    if dependency:
      executor.update_parameters(slurm_dependency=dependency)
    return executor

  def run(self, tasks: Sequence[Task], report: Report) -> tuple[dict[str, Outcome], list[str]]:
    import submitit

    from moa_jax.sweep import jobs as jobs_lib

    self.folder.mkdir(parents=True, exist_ok=True)
    recorded = json.loads(self.record.read_text()) if self.record.is_file() else {}
    states = job_states([recorded[t.name] for t in tasks if t.name in recorded])
    submitted: dict[str, Any] = {}
    resubmitted = set()
    for task in [t for t in tasks if t.after is None] + [t for t in tasks if t.after]:
      job_id = recorded.get(task.name)
      state = states.get(job_id) if task.after not in resubmitted else None
      if state in ACTIVE_STATES:
        print(
          f"[moa_jax] sweep: {task.name} still {state} as job {job_id}; waiting for it",
          flush=True,
        )
        submitted[task.name] = submitit.SlurmJob(folder=self.folder / "%j", job_id=job_id)
      else:
        resubmitted.add(task.name)
    for task in tasks:  # the shared jobs, one by one
      if task.kind == "shared" and task.name in resubmitted:
        submitted[task.name] = self._executor(None).submit(jobs_lib.run_shared, *task.args)
    arrays: dict[str | None, list[Task]] = {}
    for task in tasks:
      if task.kind == "point" and task.name in resubmitted:
        arrays.setdefault(task.after, []).append(task)
    for after, members in arrays.items():  # the points of each group as one job array
      executor = self._executor(f"afterok:{submitted[after].job_id}" if after else None)
      with executor.batch():
        array = [executor.submit(jobs_lib.run_point, *t.args) for t in members]
      submitted.update({t.name: job for t, job in zip(members, array)})
    recorded.update({name: job.job_id for name, job in submitted.items()})
    atomic_write_text(self.record, json.dumps(recorded, indent=1))
    print(
      f"[moa_jax] sweep: {len(resubmitted)} jobs submitted, "
      f"{len(submitted) - len(resubmitted)} reattached; logs in {self.folder}",
      flush=True,
    )
    return self._wait(tasks, submitted, report), [t.name for t in tasks if t.name in resubmitted]

  def _wait(
    self, tasks: Sequence[Task], submitted: dict[str, Any], report: Report
  ) -> dict[str, Outcome]:
    dependents = {t.name: [d.name for d in tasks if d.after == t.name] for t in tasks}
    waiting, outcomes = dict(submitted), {}
    while waiting:
      next(iter(waiting.values())).get_info(mode="force")  # one sacct call serves every job
      for name, job in list(waiting.items()):
        if name not in waiting or not job.done():
          continue
        del waiting[name]
        outcomes[name] = self._outcome(job)
        report(name, outcomes[name])
        if not outcomes[name].ok:
          for other in dependents[name]:
            if other in waiting:
              waiting.pop(other).cancel(check=False)
              outcomes[other] = Outcome(False, outcomes[name].log, f"its shared job {name} failed")
              report(other, outcomes[other])
      if waiting:
        time.sleep(self.poll_s)
    return outcomes

  @staticmethod
  def _outcome(job) -> Outcome:
    from submitit.core.utils import pickle_load

    log = f"{job.paths.stdout} (errors: {job.paths.stderr})"
    for _ in range(10):  # the result file may show a moment after the state
      if job.paths.result_pickle.exists():
        status, value = pickle_load(job.paths.result_pickle)
        if status == "success":
          return Outcome(True, log)
        lines = [line for line in str(value).strip().splitlines() if line.strip()]
        return Outcome(False, log, lines[-1][:300] if lines else "failed")
      time.sleep(1)
    return Outcome(False, log, f"SLURM state {job.state}, no result")


def launcher(config, folder: Path):
  """The launcher named by `config.launcher` ('local' or 'slurm')."""
  if config.launcher == "local":
    return LocalLauncher(folder / "local", workers=config.local.workers)
  if config.launcher == "slurm":
    return SlurmLauncher(folder / "slurm", config.slurm)
  raise ValueError(f"unknown launcher {config.launcher!r}; choose 'local' or 'slurm'")
