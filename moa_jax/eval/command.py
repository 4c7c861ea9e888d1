"""`python -m moa_jax eval --config=configs/eval.py[:variant] --workdir=DIR`: resumable evaluation.

Evaluates methods (dense, uniform = StreamingLLM at a KV density, and any number of named plans)
on tasks (synthetic, LongBench, long-text perplexity) at every configured length, one cell
(method x task x length, all depths inside) at a time (`moa_jax.eval.harness`). Each finished
cell is written atomically to DIR/cells/<task>/<method>/<length>.json with the fingerprint of
everything that determines it; a re-run (after a kill, or with more methods, tasks or lengths)
computes only the cells that are missing or whose fingerprint changed. Then DIR/results.json
(records, summary, the config and the command), plots and DIR/report.md are written from all
cells of the config.

The config's `eval` section is built by `eval_section` (configs/eval.py, and any config that
embeds an evaluation, e.g. a sweep's); `run_eval(config, workdir)` reads `config.model` and
`config.eval`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from moa_jax import validate
from moa_jax.data import longbench as longbench_lib
from moa_jax.data import longtext as longtext_lib
from moa_jax.data import tasks as tasks_lib
from moa_jax.eval import harness, plots, report
from moa_jax.models.loading import load_model
from moa_jax.plans.plan import Plan, uniform_plan
from moa_jax.workdir import atomic_write_text, fingerprint

BASELINES = ("dense", "uniform")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def eval_section(tasks: Sequence[str] = ("lines",), lengths: Sequence[int] = (1024, 2048)):
  """The `eval` section (an ml_collections ConfigDict) read by `run_eval`."""
  from ml_collections import config_dict  # only configs need it (the GPU image lacks it)

  s = config_dict.ConfigDict()
  s.methods = BASELINES  # any of 'dense', 'uniform'; every plan in `plans` is a method too
  s.plans = ""  # 'name=path[,name=path...]': our plan JSON or the official MoA {alphas, betas}
  s.density = 0.5  # KV density of 'uniform' (StreamingLLM: sink + a window) at every length
  s.sink = 64  # sink tokens of 'uniform'
  # Synthetic (lines, passkey, niah, vt, uuid), 'longtext' and 'longbench/<dataset>'.
  s.tasks = tuple(tasks)
  s.lengths = tuple(lengths)  # prompt tokens (LongBench: prompts are cut to this many)
  s.depths = tasks_lib.DECILES  # needle depths of the synthetic tasks
  s.samples_per_depth = 1
  s.seed = 0
  s.max_new_tokens = 0  # synthetic tasks; 0: twice the longest answer + 8
  s.first_line = True  # score the first line of a synthetic answer
  s.with_ce = True  # response cross-entropy of the expected synthetic answer
  s.template = "auto"  # chat template (moa_jax.calibration.prompts)
  s.batch_size = 4
  s.prefill_chunk = 0  # prefill prompts in calls of at most this many tokens (0: at once)
  s.longbench = config_dict.ConfigDict()
  s.longbench.data_dir = ""  # folder of LongBench's <dataset>.jsonl ('' = hub THUDM/LongBench)
  s.longbench.num_samples = 0  # the first n records of each dataset (0 = all)
  s.longtext = config_dict.ConfigDict()
  s.longtext.num_documents = 4  # the largest stdlib modules (moa_jax.data.longtext)
  s.longtext.target_tokens = 128  # scored last tokens of each document
  return s


def _names(values: str | Sequence[str]) -> list[str]:
  """Entries of a tuple field, also split at commas ('a,b' from the command line)."""
  values = [values] if isinstance(values, str) else list(values)
  return [part.strip() for v in values for part in str(v).split(",") if part.strip()]


def parse_plans(text: str) -> dict[str, Path]:
  """'name=path[,name=path...]' -> {name: path}; ValueError for a bad or repeated name."""
  plans: dict[str, Path] = {}
  for entry in _names(text):
    name, sep, path = entry.partition("=")
    if not sep or not _NAME.fullmatch(name) or not path:
      raise ValueError(
        f"eval.plans entry {entry!r} is not name=path (name of letters, digits, '_', '.', '-')"
      )
    if name in plans or name in BASELINES:
      raise ValueError(f"eval.plans names {name!r} twice or as a baseline; names must be unique")
    plans[name] = Path(path)
  return plans


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """The checked `eval` section: methods (baselines, then plans), tasks and lengths."""

  methods: tuple[str, ...]
  plan_paths: Mapping[str, Path]
  tasks: tuple[str, ...]
  lengths: tuple[int, ...]
  section: Any

  @classmethod
  def from_config(cls, section) -> EvalSpec:
    """Check every field (one-line ValueError / FileNotFoundError) before any work."""
    baselines = _names(section.methods)
    bad = [m for m in baselines if m not in BASELINES]
    if bad or len(set(baselines)) != len(baselines):
      raise ValueError(
        f"eval.methods must list distinct baselines of {BASELINES}, got "
        f"{baselines} (plans go in eval.plans as name=path)"
      )
    plan_paths = parse_plans(section.plans)
    for name, path in plan_paths.items():
      if not path.is_file():
        raise FileNotFoundError(f"eval.plans: plan {name!r} file {path} not found")
    methods = (*baselines, *plan_paths)
    if not methods:
      raise ValueError("no methods to evaluate: set eval.methods and/or eval.plans")
    tasks = _names(section.tasks)
    for task in tasks:
      harness.task_kind(task)
    lengths = [int(n) for n in _names([str(n) for n in section.lengths])]
    if not tasks or not lengths or min(lengths) <= 0 or len(set(lengths)) != len(lengths):
      raise ValueError(
        f"eval.tasks and eval.lengths must be non-empty, lengths distinct and "
        f"positive, got tasks={tasks} lengths={lengths}"
      )
    if section.batch_size < 1 or section.samples_per_depth < 1:
      raise ValueError("eval.batch_size and eval.samples_per_depth must be >= 1")
    if not section.depths or not all(0 <= d <= 1 for d in section.depths):
      raise ValueError(f"eval.depths must be values in [0, 1], got {section.depths}")
    if harness.LONGTEXT in tasks:
      for n in lengths:
        if not 0 < section.longtext.target_tokens < n - 1:
          raise ValueError(
            f"eval.longtext.target_tokens must be in [1, {n - 2}] at length {n},"
            f" got {section.longtext.target_tokens}"
          )
    return cls(tuple(methods), plan_paths, tuple(tasks), tuple(sorted(lengths)), section)


def load_plan(path: Path, model_config) -> Plan:
  """Our plan JSON or the official MoA JSON, checked against the model."""
  text = path.read_text()
  try:
    data = json.loads(text)
    if isinstance(data, dict) and "format" in data:
      return Plan.from_dict(data).validate(model_config)
    return Plan.from_official_json(text, model_config)
  except (ValueError, TypeError) as error:
    raise ValueError(f"plan {path}: {error}") from None


def load_longbench_records(task: str, section) -> list[dict[str, Any]]:
  """The records of a 'longbench/<dataset>' task (the first num_samples if set)."""
  dataset = task.removeprefix(harness.LONGBENCH_PREFIX)
  data_dir = section.longbench.data_dir or None
  try:
    records = list(longbench_lib.load_longbench(dataset, data_dir=data_dir))
  except FileNotFoundError as error:
    where = f"from {data_dir}" if data_dir else f"from the hub ({longbench_lib.HUB_ID})"
    detail = " ".join(str(error).split())
    raise FileNotFoundError(
      f"{task}: cannot load LongBench {dataset} {where}: {detail}; set "
      "--config.eval.longbench.data_dir=<folder of LongBench's "
      "<dataset>.jsonl files>"
    ) from None
  if section.longbench.num_samples:
    records = records[: section.longbench.num_samples]
  return records


# --- cells -----------------------------------------------------------------------------------


class CellStore:
  """Finished cells under DIR/cells: one JSON file per (task, method, length), written by
  write-then-rename, valid while its fingerprint matches."""

  def __init__(self, root: Path):
    self.root = root
    for stale in root.rglob(".*.json.*"):  # temporary files of a writer that was killed
      stale.unlink()

  def path(self, task: str, method: str, length: int) -> Path:
    return self.root / task.replace("/", "-") / method / f"{length}.json"

  def load(self, task: str, method: str, length: int, key: str) -> list[dict] | None:
    """The cell's records if it is finished with this fingerprint, else None."""
    path = self.path(task, method, length)
    if not path.is_file():
      return None
    cell = json.loads(path.read_text())
    return cell["records"] if cell.get("fingerprint") == key else None

  def save(
    self, task: str, method: str, length: int, key: str, records: list[dict], seconds: float
  ) -> None:
    cell = dict(
      fingerprint=key,
      task=task,
      method=method,
      length=length,
      seconds=round(seconds, 3),
      records=records,
    )
    atomic_write_text(
      self.path(task, method, length), json.dumps(cell, indent=1, ensure_ascii=False) + "\n"
    )


