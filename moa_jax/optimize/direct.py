"""Solving an AssignmentProblem, and the direct method: the whole model to HiGHS's MIP solver.

`Solver` is what both methods share: `solve` (one objective under epsilon bounds, as a
`Solution`, or InfeasibleError naming the smallest feasible budget) and `feasible_budget_range`,
over a method's `solve_target`. `DirectSolver` hands the model of docs/method.md ("The
optimization", section 4) to scipy.optimize.milp: exact within mip_rel_gap, the default for small
problems and the reference the tests enumerate against. `decomposition.Decomposition` is the
other method.

The direct model adds to the binaries x[k, c] of `problem`:
  * y[l, c] >= x[k, c] for k in layer l, sum_c y[l, c] <= K (at most K distinct rules per layer;
    left out when K >= min(units, rules));
  * 'query_head' mode: per group g and constraint length n a continuous m[g, n] carries the
    group's cache size exactly (as a fraction of n): m >= span_h(n) for every head h of g, and
    m <= span_h(n) + M (1 - u[h, n]) with binaries u[., n] choosing the head that attains the
    maximum (sum_h u[h, n] = 1), so the density band cannot be met by inflating m beyond the
    largest span.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from moa_jax.optimize import problem as problem_lib

METHODS = ("auto", "direct", "decomposition")


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """How to solve.

  time_limit: seconds per solve (None: no limit); mip_rel_gap: HiGHS's relative MIP gap (and the
  decomposition's target gap); presolve: HiGHS's MIP presolve (off by default: the HiGHS 1.12 in
  scipy 1.18 declared a small feasible query_head instance infeasible with it, and it spends
  ~30 s on the full-size direct model); method: 'direct',
  'decomposition' or 'auto' (direct while the model has at most `direct_max_binaries` x
  binaries; see `decomposition.solver_for`); max_rounds: column-generation rounds per phase;
  columns_per_round / final_columns: decomposition columns added per layer each round / after
  convergence; integer_columns: columns per layer (smallest reduced cost) in the first integral
  master.
  """

  time_limit: float | None = 20.0
  mip_rel_gap: float = 1e-3
  presolve: bool = False
  method: str = "auto"
  direct_max_binaries: int = 4096
  max_rounds: int = 400
  columns_per_round: int = 2
  final_columns: int = 16
  integer_columns: int = 24

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

  def seconds_left(self, start: float) -> float | None:
    """Seconds left of time_limit for a solve begun at perf_counter() `start` (None: no limit)."""
    if self.time_limit is None:
      return None
    return self.time_limit - (time.perf_counter() - start)

  def milp_options(self, start: float) -> dict:
    """scipy.optimize.milp's options for a solve begun at `start`."""
    options = {"disp": False, "presolve": self.presolve, "mip_rel_gap": self.mip_rel_gap}
    seconds_left = self.seconds_left(start)
    if seconds_left is not None:
      options["time_limit"] = max(seconds_left, 1.0)
    return options


class Outcome(NamedTuple):
  """A method's answer to a Target: rule_index int [L, U], relative gap, the budget (the Target's,
  or the variable B's value) and the method that found it."""

  rule_index: np.ndarray
  gap: float
  budget: float
  method: str


