"""MoA's automatic pipeline: calibration -> profile -> optimize -> choose (MOA_SPEC.md section 1).

`compress(config, workdir)` runs the four stages in `workdir`; each stage writes its outputs
atomically and is skipped when already complete for the same inputs (see `moa_jax.workdir`), so
a run killed mid-stage resumes with nothing corrupt. The chosen plan lands at `DIR/plan.json`,
with `DIR/report.md` and its plots beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moa_jax.attention.reference import reference_attention
from moa_jax.models.loading import load_model
from moa_jax.optimize import milp, pareto
from moa_jax.optimize.loss_delta import loss_delta
from moa_jax.optimize.select import select_plan
from moa_jax.plans import plots
from moa_jax.plans import rules as rules_lib
from moa_jax.plans.plan import Plan, dense_plan, uniform_plan
from moa_jax.calibration.build import (CalibrationConfig, CalibrationSet, build_calibration,
                                         cache_key, cache_key_inputs)
from moa_jax.profile.profiler import profile_model, response_loss, response_targets
from moa_jax.workdir import Workdir, atomic_write_text, fingerprint


@dataclasses.dataclass(frozen=True)
class MaskedAttention:
  """Prefill-only attention with the rule mask, windows as a traced array [L, N] (one compile
  serves every plan); used to score plans by validation loss."""

  windows: jax.Array  # [L, N] int32
  sink: int

  def __call__(self, layer, q, k, v, q_pos, cache):
    del cache
    return reference_attention(q, k, v, q_pos, q_pos, windows=self.windows[layer],
                               sink=self.sink), None


@functools.partial(jax.jit, static_argnames=("graphdef", "sink"))
def _masked_loss(graphdef, state, tokens, positions, hidden_index, weight, windows, *, sink):
  model = nnx.merge(graphdef, state)
  return response_loss(model, tokens, positions, hidden_index, weight,
                       MaskedAttention(windows, sink))


def validation_loss(model, calibration: CalibrationSet, windows: np.ndarray, sink: int) -> float:
  """Mean response-only cross-entropy of the calibration samples with per-head windows [L, N]."""
  graphdef, state = nnx.split(model)
  total, count = 0.0, 0
  for bucket in calibration.buckets.values():
    positions = bucket.positions()
    for row in range(bucket.num_samples):
      hidden_index, weight = response_targets(bucket.loss_mask[row:row + 1])
      total += float(_masked_loss(graphdef, state, jnp.asarray(bucket.tokens[row:row + 1]),
                                  jnp.asarray(positions[row:row + 1]), jnp.asarray(hidden_index),
                                  jnp.asarray(weight), jnp.asarray(windows, jnp.int32), sink=sink))
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


def compress(config, workdir: str | Path) -> Plan:
  """Run calibration -> profile -> optimize -> choose; return the chosen (validated) plan."""
  start = time.perf_counter()
  work = Workdir(workdir)
  model, tokenizer, model_id = load_model(config.model)
  opt = config.optimize

  calib = _calibration_config(config.calibration, config.seed)
  calib_key = cache_key(cache_key_inputs(model, tokenizer, calib, model_id))
  if work.is_complete("calibration", calib_key):
    _log("calibration: complete, skipped")
  else:
    with work.stage("calibration", calib_key, {"model": model_id}) as out:
      build_calibration(model, tokenizer, calib, model_id=model_id).save(out / "train")
  train_set = CalibrationSet.load(work.path("calibration") / "train")

  prof = config.profile
  profile_key = fingerprint(calib_key, prof.to_dict())
  if work.is_complete("profile", profile_key):
    _log("profile: complete, skipped")
  else:
    with work.stage("profile", profile_key) as out:
      influence = profile_model(model, model.config, train_set, list(prof.lengths),
                                block=prof.block, path=prof.path, batch_size=prof.batch_size,
                                magnitude=prof.magnitude, loss=prof.loss)
      np.savez(out / "influence.npz", **{str(n): e for n, e in influence.items()})
  with np.load(work.path("profile") / "influence.npz") as data:
    influence = {int(n): data[n] for n in data.files}

  rules = rules_lib.candidate_rules(list(prof.lengths), list(opt.constraint_lengths),
                                    alpha_step=opt.alpha_step, betas=tuple(opt.betas))
  optimize_key = fingerprint(profile_key, opt.to_dict())
  if work.is_complete("optimize", optimize_key):
    _log("optimize: complete, skipped")
  else:
    with work.stage("optimize", optimize_key) as out:
      dl = {n: loss_delta(e, rules, n, opt.sink, prof.block) for n, e in influence.items()}
      problem = milp.build_problem(
          dl, rules, list(opt.constraint_lengths), num_kv_heads=model.config.num_kv_heads,
          budget=opt.density, lo=opt.lower, max_rules_per_layer=opt.max_rules_per_layer,
          grouping=opt.grouping, sink=opt.sink, block=prof.block)
      front = pareto.pareto_front(problem, intervals=opt.intervals,
                                  options=milp.SolverOptions(time_limit=opt.time_limit),
                                  workers=opt.workers)
      provenance = {"config": config.to_dict(), "seed": config.seed, "model": model_id,
                    "calibration": calib_key}
      for i, solution in enumerate(front.solutions):
        problem.to_plan(solution, architecture="LlamaForCausalLM",
                        provenance=provenance).save(out / f"plan-{i:03d}.json")
      (out / "front.json").write_text(json.dumps(
          {"plans": len(front.solutions), "solves": front.solves,
           "no_solution": front.no_solution, "seconds": front.seconds,
           "rules": [[r.alpha, r.beta] for r in rules]}, indent=1))
  candidates = [Plan.load(p) for p in sorted(work.path("optimize").glob("plan-*.json"))]

  sel = config.select
  valid = _calibration_config(config.calibration, config.seed + 1, lengths=(sel.length,),
                              samples_per_length=sel.num_samples, split=sel.split)
  valid_key = cache_key(cache_key_inputs(model, tokenizer, valid, model_id))
  choose_key = fingerprint(optimize_key, valid_key, sel.to_dict())
  if work.is_complete("choose", choose_key):
    _log("choose: complete, skipped")
  else:
    with work.stage("choose", choose_key) as out:
      valid_set = build_calibration(model, tokenizer, valid, model_id=model_id)
      valid_set.save(out / "validation")
      n = sel.length
      loss = lambda plan: validation_loss(model, valid_set, plan.windows(n), plan.sink)
      chosen, table = select_plan(candidates, loss)
      baselines = {"dense": loss(dense_plan(model.config, sink=opt.sink)),
                   "uniform": loss(uniform_plan(model.config, opt.density, n, sink=opt.sink))}
      chosen.save(out / "plan.json")
      plots.plot_spans(chosen, n, out / "spans.png")
      plots.plot_pareto_front(candidates, out / "pareto_front.png", chosen=chosen)
      (out / "report.md").write_text(
          _report(config, model_id, chosen, candidates, table, baselines, n))
  for name in ("plan.json", "report.md"):
    atomic_write_text(work.root / name, (work.path("choose") / name).read_text())
  _log(f"compress finished in {time.perf_counter() - start:.1f} s: {work.root / 'plan.json'}")
  return Plan.load(work.root / "plan.json").validate(model.config)


def compress_command(config, workdir: Path | None) -> Plan:
  """`python -m moa_jax compress --config=... --workdir=DIR`."""
  if workdir is None:
    raise SystemExit("error: compress needs --workdir=DIR (its stages resume from there)")
  return compress(config, workdir)


def _report(config, model_id: str, chosen: Plan, candidates: list[Plan], table,
            baselines: dict[str, float], n: int) -> str:
  lengths = sorted(chosen.kv_densities)
  lines = [
      "# MoA compression report", "",
      f"Model: `{model_id}`; KV-density budget "
      f"{config.optimize.density} (band [{config.optimize.lower * config.optimize.density:.3f}, "
      f"{config.optimize.density}]) at lengths {list(config.optimize.constraint_lengths)}; "
      f"profile lengths {list(config.profile.lengths)}; {len(candidates)} Pareto plans.", "",
      "## Chosen plan", "",
      "| length | KV density | attention density |", "|---|---|---|",
      *[f"| {m} | {chosen.kv_densities[m]:.4f} | {chosen.attention_densities[m]:.4f} |"
        for m in lengths], "",
      "Predicted loss increase per profile length: "
      + ", ".join(f"{m}: {z:.4g}" for m, z in sorted(chosen.objectives.items())), "",
      f"## Validation loss at length {n} (response-only cross-entropy)", "",
      "| plan | predicted dL per profile length | validation loss |", "|---|---|---|",
      *[f"| {row['index']}{' (chosen)' if row['chosen'] else ''} | "
        f"{', '.join(f'{z:.4g}' for _, z in sorted(row['objectives'].items()))} | "
        f"{row['loss']:.4f} |" for row in table],
      *[f"| {name} (baseline) | | {value:.4f} |" for name, value in baselines.items()], "",
      "![spans](choose/spans.png)", "", "![Pareto front](choose/pareto_front.png)", "",
  ]
  return "\n".join(lines)
