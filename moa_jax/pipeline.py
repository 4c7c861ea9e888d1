"""MoA's automatic pipeline: calibration -> profile -> optimize -> choose (docs/method.md).

`compress(config, workdir)` runs the table `STAGES` in `workdir`. Each stage's key chains the key
of the stage before it with its own inputs (calibration: the model, tokenizer, source and
settings; profile, optimize: their config sections; choose: the validation set and `select`), so
the calibration and profile of runs that share those sections are shared too (the sweep relies
on it). Each stage writes its outputs atomically and is skipped when already complete for the
same key (see `moa_jax.workdir`), so a run killed mid-stage resumes with nothing corrupt. The
chosen plan lands at `DIR/plan.json`, with `DIR/report.md` and its plots beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax import validate
from moa_jax.attention.reference import blocked_attention
from moa_jax.calibration.build import (
  CalibrationConfig,
  CalibrationSet,
  build_calibration,
  cache_key,
  cache_key_inputs,
)
from moa_jax.models import sharding
from moa_jax.models.loading import load_model
from moa_jax.optimize import pareto
from moa_jax.optimize.direct import SolverOptions
from moa_jax.optimize.loss_delta import loss_delta
from moa_jax.optimize.problem import build_problem
from moa_jax.optimize.select import select_plan
from moa_jax.plans import plots
from moa_jax.plans import rules as rules_lib
from moa_jax.plans.plan import Plan, dense_plan, uniform_plan
from moa_jax.profile.profiler import profile_model, response_loss, response_targets
from moa_jax.workdir import Workdir, atomic_write, atomic_write_text, fingerprint


@dataclasses.dataclass(frozen=True)
class MaskedAttention:
  """Prefill-only attention with the rule mask, windows as a traced array [L, N] (one compile
  serves every plan); used to score plans by validation loss."""

  windows: jax.Array  # [L, N] int32
  sink: int

  def __call__(self, layer, q, k, v, q_pos, cache):
    del cache
    return blocked_attention(q, k, v, q_pos, windows=self.windows[layer], sink=self.sink), None


@functools.partial(jax.jit, static_argnames=("graphdef", "sink"))
def _masked_loss(graphdef, state, tokens, positions, hidden_index, weight, windows, *, sink):
  model = nnx.merge(graphdef, state)
  return response_loss(
    model, tokens, positions, hidden_index, weight, MaskedAttention(windows, sink)
  )


def validation_loss(model, calibration: CalibrationSet, windows: np.ndarray, sink: int) -> float:
  """Mean response-only cross-entropy of the calibration samples with per-head windows [L, N]."""
  graphdef, state = nnx.split(model)
  total, count = 0.0, 0
  for bucket in calibration.buckets.values():
    positions = bucket.positions()
    for row in range(bucket.num_samples):
      hidden_index, weight = response_targets(bucket.loss_mask[row : row + 1])
      total += float(
        _masked_loss(
          graphdef,
          state,
          jnp.asarray(bucket.tokens[row : row + 1]),
          jnp.asarray(positions[row : row + 1]),
          jnp.asarray(hidden_index),
          jnp.asarray(weight),
          jnp.asarray(windows, jnp.int32),
          sink=sink,
        )
      )
      count += 1
  return total / count


def _calibration_config(section, seed: int, **overrides) -> CalibrationConfig:
  fields = {f.name for f in dataclasses.fields(CalibrationConfig)}
  values = {k: v for k, v in section.items() if k in fields}
  values.update(seed=seed, **overrides)
  values["lengths"] = tuple(values["lengths"])
  return CalibrationConfig(**values)


def _log(message: str) -> None:
  print(f"[moa_jax] {message}", flush=True)


@dataclasses.dataclass
class Compressed:
  """What `compress` hands on: the chosen plan and the loaded model, so that callers (the demo,
  the notebook, the eval) need not load the model again."""

  plan: Plan
  model: Any  # moa_jax.models.llama.Llama
  tokenizer: Any
  model_id: str
  workdir: Path


@dataclasses.dataclass
class _Run:
  """State the stages share: config, model, and each finished stage's outputs."""

  config: Any
  model: Any
  tokenizer: Any
  model_id: str
  outputs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _calibration_inputs(run: _Run) -> Any:
  return cache_key(
    cache_key_inputs(
      run.model,
      run.tokenizer,
      _calibration_config(run.config.calibration, run.config.seed),
      run.model_id,
    )
  )


def _calibration_build(run: _Run, out: Path) -> None:
  calib = _calibration_config(run.config.calibration, run.config.seed)
  build_calibration(run.model, run.tokenizer, calib, model_id=run.model_id).save(out / "train")