class Solver(abc.ABC):
  """Solves one problem for any number of Targets (thread-safe: `pareto_front` shares one)."""

  def __init__(self, problem: problem_lib.AssignmentProblem):
    self.problem = problem

  @abc.abstractmethod
  def solve_target(
    self, target: problem_lib.Target, options: SolverOptions, start: float
  ) -> Outcome | None:
    """The best assignment found for `target`, or None when it is infeasible."""

  def solve(
    self,
    primary: int | None = None,
    upper_bounds: Mapping[int, float] | None = None,
    options: SolverOptions = SolverOptions(),
  ) -> problem_lib.Solution:
    """Minimize Z at profile length `primary` (default: the first) subject to the density band,
    the K-rule limit and Z_q <= upper_bounds[q]. Raises InfeasibleError (a ValueError; for an
    infeasible budget it names the smallest feasible one) or TimeoutError."""
    problem = self.problem
    primary = problem.profile_lengths[0] if primary is None else int(primary)
    upper_bounds = {int(n): float(v) for n, v in (upper_bounds or {}).items()}
    target = problem.target(primary, upper_bounds)
    start = time.perf_counter()
    outcome = self.solve_target(target, options, start)
    if outcome is None:
      if upper_bounds:
        raise problem_lib.InfeasibleError(
          f"no assignment meets the density band and the objective bounds {upper_bounds}"
        )
      smallest, largest = self.feasible_budget_range(options)
      raise problem_lib.InfeasibleError(
        f"KV-density budget {problem.budget} is infeasible (band [{problem.lo} * budget, "
        f"budget] at lengths {problem.constraint_lengths}): the smallest feasible budget is "
        f"{smallest:.4f} (largest {largest:.4f})"
      )
    rule_index = outcome.rule_index
    return problem_lib.Solution(
      rule_index=rule_index,
      objectives=problem.objectives_of(rule_index),
      kv_densities=problem.kv_densities_of(rule_index),
      primary=primary,
      upper_bounds=upper_bounds,
      mip_gap=outcome.gap,
      optimal=outcome.gap <= options.mip_rel_gap,
      seconds=time.perf_counter() - start,
      method=outcome.method,
    )

  def feasible_budget_range(self, options: SolverOptions = SolverOptions()) -> tuple[float, float]:
    """(smallest, largest) budget B for which lo * B <= KV density <= B can hold at every
    constraint length under the K-rule limit (solved with B as a variable; the decomposition
    returns budgets that are feasible, within its gap of the extremes)."""
    found = []
    for sign in (1.0, -1.0):
      outcome = self.solve_target(
        problem_lib.Target(None, (), None, sign), options, time.perf_counter()
      )
      if outcome is None:
        raise problem_lib.InfeasibleError(
          f"no budget makes the density band (lo={self.problem.lo}) feasible with these rules "
          f"and {self.problem.max_rules_per_layer} rules per layer: lower lo or widen the rule "
          "grid"
        )
      found.append(outcome.budget)
    return found[0], found[1]


class DirectSolver(Solver):
  """The whole model to HiGHS; its Target-independent rows are built once, here."""

  def __init__(self, problem: problem_lib.AssignmentProblem):
    super().__init__(problem)
    self._structure = _direct_structure(problem)

  def solve_target(
    self, target: problem_lib.Target, options: SolverOptions, start: float
  ) -> Outcome | None:
    problem = self.problem
    integrality, upper, rows, density = self._structure
    scaled = problem.cost_scaling.costs.reshape(len(problem.profile_lengths), -1)  # [P, L*U*R]
    n_vars = integrality.size
    pad = lambda v: np.r_[v, np.zeros(n_vars - v.size)]
    units = problem.cache_units
    constraints = list(rows)
    for p, rhs in target.bounds:
      constraints.append((sp.csr_array(pad(scaled[p])[None]), -np.inf, rhs))
    if target.budget is not None:
      objective = pad(scaled[target.primary])
      constraints.append((density, problem.lo * target.budget * units, target.budget * units))
    else:  # B as one more continuous variable
      widen = lambda a: sp.hstack([a, sp.csr_array((a.shape[0], 1))], format="csr")
      budget_col = sp.csr_array(np.full((density.shape[0], 1), float(units)))
      constraints = [(widen(a), lb, ub) for a, lb, ub in constraints]
      constraints += [
        (sp.hstack([density, -problem.lo * budget_col]), 0.0, np.inf),
        (sp.hstack([density, -budget_col]), -np.inf, 0.0),
      ]
      integrality, upper = np.r_[integrality, 0], np.r_[upper, 1.0]  # a KV density is <= 1
      objective = np.r_[np.zeros(n_vars), target.budget_sign]
    result = scipy.optimize.milp(
      objective,
      integrality=integrality,
      bounds=scipy.optimize.Bounds(0, upper),
      constraints=[scipy.optimize.LinearConstraint(a, lb, ub) for a, lb, ub in constraints],
      options=options.milp_options(start),
    )
    if result.status == 2:
      return None
    if result.x is None:
      raise TimeoutError(
        f"HiGHS found no assignment ({result.message}); raise "
        f"SolverOptions.time_limit (now {options.time_limit} s)"
      )
    L, U, R = problem.num_layers, problem.units_per_layer, problem.num_rules
    rule_index = result.x[: L * U * R].reshape(L, U, R).argmax(-1)
    gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    return Outcome(rule_index, gap, float(result.x[-1]), "direct")


