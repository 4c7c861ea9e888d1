"""The rule-assignment MILP of MOA_SPEC.md section 4, solved with HiGHS (through scipy).

The model. Binary x[k, c]: unit k (a KV group, or a query head in 'query_head' mode) uses rule c.
  * sum_c x[k, c] = 1 for every unit;
  * at every constraint length n:  lo * budget <= mean KV density <= budget, with the KV density
    of the native GQA cache (per KV group: min(sink + W, n) / n);
  * at most K distinct rules per layer: y[l, c] >= x[k, c] for k in layer l, sum_c y[l, c] <= K;
  * objective: Z_p = sum_k sum_c x[k, c] dL_k(c, n_p) at one profile length n_p, optionally
    with upper bounds Z_q <= eps_q on the others (the epsilon-constraint method).
'kv_group' mode (default): one rule per KV group, dL summed over the group's query heads.
'query_head' mode: one rule per query head; the group's cache holds its largest span. Per group g
and constraint length n a continuous m[g, n] carries that cache size exactly (as a fraction of n):
m >= span_h(n) for every head h of g, and m <= span_h(n) + M (1 - u[h, n]) with binaries u[., n]
choosing the head that attains the maximum (sum_h u[h, n] = 1), so the density band cannot be met
by inflating m beyond the largest span.

Two ways to solve the same model (SolverOptions.method):
  * 'direct': the model above, handed to HiGHS's MIP solver (scipy.optimize.milp). Exact within
    mip_rel_gap; the default for small problems and the reference the tests enumerate against.
  * 'decomposition' (Dantzig-Wolfe by layer): everything but the density band and the epsilon
    bounds separates by layer, so a column is one layer's whole assignment using at most K rules.
    A master LP over the generated columns (HiGHS through scipy.optimize.linprog) is re-solved
    while pricing finds better columns: for each layer, every K-subset of rules is scored with the
    LP duals (exhaustive, vectorized). The Lagrangian bound of the last duals is a lower bound on
    the MILP optimum. HiGHS then solves the master with binary weights: first only the layers the
    LP left fractional, over their best columns; then, if that is not within mip_rel_gap, every
    column whose reduced cost leaves room to beat it. The reported gap is against the lower bound.
    If the columns admit no integral assignment at all, the direct model decides.
    At 32 layers x 32 heads x 48 rules the direct model's presolve and root LP alone take over a
    minute on 2 cores; the decomposition solves in about a second, to a gap of ~0.1% (single
    objective) or a few tenths of a percent (with epsilon bounds; see benchmarks/milp.json).
    (In 'query_head' mode with K >= 3 and groups of >= 3 heads, pricing a subset of three or more
    rules may under-estimate a reduced cost: the bound stays valid, only looser.)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from moa_jax.plans import plan as plan_lib
from moa_jax.plans import rules as rules_lib

GROUPINGS = plan_lib.GROUPINGS
METHODS = ("auto", "direct", "decomposition")
_PRICING_CHUNK = 1 << 22  # floats per pricing block


class InfeasibleError(ValueError):
  """No assignment satisfies the density band (and the objective bounds, if any)."""


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """How to solve.

  time_limit: seconds per solve (None: no limit); mip_rel_gap: HiGHS's relative MIP gap (and the
  decomposition's target gap); presolve: HiGHS's MIP presolve (off by default: the HiGHS 1.12 in
  scipy 1.18 declared a small feasible query_head instance infeasible with it, and it spends
  ~30 s on the full-size direct model); method: 'direct',
  'decomposition' or 'auto' (direct while the model has at most `direct_max_binaries` x
  binaries); max_rounds: column-generation rounds per phase; columns_per_round /
  final_columns: decomposition columns added per layer each round / after convergence;
  integer_columns: columns per layer (smallest reduced cost) in the first integral master.
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

  def milp_options(self, seconds_left: float | None) -> dict:
    options = {"disp": False, "presolve": self.presolve, "mip_rel_gap": self.mip_rel_gap}
    if seconds_left is not None:
      options["time_limit"] = max(seconds_left, 1.0)
    return options


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


@dataclasses.dataclass
class _ColumnPool:
  """Generated layer assignments (columns), shared by every solve of one problem."""

  assignments: list[np.ndarray] = dataclasses.field(default_factory=list)  # [U] int each
  layers: list[int] = dataclasses.field(default_factory=list)
  objectives: list[np.ndarray] = dataclasses.field(default_factory=list)  # [P] scaled each
  densities: list[np.ndarray] = dataclasses.field(default_factory=list)  # [C] each
  seen: set = dataclasses.field(default_factory=set)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass(frozen=True)
