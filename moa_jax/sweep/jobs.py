"""What a sweep's jobs do: the shared stages of a group of points, and one point.

Points whose model, seed, calibration and profile sections are equal form a group. The group's
shared job runs the pipeline's calibration and profile stages once (and the dense evaluation,
which no point changes) in `DIR/shared/<group>/`; each point's job hard-links those complete
stage folders and evaluation cells into `DIR/points/<name>/`, where the pipeline then skips them
by fingerprint and runs optimize and choose, and evaluates uniform and the point's plan ('moa')
beside dense. A job ends by writing DONE.json with the fingerprint of what it computed; a
re-run skips every job whose DONE.json matches.

A job runs in its own process, as a SLURM job (submitit) or one of the local launcher's
processes (`python -m moa_jax.sweep.jobs TASK.pkl`).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from moa_jax.workdir import COMPLETE, atomic_write_text, fingerprint

DONE = "DONE.json"
SHARED_STAGES = ("calibration", "profile")
MOA = "moa"  # the method name of a point's plan in its evaluation


def group_key(config) -> str:
  """What the shared stages depend on: model, seed, calibration and profile sections."""
  return fingerprint(
    config.model.to_dict(), config.seed, config.calibration.to_dict(), config.profile.to_dict()
  )


def shared_key(config) -> str:
  """What a group's shared job computes: its stages and the dense evaluation of `config.eval`."""
  return fingerprint(group_key(config), config.eval.to_dict() if "eval" in config else None)


def point_key(config) -> str:
  """What a point computes: its whole config."""
  return fingerprint(config.to_dict())


def is_done(folder: Path, key: str) -> bool:
  """Whether `folder` holds a DONE.json of `key`."""
  marker = folder / DONE
  return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == key


def eval_config(config, methods: tuple[str, ...], plans: str):
  """The `run_eval` config {model, eval} of a sweep point; uniform runs at the point's KV
  budget and both baselines at the plan's sink."""
  from ml_collections import ConfigDict

  section = copy.deepcopy(config.eval)
  section.methods = methods
  section.plans = plans
  section.density = config.optimize.density
  section.sink = config.optimize.sink
  return ConfigDict({"model": copy.deepcopy(config.model), "eval": section})


def _use_compilation_cache(cache_dir: str) -> None:
  """Share XLA compilations between the sweep's jobs (same programs, same shapes), also the
  quick ones (the points compile many small programs the shared job compiled before)."""
  if cache_dir:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:  # another file system, or links not allowed
    shutil.copy2(src, dst)


def link_file(src: Path, dst: Path) -> None:
  """Make dst the same file as src (a hard link, else a copy), replacing dst atomically."""
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".{dst.name}.link-{os.getpid()}"
  tmp.unlink(missing_ok=True)
  _link_or_copy(str(src), str(tmp))
  os.replace(tmp, dst)


def link_stage(src: Path, dst: Path) -> None:
  """Put the complete stage folder `src` at `dst` by hard links, unless dst is already the same
  complete stage. Stages are written once and never changed in place, so links are safe."""
  marker = (src / COMPLETE).read_text()
  if (dst / COMPLETE).is_file() and (dst / COMPLETE).read_text() == marker:
    return
  tmp = dst.parent / f".{dst.name}.partial-link"  # Workdir discards it if we die here
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp, copy_function=_link_or_copy)
  if dst.exists():
    shutil.rmtree(dst)
  os.rename(tmp, dst)


def _link_cells(src: Path, dst: Path) -> None:
  """Hard-link the finished evaluation cells under src into dst (the eval checks each one's
  fingerprint and recomputes those that do not fit)."""
  for path in src.rglob("*.json"):
    target = dst / path.relative_to(src)
    if not target.is_file() or target.read_bytes() != path.read_bytes():
      link_file(path, target)


def run_shared(config, folder: str | Path, cache_dir: str = "") -> dict[str, Any]:
  """The group's calibration and profile stages (and the dense evaluation) in `folder`."""
  from moa_jax import pipeline
  from moa_jax.eval.command import run_eval

  start = time.perf_counter()
  _use_compilation_cache(cache_dir)
  folder = Path(folder)
  run = pipeline.run_stages(config, folder, until=SHARED_STAGES[-1])
  if "eval" in config:
    run_eval(
      eval_config(config, ("dense",), ""),
      folder / "eval",
      loaded=(run.model, run.tokenizer, run.model_id),
    )
  done = {
    "fingerprint": shared_key(config),
    "keys": run.outputs["keys"],
    "seconds": time.perf_counter() - start,
  }
  atomic_write_text(folder / DONE, json.dumps(done, indent=1))
  return done


def run_point(
  config, folder: str | Path, shared: str | Path, cache_dir: str = ""
) -> dict[str, Any]:
  """One point in `folder`: the shared stages linked from `shared`, then optimize, choose and
  the evaluation of dense, uniform and the chosen plan."""
  from moa_jax import pipeline
  from moa_jax.eval.command import run_eval

  start = time.perf_counter()
  _use_compilation_cache(cache_dir)
  folder, shared = Path(folder), Path(shared)
  folder.mkdir(parents=True, exist_ok=True)
  for stage in SHARED_STAGES:
    link_stage(shared / stage, folder / stage)
  compressed = pipeline.compress(config, folder)
  done: dict[str, Any] = {
    "fingerprint": point_key(config),
    "kv_densities": compressed.plan.kv_densities,
  }
  if "eval" in config:
    if (shared / "eval" / "cells").is_dir():
      _link_cells(shared / "eval" / "cells", folder / "eval" / "cells")
    plan = (folder / "plan.json").resolve()
    run_eval(
      eval_config(config, ("dense", "uniform"), f"{MOA}={plan}"),
      folder / "eval",
      loaded=(compressed.model, compressed.tokenizer, compressed.model_id),
    )
    done["results"] = str(folder / "eval" / "results.json")
  done["seconds"] = time.perf_counter() - start
  atomic_write_text(folder / DONE, json.dumps(done, indent=1))
  return done


FUNCTIONS = {"shared": run_shared, "point": run_point}


def main(argv: list[str]) -> None:
  """`python -m moa_jax.sweep.jobs TASK.pkl`: run the pickled (kind, args) of a local job."""
  if len(argv) != 2:
    sys.exit("usage: python -m moa_jax.sweep.jobs TASK.pkl")
  with open(argv[1], "rb") as f:
    kind, args = pickle.load(f)
  FUNCTIONS[kind](*args)


if __name__ == "__main__":
  main(sys.argv)
