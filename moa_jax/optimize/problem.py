"""The rule-assignment MILP (docs/method.md, section 4 "The optimization"): data, solutions.

The model. Binary x[k, c]: unit k (a KV group, or a query head in 'query_head' mode) uses rule c.
  * sum_c x[k, c] = 1 for every unit;
  * at every constraint length n:  lo * budget <= mean KV density <= budget, with the KV density
    of the native GQA cache (per KV group: min(sink + W, n) / n);
  * at most K distinct rules per layer;
  * objective: Z_p = sum_k sum_c x[k, c] dL_k(c, n_p) at one profile length n_p, optionally
    with upper bounds Z_q <= eps_q on the others (the epsilon-constraint method).
'kv_group' mode (default): one rule per KV group, dL summed over the group's query heads.
'query_head' mode: one rule per query head; the group's cache holds its largest span.

This module holds only data: `AssignmentProblem` (frozen; build it with `build_problem`), the
`Target` of one solve and the `Solution` it yields. Solving is in `direct` (the whole model to
HiGHS) and `decomposition` (by layer, with a column pool).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from moa_jax.plans import plan as plan_lib
from moa_jax.plans import rules as rules_lib

GROUPINGS = plan_lib.GROUPINGS


class InfeasibleError(ValueError):
  """No assignment satisfies the density band (and the objective bounds, if any)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Solution:
  """One solved assignment.

  rule_index: int [L, U] rule of every unit (U = KV groups or query heads per layer).
  objectives: {profile length: Z_p} (sum of dL over heads, recomputed exactly);
  kv_densities: {constraint length: mean KV density} (recomputed exactly from rule_index);
  primary / upper_bounds: the objective minimized and the epsilon bounds it was solved under;
  mip_gap: relative gap of the primary objective (minus its per-unit minima) to the best lower
  bound; optimal: mip_gap <= SolverOptions.mip_rel_gap; method: 'direct' or 'decomposition'.
  """

  rule_index: np.ndarray
  objectives: dict[int, float]
  kv_densities: dict[int, float]
  primary: int
  upper_bounds: dict[int, float]
  mip_gap: float
  optimal: bool
  seconds: float
  method: str


@dataclasses.dataclass(frozen=True)
class Target:
  """What one solve optimizes, in scaled units (see `AssignmentProblem.cost_scaling`).

  primary: index of the objective minimized (None: none); bounds: ((objective index, scaled
  upper bound), ...); budget: the KV-density budget (None: a variable B, minimized times
  budget_sign, as `feasible_budget_range` asks).
  """

  primary: int | None
  bounds: tuple[tuple[int, float], ...]
  budget: float | None
  budget_sign: float = 1.0


class CostScaling(NamedTuple):
  """costs: float64 [P, L, U, R] shifted and scaled (>= 0, per-unit maxima averaging 1);
  offset, scale: [P], with Z = scale * (scaled costs of the chosen rules) + offset."""

  costs: np.ndarray
  offset: np.ndarray
  scale: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class AssignmentProblem:
  """The data of the MILP; build it with `build_problem`.

  costs: float64 [P, L, U, R] dL of every unit (KV group or query head) under every rule at the
  P profile lengths. cached: int64 [C, R] KV-cache tokens of one head under every rule at the C
  constraint lengths.
  """

  costs: np.ndarray
  profile_lengths: tuple[int, ...]
  constraint_lengths: tuple[int, ...]
  rules: tuple[rules_lib.ElasticRule, ...]
  num_heads: int
  num_kv_heads: int
  budget: float
  lo: float
  max_rules_per_layer: int
  grouping: str
  sink: int
  block: int

  @property
  def num_layers(self) -> int:
    return self.costs.shape[1]

  @property
  def units_per_layer(self) -> int:
    return self.costs.shape[2]

  @property
  def num_rules(self) -> int:
    return self.costs.shape[3]

  @property
  def group_size(self) -> int:
    """Units sharing one KV cache: the query heads of a group ('query_head'), else 1."""
    return self.num_heads // self.num_kv_heads if self.grouping == "query_head" else 1

  @property
  def cache_units(self) -> int:
    """Caches the density averages over: L * K."""
    return self.num_layers * self.num_kv_heads

  @functools.cached_property
  def cached(self) -> np.ndarray:
    alphas = [r.alpha for r in self.rules]
    betas = [r.beta for r in self.rules]
    return np.stack(
      [
        rules_lib.cached_tokens(rules_lib.window_size(alphas, betas, n, self.block), self.sink, n)
        for n in self.constraint_lengths
      ]
    )  # [C, R]

  @functools.cached_property
  def fraction(self) -> np.ndarray:
    """float64 [C, R]: cache tokens / n of one head under each rule at each constraint length."""
    return self.cached / np.array(self.constraint_lengths)[:, None]

  @functools.cached_property
  def cost_scaling(self) -> CostScaling:
    """The costs the solvers see: per objective shifted by the per-unit minima and scaled."""
    floor = self.costs.min(-1, keepdims=True)
    shifted = self.costs - floor
    scale = shifted.max(-1).mean((1, 2))  # [P]
    scale = np.where(scale > 0, scale, 1.0)
    return CostScaling(shifted / scale[:, None, None, None], floor.sum((1, 2, 3)), scale)

  def target(self, primary: int, upper_bounds: Mapping[int, float]) -> Target:
    """The scaled Target of minimizing Z at profile length `primary` with Z_q <= upper_bounds[q]
    under the problem's budget."""
    for n in [primary, *upper_bounds]:
      if n not in self.profile_lengths:
        raise ValueError(f"{n} is not a profile length; profile lengths: {self.profile_lengths}")
    _, offset, scale = self.cost_scaling
    index = {n: p for p, n in enumerate(self.profile_lengths)}
    bounds = tuple(
      (index[n], (v - offset[index[n]]) / scale[index[n]]) for n, v in upper_bounds.items()
    )
    return Target(index[primary], bounds, self.budget)

  def objectives_of(self, rule_index: np.ndarray) -> dict[int, float]:
    """{profile length: Z_p} of an assignment int [L, U]."""
    picked = np.take_along_axis(self.costs, rule_index[None, ..., None], -1)[..., 0]  # [P, L, U]
    return {n: float(z) for n, z in zip(self.profile_lengths, picked.sum((1, 2)))}

  def kv_densities_of(self, rule_index: np.ndarray) -> dict[int, float]:
    """{constraint length: mean KV density} of an assignment int [L, U] (native GQA cache)."""
    tokens = self.cached[:, rule_index]  # [C, L, U]
    tokens = tokens.reshape(tokens.shape[:2] + (self.num_kv_heads, self.group_size)).max(-1)
    return {n: float(t.mean() / n) for n, t in zip(self.constraint_lengths, tokens)}

  def rules_per_layer_of(self, rule_index: np.ndarray) -> list[int]:
    return [len(np.unique(row)) for row in rule_index]

  def to_plan(
    self,
    solution: Solution,
    *,
    architecture: str = plan_lib.DEFAULT_ARCHITECTURE,
    provenance: Mapping | None = None,
  ) -> plan_lib.Plan:
    """The Plan of a solution, with densities at every profile and constraint length."""
    alphas = np.array([r.alpha for r in self.rules])[solution.rule_index]
    betas = np.array([r.beta for r in self.rules])[solution.rule_index]
    plan = plan_lib.Plan(
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      alphas=alphas,
      betas=betas,
      sink=self.sink,
      block=self.block,
      grouping=self.grouping,
      architecture=architecture,
      objectives=solution.objectives,
      provenance=dict(provenance or {}),
    )
    return plan.with_densities(self.profile_lengths + self.constraint_lengths)