def _calibration_load(run: _Run, path: Path) -> CalibrationSet:
  return CalibrationSet.load(path / "train")


def _profile_build(run: _Run, out: Path) -> None:
  prof = run.config.profile
  influence = profile_model(
    run.model,
    run.model.config,
    run.outputs["calibration"],
    list(prof.lengths),
    block=prof.block,
    path=prof.path,
    batch_size=prof.batch_size,
    magnitude=prof.magnitude,
    loss=prof.loss,
  )
  arrays = {str(n): e for n, e in influence.items()}
  atomic_write(out / "influence.npz", lambda f: np.savez(f, **arrays))


def _profile_load(run: _Run, path: Path) -> dict[int, np.ndarray]:
  with np.load(path / "influence.npz") as data:
    return {int(n): data[n] for n in data.files}


def _candidate_rules(config) -> list[rules_lib.ElasticRule]:
  return rules_lib.candidate_rules(
    list(config.profile.lengths),
    list(config.optimize.constraint_lengths),
    alpha_step=config.optimize.alpha_step,
    betas=tuple(config.optimize.betas),
  )


def _optimize_build(run: _Run, out: Path) -> None:
  config, opt, block = run.config, run.config.optimize, run.config.profile.block
  rules = _candidate_rules(config)
  dl = {n: loss_delta(e, rules, n, opt.sink, block) for n, e in run.outputs["profile"].items()}
  problem = build_problem(
    dl,
    rules,
    list(opt.constraint_lengths),
    num_kv_heads=run.model.config.num_kv_heads,
    budget=opt.density,
    lo=opt.lower,
    max_rules_per_layer=opt.max_rules_per_layer,
    grouping=opt.grouping,
    sink=opt.sink,
    block=block,
  )
  front = pareto.pareto_front(
    problem,
    intervals=opt.intervals,
    options=SolverOptions(time_limit=opt.time_limit),
    workers=opt.workers,
  )
  provenance = {
    "config": config.to_dict(),
    "seed": config.seed,
    "model": run.model_id,
    "calibration": run.outputs["keys"]["calibration"],
  }
  for i, solution in enumerate(front.solutions):
    problem.to_plan(solution, architecture="LlamaForCausalLM", provenance=provenance).save(
      out / f"plan-{i:03d}.json"
    )
  atomic_write_text(
    out / "front.json",
    json.dumps(
      {
        "plans": len(front.solutions),
        "solves": front.solves,
        "no_solution": front.no_solution,
        "seconds": front.seconds,
        "rules": [[r.alpha, r.beta] for r in rules],
      },
      indent=1,
    ),
  )


def _optimize_load(run: _Run, path: Path) -> list[Plan]:
  return [Plan.load(p) for p in sorted(path.glob("plan-*.json"))]


def _validation_config(run: _Run) -> CalibrationConfig:
  sel = run.config.select
  return _calibration_config(
    run.config.calibration,
    run.config.seed + 1,
    lengths=(sel.length,),
    samples_per_length=sel.num_samples,
    split=sel.split,
  )


def _choose_inputs(run: _Run) -> Any:
  valid = cache_key(
    cache_key_inputs(run.model, run.tokenizer, _validation_config(run), run.model_id)
  )
  return [valid, run.config.select.to_dict()]


def _choose_build(run: _Run, out: Path) -> None:
  config, model, opt = run.config, run.model, run.config.optimize
  valid_set = build_calibration(
    model, run.tokenizer, _validation_config(run), model_id=run.model_id
  )
  valid_set.save(out / "validation")
  n, candidates = config.select.length, run.outputs["optimize"]
  loss = lambda plan: validation_loss(model, valid_set, plan.windows(n), plan.sink)
  chosen, table = select_plan(candidates, loss)
  baselines = {
    "dense": loss(dense_plan(model.config, sink=opt.sink)),
    "uniform": loss(uniform_plan(model.config, opt.density, n, sink=opt.sink)),
  }
  chosen.save(out / "plan.json")
  plots.plot_spans(chosen, n, out / "spans.png")
  plots.plot_pareto_front(candidates, out / "pareto_front.png", chosen=chosen)
  atomic_write_text(
    out / "report.md", _report(config, run.model_id, chosen, candidates, table, baselines, n)
  )