class _Master:
  """What one decomposition solve optimizes: the primary objective index (None: none), scaled
  epsilon bounds {objective index: rhs}, and the budget (None: a variable B minimized times
  budget_sign)."""

  primary: int | None
  bounds: tuple[tuple[int, float], ...]
  budget: float | None
  budget_sign: float = 1.0


class _MasterArrays(NamedTuple):
  """A restricted master: objective, A_ub (sparse), b_ub, convexity A_eq, variable upper
  bounds, the number of pool columns it holds (the first variables) and their layers."""

  cost: np.ndarray
  a_ub: sp.csr_array
  b_ub: np.ndarray
  a_eq: sp.csr_array
  upper: np.ndarray
  n_cols: int
  layers: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class _LPState:
  """The last master LP of a column generation: value, Lagrangian lower bound, inequality duals,
  the unit weights [L, U, R] and density weights rho [C] they price with, the priced value of
  every layer under every rule subset [L, S], and the LP's column weights (pool prefix)."""

  value: float
  lower_bound: float
  duals: np.ndarray
  weights: np.ndarray
  rho: np.ndarray
  subset_values: np.ndarray
  x: np.ndarray


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
  _pool: _ColumnPool = dataclasses.field(default_factory=_ColumnPool, init=False, repr=False)

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
    return self.num_heads // self.num_kv_heads if self.grouping == "query_head" else 1

  @property
  def cache_units(self) -> int:
    """Caches the density averages over: L * K."""
    return self.num_layers * self.num_kv_heads

  @functools.cached_property
  def cached(self) -> np.ndarray:
    alphas = [r.alpha for r in self.rules]
    betas = [r.beta for r in self.rules]
    return np.stack([
        rules_lib.cached_tokens(rules_lib.window_size(alphas, betas, n, self.block), self.sink, n)
        for n in self.constraint_lengths])  # [C, R]

  @functools.cached_property
  def fraction(self) -> np.ndarray:
    """float64 [C, R]: cache tokens / n of one head under each rule at each constraint length."""
    return self.cached / np.array(self.constraint_lengths)[:, None]

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

  def to_plan(self, solution: Solution, *, architecture: str = plan_lib.DEFAULT_ARCHITECTURE,
              provenance: Mapping | None = None) -> plan_lib.Plan:
    """The Plan of a solution, with densities at every profile and constraint length."""
    alphas = np.array([r.alpha for r in self.rules])[solution.rule_index]
    betas = np.array([r.beta for r in self.rules])[solution.rule_index]
    plan = plan_lib.Plan(
        num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        alphas=alphas, betas=betas, sink=self.sink, block=self.block, grouping=self.grouping,
        architecture=architecture, objectives=solution.objectives,
        provenance=dict(provenance or {}))
    return plan.with_densities(self.profile_lengths + self.constraint_lengths)

  @functools.cached_property
  def _cost_scaling(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per objective: shifted-and-scaled costs [P, L, U, R] (>= 0, per-unit maxima averaging 1),
    offset [P] and scale [P], with Z = scale * (scaled costs of the chosen rules) + offset."""
    floor = self.costs.min(-1, keepdims=True)
    shifted = self.costs - floor
    scale = shifted.max(-1).mean((1, 2))  # [P]
    scale = np.where(scale > 0, scale, 1.0)
    return shifted / scale[:, None, None, None], floor.sum((1, 2, 3)), scale

  # ------------------------------------------------------------------------- solving

  def solve(self, primary: int | None = None, upper_bounds: Mapping[int, float] | None = None,
            options: SolverOptions = SolverOptions()) -> Solution:
    """Minimize Z at profile length `primary` (default: the first) subject to the density band,
    the K-rule limit and Z_q <= upper_bounds[q]. Raises InfeasibleError (a ValueError; for an
    infeasible budget it names the smallest feasible one) or TimeoutError."""
    primary = self.profile_lengths[0] if primary is None else int(primary)
    upper_bounds = {int(n): float(v) for n, v in (upper_bounds or {}).items()}
    for n in [primary, *upper_bounds]:
      if n not in self.profile_lengths:
        raise ValueError(f"{n} is not a profile length; profile lengths: {self.profile_lengths}")
    _, offset, scale = self._cost_scaling
    index = {n: p for p, n in enumerate(self.profile_lengths)}
    bounds = tuple((index[n], (v - offset[index[n]]) / scale[index[n]])
                   for n, v in upper_bounds.items())
    master = _Master(index[primary], bounds, self.budget)
    start = time.perf_counter()
    solver = self._solve_direct if self._method(options) == "direct" else self._solve_decomposed
    outcome = solver(master, options, start)
    if outcome is None:
      if upper_bounds:
        raise InfeasibleError(f"no assignment meets the density band and the objective bounds "
                              f"{upper_bounds}")
      smallest, largest = self.feasible_budget_range(options)
      raise InfeasibleError(
          f"KV-density budget {self.budget} is infeasible (band [{self.lo} * budget, budget] at "
          f"lengths {self.constraint_lengths}): the smallest feasible budget is {smallest:.4f} "
          f"(largest {largest:.4f})")
    rule_index, gap, _, method = outcome
    return Solution(
        rule_index=rule_index, objectives=self.objectives_of(rule_index),
        kv_densities=self.kv_densities_of(rule_index), primary=primary,
        upper_bounds=upper_bounds, mip_gap=gap, optimal=gap <= options.mip_rel_gap,
        seconds=time.perf_counter() - start, method=method)

  def feasible_budget_range(self, options: SolverOptions = SolverOptions()) -> tuple[float, float]:
    """(smallest, largest) budget B for which lo * B <= KV density <= B can hold at every
    constraint length under the K-rule limit (solved with B as a variable; the decomposition
    returns budgets that are feasible, within its gap of the extremes)."""
    solver = self._solve_direct if self._method(options) == "direct" else self._solve_decomposed
    found = []
    for sign in (1.0, -1.0):
      outcome = solver(_Master(None, (), None, sign), options, time.perf_counter())
      if outcome is None:
        raise InfeasibleError(
            f"no budget makes the density band (lo={self.lo}) feasible with these rules and "
            f"{self.max_rules_per_layer} rules per layer: lower lo or widen the rule grid")
      found.append(outcome[2])
    return found[0], found[1]

  def _method(self, options: SolverOptions) -> str:
    if options.method != "auto":
      return options.method
    binaries = self.num_layers * self.units_per_layer * self.num_rules
    return "direct" if binaries <= options.direct_max_binaries else "decomposition"

  def _seconds_left(self, options: SolverOptions, start: float) -> float | None:
    if options.time_limit is None:
      return None
    return options.time_limit - (time.perf_counter() - start)

  # ------------------------------------------------------------------- direct method

  @functools.cached_property
  def _direct_structure(self):
    """(integrality, upper bounds, rows [(A, lb, ub)] that involve neither the budget nor an
    objective, density rows A [C, vars] (sum of cache fractions)) of the direct model."""
    L, U, R, C = self.num_layers, self.units_per_layer, self.num_rules, len(self.constraint_lengths)
    n_x = L * U * R
    n_y = L * R if self.max_rules_per_layer < min(U, R) else 0
    query_head = self.grouping == "query_head"
    n_m = self.cache_units * C if query_head else 0
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
      link = sp.csr_array((np.r_[np.ones(n_x), -np.ones(n_x)],
                           (np.r_[x_cols, x_cols], np.r_[x_cols, y_cols])), shape=(n_x, n_vars))
      limit = sp.csr_array((np.ones(L * R), (np.repeat(np.arange(L), R), n_x + np.arange(L * R))),
                           shape=(L, n_vars))
      rows += [(link, -np.inf, 0.0), (limit, -np.inf, float(self.max_rules_per_layer))]
    fraction = self.fraction
    if not query_head:
      density = sp.csr_array(
          (np.tile(fraction, (1, L * U)).ravel(),
           (np.repeat(np.arange(C), n_x), np.tile(x_cols, C))), shape=(C, n_vars))
      return integrality, upper, rows, density
    groups = units // self.group_size
    big_m = fraction.max(-1) - fraction.min(-1)  # [C]
    for ci in range(C):
      m_cols = m_start + groups * C + ci  # [LH] the head's group cache at length ci
      u_cols = u_start + units * C + ci
      at_least = sp.csr_array(
          (np.r_[np.ones(L * U), -np.tile(fraction[ci], L * U)],
           (np.r_[units, np.repeat(units, R)], np.r_[m_cols, x_cols])), shape=(L * U, n_vars))
      at_most = at_least + sp.csr_array(
          (np.full(L * U, big_m[ci]), (units, u_cols)), shape=(L * U, n_vars))
      pick = sp.csr_array((np.ones(L * U), (groups, u_cols)), shape=(self.cache_units, n_vars))
      rows += [(at_least, 0.0, np.inf), (at_most, -np.inf, big_m[ci]), (pick, 1.0, 1.0)]
    density = sp.csr_array(
        (np.ones(C * self.cache_units),
         (np.repeat(np.arange(C), self.cache_units),
          m_start + np.tile(np.arange(self.cache_units) * C, C)
          + np.repeat(np.arange(C), self.cache_units))), shape=(C, n_vars))
    return integrality, upper, rows, density

  def _solve_direct(self, master: _Master, options: SolverOptions, start: float):
    """(rule_index [L, U], gap, budget, 'direct') or None when infeasible."""
    integrality, upper, rows, density = self._direct_structure
    scaled = self._cost_scaling[0].reshape(len(self.profile_lengths), -1)  # [P, L*U*R]
    n_vars = integrality.size
    pad = lambda v: np.r_[v, np.zeros(n_vars - v.size)]
    units = self.cache_units
    constraints = list(rows)
    for p, rhs in master.bounds:
      constraints.append((sp.csr_array(pad(scaled[p])[None]), -np.inf, rhs))
    if master.budget is not None:
      objective = pad(scaled[master.primary])
      constraints.append((density, self.lo * master.budget * units, master.budget * units))
    else:  # B as one more continuous variable
      widen = lambda a: sp.hstack([a, sp.csr_array((a.shape[0], 1))], format="csr")
      budget_col = sp.csr_array(np.full((density.shape[0], 1), float(units)))
      constraints = [(widen(a), lb, ub) for a, lb, ub in constraints]
      constraints += [(sp.hstack([density, -self.lo * budget_col]), 0.0, np.inf),
                      (sp.hstack([density, -budget_col]), -np.inf, 0.0)]
      integrality, upper = np.r_[integrality, 0], np.r_[upper, 1.0 / max(self.lo, 1e-9)]
      objective = np.r_[np.zeros(n_vars), master.budget_sign]
    result = scipy.optimize.milp(
        objective, integrality=integrality, bounds=scipy.optimize.Bounds(0, upper),
        constraints=[scipy.optimize.LinearConstraint(a, lb, ub) for a, lb, ub in constraints],
        options=options.milp_options(self._seconds_left(options, start)))
    if result.status == 2:
      return None
    if result.x is None:
      raise TimeoutError(f"HiGHS found no assignment ({result.message}); raise "
                         f"SolverOptions.time_limit (now {options.time_limit} s)")
    x = result.x[:self.num_layers * self.units_per_layer * self.num_rules]
    rule_index = x.reshape(self.num_layers, self.units_per_layer, self.num_rules).argmax(-1)
    gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    return rule_index, gap, float(result.x[-1]), "direct"

  # ------------------------------------------------------------ decomposition method

  @functools.cached_property
  def _rule_subsets(self) -> np.ndarray:
    """int [S, K']: every K'-subset of the rules, K' = min(K, R)."""
    size = min(self.max_rules_per_layer, self.num_rules)
    count = math.comb(self.num_rules, size)
    if count * self.num_layers * self.units_per_layer > 16 * _PRICING_CHUNK:
      raise ValueError(f"pricing {count} subsets of {size} rules per layer is too slow: use "
                       "SolverOptions(method='direct') or fewer rules per layer")
    return np.array(list(itertools.combinations(range(self.num_rules), size)), np.int64)

  @functools.cached_property
  def _position_subsets(self) -> list[tuple[int, ...]]:
    """Subsets T of a rule subset's positions that one KV group can use (|T| <= group size)."""
    size = self._rule_subsets.shape[1]
    most = min(size, self.group_size)
    return [t for k in range(1, most + 1) for t in itertools.combinations(range(size), k)]

  def _column_coefficients(self, assignments: np.ndarray):
    """Scaled objectives [J, L, P] and cache-fraction sums [J, L, C] of assignments int
    [J, L, U] (J candidate assignments of every layer)."""
    scaled = self._cost_scaling[0]  # [P, L, U, R]
    layer = np.arange(self.num_layers)[:, None]
    unit = np.arange(self.units_per_layer)[None, :]
    objectives = scaled[:, layer, unit, assignments].sum(-1)  # [P, J, L]
    fractions = self.fraction[:, assignments]  # [C, J, L, U]
    fractions = fractions.reshape(fractions.shape[:3] + (-1, self.group_size)).max(-1).sum(-1)
    return np.moveaxis(objectives, 0, -1), np.moveaxis(fractions, 0, -1)  # [J, L, P], [J, L, C]

  def _add_columns(self, assignments: np.ndarray) -> int:
    """Add layer assignments int [J, L, U] (one per layer per row) to the pool; returns how many
    were new."""
    objectives, densities = self._column_coefficients(assignments)
    pool, added = self._pool, 0
    with pool.lock:
      for j, l in itertools.product(range(assignments.shape[0]), range(self.num_layers)):
        key = (l, assignments[j, l].tobytes())
        if key in pool.seen:
          continue
        pool.seen.add(key)
        pool.assignments.append(assignments[j, l].copy())
        pool.layers.append(l)
        pool.objectives.append(objectives[j, l])
        pool.densities.append(densities[j, l])
        added += 1
    return added

  def _subset_values(self, unit_weights: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Priced value of every layer restricted to every K-subset of rules.

    Args:
      unit_weights: [L, U, R] per unit and rule (objective and epsilon-bound terms).
      rho: [C] dual weight of each constraint length's density sum.
    Returns:
      [L, S]: min over assignments using only the subset's rules of the summed unit weights plus
      rho . density (exact; in query_head mode a lower estimate for sets of 3+ rules).
    """
    L, U, _ = unit_weights.shape
    subsets = self._rule_subsets  # [S, K]
    if self.group_size == 1:  # density is additive per unit: fold it into the weights
      weights = unit_weights + rho @ self.fraction  # [L, U, R]
      chunk = max(1, _PRICING_CHUNK // (L * U * subsets.shape[1]))
      return np.concatenate([weights[:, :, subsets[s0:s0 + chunk]].min(-1).sum(1)
                             for s0 in range(0, len(subsets), chunk)], -1)
    G, groups = self.group_size, self.num_kv_heads
    chunk = max(1, _PRICING_CHUNK // (L * U * subsets.shape[1]))
    values = []
    for s0 in range(0, len(subsets), chunk):
      block = subsets[s0:s0 + chunk]  # [s, K]
      group_best = np.full((L, groups, len(block)), np.inf)
      for positions in self._position_subsets:  # the rules T a KV group actually uses
        used = block[:, list(positions)]  # [s, t]
        w = unit_weights[:, :, used].reshape(L, groups, G, len(block), len(positions))
        value = w.min(-1).sum(2)  # [L, groups, s]
        if len(positions) == 2:  # both rules must be used by some head of the group
          diff = w[..., 1] - w[..., 0]  # [L, groups, G, s]
          value = value + np.maximum(0, diff.min(2)) + np.maximum(0, (-diff).min(2))
        value = value + rho @ self.fraction[:, used].max(-1)  # group cache term [s]
        group_best = np.minimum(group_best, value)
      values.append(group_best.sum(1))
    return np.concatenate(values, -1)

  def _assign(self, unit_weights: np.ndarray, rho: np.ndarray,
              subset_index: np.ndarray) -> np.ndarray:
    """int [L, U]: per layer, the best assignment using the rules of subset `subset_index[l]`
    (query_head mode: each KV group picks its rule set T as in `_subset_values`; a pair must be
    used by both rules, so if all heads prefer one, the head that loses least switches)."""
    L, U, _ = unit_weights.shape
    chosen = self._rule_subsets[subset_index]  # [L, K]
    if self.group_size == 1:
      weights = unit_weights + rho @ self.fraction  # [L, U, R]
      index = np.broadcast_to(chosen[:, None], (L, U, chosen.shape[1]))
      local = np.take_along_axis(weights, index, -1)  # [L, U, K]
      return np.take_along_axis(chosen, local.argmin(-1), -1)
    G, groups = self.group_size, self.num_kv_heads
    best_value = np.full((L, groups), np.inf)
    best = np.zeros((L, groups, G), np.int64)
    for positions in self._position_subsets:
      used = chosen[:, list(positions)]  # [L, t]
      t = len(positions)
      w = np.take_along_axis(unit_weights, np.broadcast_to(used[:, None], (L, U, t)), -1)
      w = w.reshape(L, groups, G, t)
      pick = w.argmin(-1)  # [L, groups, G]
      value = w.min(-1).sum(-1)  # [L, groups]
      if t == 2:
        diff = w[..., 1] - w[..., 0]  # [L, groups, G]; > 0: the head prefers the first rule
        value = value + np.maximum(0, diff.min(-1)) + np.maximum(0, (-diff).min(-1))
        for side, loss in ((0, diff), (1, -diff)):  # every head on `side`: move the cheapest
          l_idx, g_idx = np.nonzero(np.all(pick == side, -1))
          pick[l_idx, g_idx, loss[l_idx, g_idx].argmin(-1)] = 1 - side
      value = value + (rho @ self.fraction[:, used].max(-1))[:, None]  # [L, groups]
      rules = np.take_along_axis(np.broadcast_to(used[:, None, None], (L, groups, G, t)),
                                 pick[..., None], -1)[..., 0]  # [L, groups, G]
      better = value < best_value
      best_value = np.where(better, value, best_value)
      best = np.where(better[..., None], rules, best)
    return best.reshape(L, U)

  def _master_arrays(self, master: _Master, phase_one: bool) -> _MasterArrays:
    """The restricted master over (a snapshot of) the pool as linprog/milp arrays.

    Columns: pool columns, then [B if the budget is a variable], then (phase one) slacks.
    Rows (<=): per constraint length lower band, upper band; then epsilon bounds.
    """
    pool = self._pool
    with pool.lock:
      layers = np.array(pool.layers)
      objectives = np.array(pool.objectives)  # [N, P]
      densities = np.array(pool.densities)  # [N, C]
    n_cols, n_c = len(layers), len(self.constraint_lengths)
    units = self.cache_units
    a_ub = np.vstack([-densities.T, densities.T]
                     + [objectives[:, p][None] for p, _ in master.bounds])
    if master.budget is not None:
      b_ub = np.r_[np.full(n_c, -self.lo * master.budget * units),
                   np.full(n_c, master.budget * units), [rhs for _, rhs in master.bounds]]
      extra = np.zeros((a_ub.shape[0], 0))
    else:
      b_ub = np.zeros(2 * n_c)
      extra = np.r_[np.full(n_c, self.lo * units), np.full(n_c, -float(units))][:, None]
    cost = objectives[:, master.primary] if master.primary is not None else np.zeros(n_cols)
    cost = np.r_[cost, [master.budget_sign] * extra.shape[1]]
    if phase_one:
      cost = np.r_[np.zeros(cost.size), np.ones(a_ub.shape[0])]
      extra = np.hstack([extra, -np.eye(a_ub.shape[0])])
    a_ub = np.hstack([a_ub, extra])
    a_eq = sp.csr_array((np.ones(n_cols), (layers, np.arange(n_cols))),
                        shape=(self.num_layers, a_ub.shape[1]))
    upper = np.r_[np.ones(n_cols), [1.0 / max(self.lo, 1e-9)] * (master.budget is None),
                  [np.inf] * (a_ub.shape[1] - n_cols - (master.budget is None))]
    return _MasterArrays(cost, sp.csr_array(a_ub), b_ub, a_eq, upper, n_cols, layers)

  def _column_generation(self, master: _Master, phase_one: bool, options: SolverOptions,
                         start: float) -> _LPState:
    """Re-solve the master LP, adding priced columns, until no column improves it."""
    scaled = self._cost_scaling[0]
    n_c = len(self.constraint_lengths)
    tolerance = 1e-9 * max(1.0, self.cache_units)
    for _ in range(options.max_rounds):
      cost, a_ub, b_ub, a_eq, upper, n_cols, _ = self._master_arrays(master, phase_one)
      lp_upper = np.r_[np.full(n_cols, np.inf), upper[n_cols:]]  # convexity bounds columns
      result = scipy.optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq,
                                      b_eq=np.ones(self.num_layers),
                                      bounds=np.c_[np.zeros(upper.size), lp_upper], method="highs")
      if result.status != 0:
        raise RuntimeError(f"master LP failed: {result.message}")
      duals = result.ineqlin.marginals  # <= 0
      rho = duals[:n_c] - duals[n_c:2 * n_c]  # weight of each density sum
      weights = np.zeros(scaled.shape[1:])
      if not phase_one and master.primary is not None:
        weights = weights + scaled[master.primary]
      for (p, _), y in zip(master.bounds, duals[2 * n_c:]):
        weights = weights - y * scaled[p]
      values = self._subset_values(weights, rho)  # [L, S]
      # Lagrangian bound: b.y + per layer the best priced column + the other variables' best.
      other = cost[n_cols:] - a_ub[:, n_cols:].T @ duals
      negative = other < 0
      state = _LPState(
          value=result.fun, x=result.x[:n_cols], duals=duals, weights=weights, rho=rho,
          subset_values=values, lower_bound=b_ub @ duals + values.min(-1).sum()
          + (other[negative] * upper[n_cols:][negative]).sum())
      reduced = values.min(-1) - result.eqlin.marginals  # [L] best reduced cost per layer
      if phase_one and result.fun <= tolerance:
        break
      if (options.time_limit is not None
          and time.perf_counter() - start > 0.8 * options.time_limit):
        break
      if np.all(reduced >= -tolerance):
        break
      if not self._add_best_columns(state, options.columns_per_round):
        break
    return state

  def _add_best_columns(self, state: _LPState, per_layer: int,
                        below: float = np.inf) -> int:
    """Add, per layer, the assignments of the `per_layer` best rule subsets at the state's
    duals whose priced value is within `below` of the layer's best. Returns how many were new."""
    excess = state.subset_values - state.subset_values.min(-1, keepdims=True)  # [L, S]
    order = np.argsort(excess, -1)[:, :per_layer]  # [L, m]
    columns = []
    for j in range(order.shape[1]):
      within = np.take_along_axis(excess, order[:, j:j + 1], -1)[:, 0] < below
      if not within.any():
        break
      column = self._assign(state.weights, state.rho, order[:, j])
      # Layers with nothing more within `below` repeat an earlier column (the pool dedups it).
      columns.append(np.where(within[:, None], column, columns[0] if columns else column))
    return self._add_columns(np.stack(columns)) if columns else 0

  def _integral_master(self, arrays: _MasterArrays, columns: np.ndarray, cutoff: float | None,
                       options: SolverOptions, start: float):
    """Solve the master `arrays` restricted to `columns` (bool over its pool columns) with
    binary weights. Returns (chosen pool columns, objective, continuous variables) or None, and
    HiGHS's result."""
    cost, a_ub, b_ub, a_eq, upper, n_cols, _ = arrays
    keep = np.r_[columns, np.ones(upper.size - n_cols, bool)]
    constraints = [scipy.optimize.LinearConstraint(a_ub[:, keep], -np.inf, b_ub),
                   scipy.optimize.LinearConstraint(a_eq[:, keep], 1.0, 1.0)]
    if cutoff is not None:  # only assignments better than the incumbent are of interest
      constraints.append(scipy.optimize.LinearConstraint(cost[keep][None], -np.inf, cutoff))
    result = scipy.optimize.milp(
        cost[keep], integrality=np.r_[np.ones(columns.sum()), np.zeros(upper.size - n_cols)],
        bounds=scipy.optimize.Bounds(0, upper[keep]), constraints=constraints,
        options=options.milp_options(self._seconds_left(options, start)))
    if result.x is None:
      return None, result
    picked = np.flatnonzero(keep)[result.x > 0.5]
    return (picked[picked < n_cols], float(result.fun), result.x[columns.sum():]), result

  def _solve_decomposed(self, master: _Master, options: SolverOptions, start: float):
    """(rule_index [L, U], gap, budget, method) or None when infeasible; falls back to the
    direct model when the generated columns admit no integral assignment."""
    scaled = self._cost_scaling[0]
    n_c = len(self.constraint_lengths)
    no_weights = np.zeros(scaled.shape[1:])
    seeds = [(no_weights, np.full(n_c, 1.0)), (no_weights, np.full(n_c, -1.0))]  # sparsest, densest
    if master.primary is not None:  # and the best one for the objective alone
      seeds.append((scaled[master.primary], np.zeros(n_c)))
    for weights, rho in seeds:
      best = self._subset_values(weights, rho).argmin(-1)
      self._add_columns(self._assign(weights, rho, best)[None])
    infeasibility = self._column_generation(master, True, options, start).value
    if infeasibility > 1e-9 * max(1.0, self.cache_units):  # phase one proved the LP infeasible
      return None
    state = self._column_generation(master, False, options, start)
    lower_bound = state.lower_bound
    self._add_best_columns(state, options.final_columns)

    # Stage 1: the layers the LP left fractional choose among their best columns; the others
    # keep their LP column.
    arrays = self._master_arrays(master, False)
    cost, a_ub, n_cols, layers = arrays.cost, arrays.a_ub, arrays.n_cols, arrays.layers
    # excess[j] >= 0: how much column j's priced value exceeds its layer's best. Any assignment
    # costs at least lower_bound + the excess of its columns (Lagrangian argument).
    excess = (cost[:n_cols] - a_ub[:, :n_cols].T @ state.duals
              - state.subset_values.min(-1)[layers])
    order = np.lexsort((excess, layers))
    rank = np.empty(n_cols, np.int64)  # rank of each column's excess within its layer
    rank[order] = np.arange(n_cols) - np.searchsorted(layers[order], layers[order])
    lp_x = np.r_[state.x, np.zeros(n_cols - state.x.size)]
    settled = np.zeros(self.num_layers, bool)
    settled[layers[lp_x > 1 - 1e-6]] = True
    columns = np.where(settled[layers], lp_x > 1 - 1e-6,
                       (rank < options.integer_columns) | (lp_x > 1e-9))
    best, result = self._integral_master(arrays, columns, None, options, start)

    # Stage 2: every column that could beat the incumbent (excess below its gap to the bound).
    within_gap = lambda value: value - lower_bound <= options.mip_rel_gap * abs(value)
    seconds_left = self._seconds_left(options, start)
    if ((best is None or not within_gap(best[1]))
        and (seconds_left is None or seconds_left > 0.5)):
      margin = np.inf if best is None else best[1] - lower_bound
      if best is not None:
        self._add_best_columns(state, options.integer_columns, below=margin)
      arrays = self._master_arrays(master, False)
      cost, a_ub, n_cols, layers = arrays.cost, arrays.a_ub, arrays.n_cols, arrays.layers
      excess = (cost[:n_cols] - a_ub[:, :n_cols].T @ state.duals
                - state.subset_values.min(-1)[layers])
      cutoff = None if best is None else best[1] - 1e-9 * max(1.0, abs(best[1]))
      improved, result = self._integral_master(arrays, excess < margin, cutoff, options, start)
      best = improved or best
    if best is None:  # no integral combination of the columns: the direct model decides
      return self._solve_direct(master, options, start)
    chosen, upper_value, continuous = best
    with self._pool.lock:
      rule_index = np.stack([self._pool.assignments[j] for j in chosen])
      rule_index = rule_index[np.argsort([self._pool.layers[j] for j in chosen])]
    gap = max(0.0, upper_value - lower_bound) / max(abs(upper_value), 1e-12)
    budget = float(continuous[0]) if master.budget is None else master.budget
    return rule_index, gap, budget, "decomposition"


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
  if not 0 < budget:
    raise ValueError(f"the KV-density budget must be positive, got {budget}")
  if not 0 <= lo <= 1:
    raise ValueError(f"lo must lie in [0, 1], got {lo}")
  if max_rules_per_layer < 1:
    raise ValueError(f"max_rules_per_layer must be >= 1, got {max_rules_per_layer}")
  if not constraint_lengths or min(constraint_lengths) <= 0:
    raise ValueError(f"constraint lengths must be positive, got {constraint_lengths}")
  profile_lengths = tuple(sorted(int(n) for n in dl))
  stacked = np.stack([np.asarray(dl[n], np.float64) for n in profile_lengths])  # [P, L, H, R]
  if stacked.ndim != 4 or stacked.shape[-1] != len(rules):
    raise ValueError(f"dL must be [layers, heads, {len(rules)} rules] per profile length, "
                     f"got {stacked.shape[1:]}")
  if not np.all(np.isfinite(stacked)):
    raise ValueError("dL holds NaN or infinite values")
  heads = stacked.shape[2]
  if num_kv_heads <= 0 or heads % num_kv_heads:
    raise ValueError(f"{heads} query heads cannot form {num_kv_heads} KV groups")
  if grouping == "kv_group":  # influence of a group: sum over its query heads
    stacked = stacked.reshape(stacked.shape[:2] + (num_kv_heads, -1, len(rules))).sum(3)
  return AssignmentProblem(
      costs=stacked, profile_lengths=profile_lengths,
      constraint_lengths=tuple(sorted(int(n) for n in constraint_lengths)), rules=tuple(rules),
      num_heads=heads, num_kv_heads=num_kv_heads, budget=float(budget), lo=float(lo),
      max_rules_per_layer=int(max_rules_per_layer), grouping=grouping, sink=int(sink),
      block=int(block))