def _direct_structure(problem: problem_lib.AssignmentProblem):
  """(integrality, upper bounds, rows [(A, lb, ub)] that involve neither the budget nor an
  objective, density rows A [C, vars] (sum of cache fractions)) of the direct model."""
  L, U, R = problem.num_layers, problem.units_per_layer, problem.num_rules
  C = len(problem.constraint_lengths)
  n_x = L * U * R
  n_y = L * R if problem.max_rules_per_layer < min(U, R) else 0
  query_head = problem.grouping == "query_head"
  n_m = problem.cache_units * C if query_head else 0
  n_vars = n_x + n_y + n_m + (L * U * C if query_head else 0)
  m_start, u_start = n_x + n_y, n_x + n_y + n_m
  integrality = np.ones(n_vars, np.int8)
  integrality[m_start:u_start] = 0
  upper = np.ones(n_vars)
  units = np.arange(L * U)
  x_cols = (units[:, None] * R + np.arange(R)).ravel()  # unit-major, rule-minor
  one_hot = sp.csr_array((np.ones(n_x), (np.repeat(units, R), x_cols)), shape=(L * U, n_vars))
  rows = [(one_hot, 1.0, 1.0)]
  if n_y:  # at most K distinct rules per layer
    y_cols = n_x + (x_cols // (U * R)) * R + x_cols % R
    link = sp.csr_array(
      (np.r_[np.ones(n_x), -np.ones(n_x)], (np.r_[x_cols, x_cols], np.r_[x_cols, y_cols])),
      shape=(n_x, n_vars),
    )
    limit = sp.csr_array(
      (np.ones(L * R), (np.repeat(np.arange(L), R), n_x + np.arange(L * R))), shape=(L, n_vars)
    )
    rows += [(link, -np.inf, 0.0), (limit, -np.inf, float(problem.max_rules_per_layer))]
  fraction = problem.fraction
  if not query_head:
    density = sp.csr_array(
      (np.tile(fraction, (1, L * U)).ravel(), (np.repeat(np.arange(C), n_x), np.tile(x_cols, C))),
      shape=(C, n_vars),
    )
    return integrality, upper, rows, density
  groups = units // problem.group_size
  big_m = fraction.max(-1) - fraction.min(-1)  # [C]
  for ci in range(C):
    m_cols = m_start + groups * C + ci  # [LH] the head's group cache at length ci
    u_cols = u_start + units * C + ci
    at_least = sp.csr_array(
      (
        np.r_[np.ones(L * U), -np.tile(fraction[ci], L * U)],
        (np.r_[units, np.repeat(units, R)], np.r_[m_cols, x_cols]),
      ),
      shape=(L * U, n_vars),
    )
    at_most = at_least + sp.csr_array(
      (np.full(L * U, big_m[ci]), (units, u_cols)), shape=(L * U, n_vars)
    )
    pick = sp.csr_array((np.ones(L * U), (groups, u_cols)), shape=(problem.cache_units, n_vars))
    rows += [(at_least, 0.0, np.inf), (at_most, -np.inf, big_m[ci]), (pick, 1.0, 1.0)]
  density = sp.csr_array(
    (
      np.ones(C * problem.cache_units),
      (
        np.repeat(np.arange(C), problem.cache_units),
        m_start
        + np.tile(np.arange(problem.cache_units) * C, C)
        + np.repeat(np.arange(C), problem.cache_units),
      ),
    ),
    shape=(C, n_vars),
  )
  return integrality, upper, rows, density