def _choose_load(run: _Run, path: Path) -> Plan:
  return Plan.load(path / "plan.json")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One resumable stage: `inputs(run)` is what its outputs depend on besides the stages before
  it (its key chains the previous stage's key), `build(run, out)` writes them into `out`, and
  `load(run, path)` reads them back for the stages after it."""

  name: str
  inputs: Callable[[_Run], Any]
  build: Callable[[_Run, Path], None]
  load: Callable[[_Run, Path], Any]


STAGES = (
  Stage("calibration", _calibration_inputs, _calibration_build, _calibration_load),
  Stage("profile", lambda run: run.config.profile.to_dict(), _profile_build, _profile_load),
  Stage("optimize", lambda run: run.config.optimize.to_dict(), _optimize_build, _optimize_load),
  Stage("choose", _choose_inputs, _choose_build, _choose_load),
)


def run_stages(
  config,
  workdir: str | Path,
  loaded: tuple[Any, Any, str] | None = None,
  *,
  until: str | None = None,
) -> _Run:
  """Run the STAGES in order, up to and including `until` (default: all), in `workdir`,
  skipping every stage already complete for the same inputs; `loaded` is an already loaded
  (model, tokenizer, model id) of `config.model`. Returns the run (model and stage outputs)."""
  names = [stage.name for stage in STAGES]
  if until is not None and until not in names:
    raise ValueError(f"unknown stage {until!r}; choose one of {', '.join(names)}")
  work = Workdir(workdir)
  model, tokenizer, model_id = loaded or load_model(config.model, mesh=sharding.config_mesh(config))
  run = _Run(config, model, tokenizer, model_id, outputs={"keys": {}})
  key = ""
  for stage in STAGES:
    key = fingerprint(key, stage.inputs(run))
    run.outputs["keys"][stage.name] = key
    if work.is_complete(stage.name, key):
      _log(f"{stage.name}: complete, skipped")
    else:
      stage_start = time.perf_counter()
      with work.stage(stage.name, key, {"model": model_id}) as out:
        stage.build(run, out)
      _log(f"{stage.name}: done in {time.perf_counter() - stage_start:.1f} s")
    run.outputs[stage.name] = stage.load(run, work.path(stage.name))
    if stage.name == until:
      break
  return run


def compress(config, workdir: str | Path, loaded: tuple[Any, Any, str] | None = None) -> Compressed:
  """Run the STAGES (calibration -> profile -> optimize -> choose) in `workdir`, skipping every
  stage already complete for the same inputs; `loaded` is an already loaded (model, tokenizer,
  model id) of `config.model`. Writes DIR/plan.json and DIR/report.md."""
  start = time.perf_counter()
  run = run_stages(config, workdir, loaded)
  root = Path(workdir)
  for name in ("plan.json", "report.md"):
    atomic_write_text(root / name, (root / "choose" / name).read_text())
  _log(f"compress finished in {time.perf_counter() - start:.1f} s: {root / 'plan.json'}")
  plan = Plan.load(root / "plan.json").validate(run.model.config)
  return Compressed(plan, run.model, run.tokenizer, run.model_id, root)


def compress_command(config, workdir: Path | None) -> Plan:
  """`python -m moa_jax compress --config=... --workdir=DIR`."""
  validate.compress(config, workdir)
  return compress(config, workdir).plan


def _report(
  config,
  model_id: str,
  chosen: Plan,
  candidates: list[Plan],
  table,
  baselines: dict[str, float],
  n: int,
) -> str:
  lengths = sorted(chosen.kv_densities)
  lines = [
    "# MoA compression report",
    "",
    f"Model: `{model_id}`; KV-density budget "
    f"{config.optimize.density} (band [{config.optimize.lower * config.optimize.density:.3f}, "
    f"{config.optimize.density}]) at lengths {list(config.optimize.constraint_lengths)}; "
    f"profile lengths {list(config.profile.lengths)}; {len(candidates)} Pareto plans.",
    "",
    "## Chosen plan",
    "",
    "| length | KV density | attention density |",
    "|---|---|---|",
    *[
      f"| {m} | {chosen.kv_densities[m]:.4f} | {chosen.attention_densities[m]:.4f} |"
      for m in lengths
    ],
    "",
    "Predicted loss increase per profile length: "
    + ", ".join(f"{m}: {z:.4g}" for m, z in sorted(chosen.objectives.items())),
    "",
    f"## Validation loss at length {n} (response-only cross-entropy)",
    "",
    "| plan | predicted dL per profile length | validation loss |",
    "|---|---|---|",
    *[
      f"| {row['index']}{' (chosen)' if row['chosen'] else ''} | "
      f"{', '.join(f'{z:.4g}' for _, z in sorted(row['objectives'].items()))} | "
      f"{row['loss']:.4f} |"
      for row in table
    ],
    *[f"| {name} (baseline) | | {value:.4f} |" for name, value in baselines.items()],
    "",
    "![spans](choose/spans.png)",
    "",
    "![Pareto front](choose/pareto_front.png)",
    "",
  ]
  return "\n".join(lines)