def build_problem(
  dl: Mapping[int, np.ndarray],
  rules: Sequence[rules_lib.ElasticRule],
  constraint_lengths: Sequence[int],
  *,
  num_kv_heads: int,
  budget: float,
  lo: float = 0.9,
  max_rules_per_layer: int = 2,
  grouping: str = "kv_group",
  sink: int = rules_lib.DEFAULT_SINK,
  block: int = rules_lib.DEFAULT_BLOCK,
) -> AssignmentProblem:
  """The MILP for predicted loss increases dl = {profile length: float [L, H, R]} (query heads,
  from `loss_delta`), the R candidate `rules` and the KV-density `budget` band."""
  if not dl:
    raise ValueError("build_problem needs dL at one or more profile lengths")
  if grouping not in GROUPINGS:
    raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
  if not 0 < budget <= 1:
    raise ValueError(
      f"the KV-density budget must be in (0, 1] (a window is clipped to the "
      f"length, so 1 is dense), got {budget}"
    )
  if not 0 <= lo <= 1:
    raise ValueError(f"lo must lie in [0, 1], got {lo}")
  if max_rules_per_layer < 1:
    raise ValueError(f"max_rules_per_layer must be >= 1, got {max_rules_per_layer}")
  if not constraint_lengths or min(constraint_lengths) <= 0:
    raise ValueError(f"constraint lengths must be positive, got {constraint_lengths}")
  profile_lengths = tuple(sorted(int(n) for n in dl))
  stacked = np.stack([np.asarray(dl[n], np.float64) for n in profile_lengths])  # [P, L, H, R]
  if stacked.ndim != 4 or stacked.shape[-1] != len(rules):
    raise ValueError(
      f"dL must be [layers, heads, {len(rules)} rules] per profile length, got {stacked.shape[1:]}"
    )
  if not np.all(np.isfinite(stacked)):
    raise ValueError("dL holds NaN or infinite values")
  heads = stacked.shape[2]
  if num_kv_heads <= 0 or heads % num_kv_heads:
    raise ValueError(f"{heads} query heads cannot form {num_kv_heads} KV groups")
  if grouping == "kv_group":  # influence of a group: sum over its query heads
    stacked = stacked.reshape(stacked.shape[:2] + (num_kv_heads, -1, len(rules))).sum(3)
  return AssignmentProblem(
    costs=stacked,
    profile_lengths=profile_lengths,
    constraint_lengths=tuple(sorted(int(n) for n in constraint_lengths)),
    rules=tuple(rules),
    num_heads=heads,
    num_kv_heads=num_kv_heads,
    budget=float(budget),
    lo=float(lo),
    max_rules_per_layer=int(max_rules_per_layer),
    grouping=grouping,
    sink=int(sink),
    block=int(block),
  )