def _method_identity(method: str, section, plans: Mapping[str, Plan]) -> dict[str, Any]:
  if method == "dense":
    return {"method": "dense"}
  if method == "uniform":
    return {"method": "uniform", "density": section.density, "sink": section.sink}
  return {"method": "plan", "plan": plans[method].to_dict()}


def _task_identity(task: str, section, documents) -> dict[str, Any]:
  kind = harness.task_kind(task)
  if kind == "synthetic":
    return {
      k: section[k]
      for k in (
        "depths",
        "samples_per_depth",
        "seed",
        "max_new_tokens",
        "first_line",
        "with_ce",
        "template",
      )
    }
  if kind == "longbench":
    return {"template": section.template, **section.longbench.to_dict()}
  return {
    "target_tokens": section.longtext.target_tokens,
    "documents": [(d.name, d.sha256) for d in documents],
  }


def _inputs(task, length, tokenizer, section, longbench, documents) -> harness.CellInputs:
  kind = harness.task_kind(task)
  if kind == "synthetic":
    return harness.synthetic_inputs(
      tokenizer,
      task,
      length,
      depths=tuple(section.depths),
      samples_per_depth=section.samples_per_depth,
      seed=section.seed,
      max_new_tokens=section.max_new_tokens or None,
      template=section.template,
    )
  if kind == "longbench":
    return harness.longbench_inputs(
      tokenizer, longbench[task], length, task=task, template=section.template
    )
  return harness.longtext_inputs(
    tokenizer, documents, length, target_tokens=section.longtext.target_tokens
  )


