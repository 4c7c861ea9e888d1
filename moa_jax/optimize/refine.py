"""Validation-guided refinement of a plan: re-linearize the loss at the plan, re-solve, measure.

MoA linearizes the loss once, at the dense model, and trusts the linear model for a plan that
removes half of the KV cache. Here the plan itself is the linearization point, and every step
is checked by the measured loss:

Each round, starting from a plan P (e.g. the uniform window or MoA's own plan):
  1. at every profile length n, `profile.at_plan.window_deltas` at P's windows gives each head's
     estimated loss change for the window of every candidate rule at n, exact in the head's
     output (so restoring keys P masks is scored as well as removing more), averaged over the
     calibration samples of every `Linearization` source at n: the first-order term and/or the
     second-order (Fisher) term, which is what text the model predicts well responds to;
  2. the MILP of `problem.py` (same rules, density band and rules-per-layer limit as MoA)
     minimizes the sum over profile lengths of those changes plus `penalty * spread` for every
     KV group that changes its rule, once per penalty in `penalties` (spread: the mean over
     groups of their cost range; larger penalties move fewer groups, a trust region);
  3. every distinct solution is scored by its measured response loss on the validation traces
     (`optimize.measured`, exact; the weighted mean over traces of their mean loss); the best
     one replaces P if it lowers that score.
It stops after `rounds` rounds or when no candidate beats P. Only 'kv_group' plans.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moa_jax.calibration.build import CalibrationBucket
from moa_jax.optimize import measured
from moa_jax.optimize.direct import DirectSolver, SolverOptions
from moa_jax.optimize.problem import build_problem
from moa_jax.plans import rules as rules_lib
from moa_jax.plans.plan import Plan
from moa_jax.profile import at_plan


@dataclasses.dataclass(frozen=True)
class Linearization:
  """Calibration samples the loss is linearized on: their first-order term (first_order) and a
  second-order term from fisher_draws label draws (0: none), see `at_plan.window_deltas`."""

  bucket: CalibrationBucket
  first_order: bool = True
  fisher_draws: int = 0

  def __post_init__(self):
    if not self.first_order and self.fisher_draws < 1:
      raise ValueError("a Linearization needs the first-order term or fisher_draws >= 1")


@dataclasses.dataclass(frozen=True)
class RefineOptions:
  """rounds: at most this many re-linearizations; penalties: trust-region penalties per changed
  KV group, in units of the mean cost spread (0: the pure first-order step); loss: the profile
  loss ('nll' or 'log_odds'); budget, lower, max_rules_per_layer, constraint_lengths: the MILP's
  (as in `optimize`); time_limit: seconds per MILP solve."""

  rounds: int = 3
  penalties: tuple[float, ...] = (0.0, 0.1, 0.4)
  loss: str = "nll"
  budget: float = 0.5
  lower: float = 0.9
  max_rules_per_layer: int = 2
  constraint_lengths: tuple[int, ...] = (1024, 2048, 4096)
  time_limit: float = 20.0

  def __post_init__(self):
    if self.rounds < 1 or not self.penalties or min(self.penalties) < 0:
      raise ValueError("refine needs rounds >= 1 and non-negative penalties (at least one)")


def plan_rules(plan: Plan, rules: Sequence[rules_lib.ElasticRule]) -> list[rules_lib.ElasticRule]:
  """The candidate rules plus the plan's own (so that keeping a group's rule is a choice)."""
  return sorted(set(rules) | {r for row in plan.rules() for r in row})


def validation_score(
  model, plan: Plan, traces: Sequence[measured.DenseTrace], weights: Sequence[float] | None = None
) -> float:
  """Weighted mean over the traces of their mean response cross-entropy under the plan."""
  means = [
    float(np.mean(measured.masked_losses(model, t, plan.windows(t.length), plan.sink)))
    for t in traces
  ]
  return float(np.average(means, weights=weights))


def _costs(
  model, plan: Plan, rules, calibration: Mapping[int, Sequence[Linearization]], loss: str, seed: int
) -> dict[int, np.ndarray]:
  """{n: float64 [L, N, R]}: mean estimated loss change of each head under each rule."""
  costs = {}
  for n, sources in sorted(calibration.items()):
    windows = rules_lib.window_size(
      [r.alpha for r in rules], [r.beta for r in rules], n, plan.block
    )  # [R]
    candidates, index = np.unique(windows, return_inverse=True)
    total, count = 0.0, 0
    for source in sources:
      first, second = at_plan.window_deltas(
        model,
        source.bucket,
        plan.windows(n),
        candidates,
        sink=plan.sink,
        loss=loss,
        fisher_draws=source.fisher_draws,
        seed=seed,
        components=True,
      )
      total = total + (first.sum(0) if source.first_order else 0.0) + second.sum(0)
      count += source.bucket.num_samples
    costs[n] = (total / count)[..., index]
  return costs


def refine_plan(
  model,
  plan: Plan,
  rules: Sequence[rules_lib.ElasticRule],
  calibration: Mapping[int, Sequence[Linearization]],
  validation: Sequence[measured.DenseTrace],
  options: RefineOptions = RefineOptions(),
  log: Callable[[str], None] = print,
  validation_weights: Sequence[float] | None = None,
) -> tuple[Plan, list[dict[str, Any]]]:
  """The refined plan and one history row per candidate measured (see the module docstring).

  calibration: {profile length: [Linearization, ...]} to linearize on; validation: dense
  traces of other samples (`measured.dense_trace`) that score the candidates, weighted by
  validation_weights (default equal).
  """
  if plan.grouping != "kv_group":
    raise ValueError("refine_plan handles 'kv_group' plans only")
  if not calibration or not validation:
    raise ValueError("refine_plan needs calibration buckets and validation traces")
  plan.validate(model.config)
  rules = plan_rules(plan, rules)
  rule_of = {r: i for i, r in enumerate(rules)}
  lengths = sorted(calibration)
  score = lambda p: validation_score(model, p, validation, validation_weights)
  best, best_score = plan, score(plan)
  history = [
    dict(
      round=0,
      penalty=None,
      predicted=0.0,
      measured=best_score,
      accepted=True,
      kv_densities=plan.with_densities(options.constraint_lengths).kv_densities,
    )
  ]
  log(f"refine: start, measured {best_score:.5f}")
  for round_ in range(1, options.rounds + 1):
    start = time.perf_counter()
    current = np.array([[rule_of[r] for r in row] for row in best.rules()])  # [L, K]
    costs = _costs(model, best, rules, calibration, options.loss, seed=round_)
    total = sum(costs.values())  # [L, N, R]: summed over profile lengths
    g = model.config.num_heads // model.config.num_kv_heads
    grouped = total.reshape(total.shape[0], -1, g, total.shape[-1]).sum(2)  # [L, K, R]
    spread = float(np.mean(grouped.max(-1) - grouped.min(-1)))
    changed = np.ones(grouped.shape, bool)
    np.put_along_axis(changed, current[..., None], False, -1)
    candidates = {}
    for penalty in options.penalties:
      dl = total + (penalty * spread / g) * np.repeat(changed, g, axis=1)
      problem = build_problem(
        {lengths[0]: dl},
        rules,
        options.constraint_lengths,
        num_kv_heads=model.config.num_kv_heads,
        budget=options.budget,
        lo=options.lower,
        max_rules_per_layer=options.max_rules_per_layer,
        sink=best.sink,
        block=best.block,
      )
      solution = DirectSolver(problem).solve(options=SolverOptions(time_limit=options.time_limit))
      key = solution.rule_index.tobytes()
      if key not in candidates and not np.array_equal(solution.rule_index, current):
        predicted = float(np.take_along_axis(grouped, solution.rule_index[..., None], -1).sum())
        plan_ = problem.to_plan(solution, provenance=dict(best.provenance))
        candidates[key] = (penalty, predicted, plan_, int((solution.rule_index != current).sum()))
    if not candidates:
      log(f"refine: round {round_}: the linearized optimum is the plan itself; stop")
      break
    improved = False
    for penalty, predicted, candidate, moves in candidates.values():
      value = score(candidate)
      accepted = value < best_score
      history.append(
        dict(
          round=round_,
          penalty=penalty,
          predicted=predicted,
          moves=moves,
          measured=value,
          accepted=False,
          kv_densities=candidate.kv_densities,
        )
      )
      log(
        f"refine: round {round_} penalty {penalty}: {moves} groups moved, predicted "
        f"{predicted:+.5f}, measured {value:.5f} (best {best_score:.5f})"
      )
      if accepted:
        best, best_score, improved = candidate, value, True
        winner = len(history) - 1
    if not improved:
      log(f"refine: round {round_}: no candidate lowers the measured loss; stop")
      break
    history[winner]["accepted"] = True
    log(f"refine: round {round_} done in {time.perf_counter() - start:.0f} s")
  refined = dataclasses.replace(best, provenance=dict(best.provenance, refine=history))
  return refined, history