def _kv_densities(spec: EvalSpec, model_config, plans: Mapping[str, Plan]) -> dict:
  """{method: {length: KV density}} at each evaluated length."""
  section = spec.section
  out = {}
  for method in spec.methods:
    if method == "dense":
      out[method] = {str(n): 1.0 for n in spec.lengths}
    elif method == "uniform":
      out[method] = {
        str(n): uniform_plan(model_config, section.density, n, sink=section.sink).kv_density(n)
        for n in spec.lengths
      }
    else:
      out[method] = {str(n): plans[method].kv_density(n) for n in spec.lengths}
  return out


def run_eval(
  config, workdir: str | Path, command: str = "", *, loaded: tuple[Any, Any, str] | None = None
) -> dict[str, Any]:
  """Evaluate every missing cell of `config` (sections `model` and `eval`) in `workdir`, then
  write DIR/results.json, plots and DIR/report.md; returns the results dict.

  loaded: an already loaded (model, tokenizer, model id) instead of loading `config.model`.
  `command` (the command line that ran this) is recorded in the results.
  """
  start = time.perf_counter()
  spec = EvalSpec.from_config(config.eval)
  section = config.eval
  workdir = Path(workdir)
  longbench = {
    t: load_longbench_records(t, section) for t in spec.tasks if harness.task_kind(t) == "longbench"
  }
  documents = (
    longtext_lib.stdlib_documents(section.longtext.num_documents)
    if harness.LONGTEXT in spec.tasks
    else []
  )
  model, tokenizer, model_id = load_model(config.model) if loaded is None else loaded
  plans = {name: load_plan(path, model.config) for name, path in spec.plan_paths.items()}
  kv_density = _kv_densities(spec, model.config, plans)  # also checks uniform's density
  factory = harness.plan_factory(
    model.config, density=section.density, plans=plans, sink=section.sink
  )
  store = CellStore(workdir / "cells")
  model_key = config.model.to_dict()
  jobs = [(task, n, m) for task in spec.tasks for n in spec.lengths for m in spec.methods]
  keys = {
    (t, n, m): fingerprint(
      model_key,
      _method_identity(m, section, plans),
      {"task": t, **_task_identity(t, section, documents)},
      n,
    )
    for t, n, m in jobs
  }
  cells = {job: store.load(job[0], job[2], job[1], keys[job]) for job in jobs}
  reused = [job for job in jobs if cells[job] is not None]
  print(f"[moa_jax] eval: {len(jobs)} cells, {len(reused)} already finished", flush=True)
  computed = []
  for task in spec.tasks:
    for n in spec.lengths:
      missing = [m for m in spec.methods if cells[(task, n, m)] is None]
      if not missing:
        continue
      inputs = _inputs(task, n, tokenizer, section, longbench, documents)
      for m in missing:
        t0 = time.perf_counter()
        records = harness.evaluate_cell(
          model,
          tokenizer,
          inputs,
          m,
          factory,
          batch_size=section.batch_size,
          with_ce=section.with_ce,
          first_line=section.first_line,
          prefill_chunk=section.prefill_chunk or None,
        )
        seconds = time.perf_counter() - t0
        store.save(task, m, n, keys[(task, n, m)], records, seconds)
        cells[(task, n, m)] = records
        computed.append((task, n, m))
        print(
          f"[moa_jax] eval cell {len(reused) + len(computed)}/{len(jobs)}: {m} {task}@{n} "
          f"in {seconds:.1f} s",
          flush=True,
        )
  records = [r for job in jobs for r in cells[job]]
  meta = {
    "command": command,
    "config": config.to_dict(),
    "model": model_id,
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "methods": list(spec.methods),
    "plans": {name: str(path) for name, path in spec.plan_paths.items()},
    "kv_density": kv_density,
    "cells": {
      "total": len(jobs),
      "computed": [list(j) for j in computed],
      "reused": [list(j) for j in reused],
    },
    "seconds": time.perf_counter() - start,
  }
  if documents:
    meta["longtext"] = longtext_lib.provenance(documents)
  result = harness.save_results(records, workdir / "results.json", meta)
  figures = plots.plot_all(records, workdir)
  atomic_write_text(workdir / "report.md", report.markdown_report(result, figures))
  print(report.summary_tables(records, spec.methods), flush=True)
  print(f"[moa_jax] eval finished in {meta['seconds']:.0f} s; report: {workdir / 'report.md'}")
  return result


def eval_command(config, workdir: Path | None) -> dict[str, Any]:
  """`python -m moa_jax eval --config=configs/eval.py[:variant] [--workdir=DIR]` (default
  runs/eval)."""
  command = shlex.join(["python", "-m", "moa_jax", *sys.argv[1:]])
  validate.eval(config, workdir or Path("runs/eval"))
  return run_eval(config, workdir or Path("runs/eval"), command)
