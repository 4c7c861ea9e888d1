"""Tests of moa_jax/optimize: dL against brute-force masks, the MILP against enumeration, the
Pareto front and the validation choice."""

import itertools

import numpy as np
import pytest

from moa_jax.optimize import decomposition, direct, pareto, select
from moa_jax.optimize import loss_delta as loss_delta_lib
from moa_jax.optimize import problem as problem_lib
from moa_jax.plans import rules as rules_lib


def _brute_loss_delta(e_bar, rules, n, sink, block):
  """[L, H, R] from one N x N mask per rule built with `attend_mask`: sum of (1 - kept fraction of
  the block's causal entries) * E_bar over the causal blocks."""
  pos = np.arange(n)
  causal = rules_lib.attend_mask(pos[:, None], pos[None, :], 0, n + 1)
  nb = rules_lib.num_blocks(n, block)
  out = np.zeros(e_bar.shape[:2] + (len(rules),))
  for i, rule in enumerate(rules):
    mask = rules_lib.attend_mask(pos[:, None], pos[None, :], sink, rule.window(n, block))
    for r in range(nb):
      for c in range(r + 1):
        rows, cols = slice(r * block, (r + 1) * block), slice(c * block, (c + 1) * block)
        keep = mask[rows, cols].sum() / causal[rows, cols].sum()
        out[..., i] += (1 - keep) * e_bar[..., r, c]
  return out


@pytest.mark.parametrize(
  "n,block,sink", [(96, 8, 8), (101, 8, 5), (64, 16, 0), (77, 16, 40), (6, 8, 3), (40, 8, 100)]
)
def test_loss_delta_matches_brute_force(n, block, sink):
  rng = np.random.default_rng(n + block + sink)
  nb = rules_lib.num_blocks(n, block)
  e_bar = rng.exponential(size=(2, 3, nb, nb))
  rules = [
    rules_lib.ElasticRule(float(a), float(b))
    for a, b in zip(rng.integers(-n, n, 12), rng.choice(np.arange(9) / 8, 12))
  ]
  rules += [rules_lib.ElasticRule(0.0, 1.0), rules_lib.ElasticRule(-10.0 * n, 0.0)]
  got = loss_delta_lib.loss_delta(e_bar, rules, n, sink, block)
  np.testing.assert_allclose(got, _brute_loss_delta(e_bar, rules, n, sink, block), rtol=1e-10)
  assert np.all(got[..., -2] < 1e-12)  # the dense rule drops nothing


def test_loss_delta_rejects_bad_input():
  e_bar = np.ones((1, 1, 4, 4))
  rule = [rules_lib.ElasticRule(0.0, 0.5)]
  with pytest.raises(ValueError, match="shape"):
    loss_delta_lib.loss_delta(e_bar, rule, 300, 64, 64)
  with pytest.raises(ValueError, match="NaN"):
    loss_delta_lib.loss_delta(np.full((1, 1, 4, 4), np.nan), rule, 256, 64, 64)


# ------------------------------------------------------------------------------------ MILP

SINK, BLOCK = 8, 8
LENGTHS = (64, 128)  # profile and constraint lengths of the small instances
SMALL_RULES = [
  rules_lib.ElasticRule(a, b)
  for a, b in ((0.0, 0.25), (16.0, 0.0), (0.0, 0.5), (-32.0, 1.0), (8.0, 0.125))
]


def _small_problem(rng, *, layers, heads, kv_heads, grouping, max_rules, budget, lo, num_rules=4):
  rules = SMALL_RULES[:num_rules]
  dl = {n: rng.exponential(size=(layers, heads, num_rules)) for n in LENGTHS}
  return problem_lib.build_problem(
    dl,
    rules,
    LENGTHS,
    num_kv_heads=kv_heads,
    budget=budget,
    lo=lo,
    max_rules_per_layer=max_rules,
    grouping=grouping,
    sink=SINK,
    block=BLOCK,
  )


def _enumerate(problem):
  """Every assignment that meets the K-rule limit: (rule_index [L, U], objectives [P],
  densities [C]) arrays over all of them."""
  L, U, R = problem.num_layers, problem.units_per_layer, problem.num_rules
  all_index = np.array(list(itertools.product(range(R), repeat=L * U))).reshape(-1, L, U)
  distinct = np.array([max(len(set(row)) for row in index) for index in all_index])
  all_index = all_index[distinct <= problem.max_rules_per_layer]
  objectives = np.array([list(problem.objectives_of(i).values()) for i in all_index])
  densities = np.array([list(problem.kv_densities_of(i).values()) for i in all_index])
  return all_index, objectives, densities


def _check_solution(problem, solution):
  plan = problem.to_plan(solution)
  for n in problem.constraint_lengths:
    density = plan.kv_density(n)
    assert density == pytest.approx(solution.kv_densities[n])
    assert problem.lo * problem.budget - 1e-9 <= density <= problem.budget + 1e-9
  assert max(problem.rules_per_layer_of(solution.rule_index)) <= problem.max_rules_per_layer
  for n, bound in solution.upper_bounds.items():
    assert solution.objectives[n] <= bound + 1e-9


SMALL_CASES = [  # 4 units x 4 rules (256 assignments) or 4 query heads in 2 groups
  dict(layers=2, heads=4, kv_heads=2, grouping="kv_group", max_rules=1),
  dict(layers=1, heads=4, kv_heads=4, grouping="kv_group", max_rules=2),
  dict(layers=1, heads=4, kv_heads=2, grouping="query_head", max_rules=2),
  dict(layers=2, heads=2, kv_heads=1, grouping="query_head", max_rules=1),
]


@pytest.mark.parametrize("method", ["direct", "decomposition"])
@pytest.mark.parametrize("case", SMALL_CASES)
def test_milp_matches_enumeration(case, method):
  rng = np.random.default_rng(len(str(case)) + len(method))
  options = direct.SolverOptions(method=method, mip_rel_gap=0.0, time_limit=None)
  solved = infeasible = 0
  for trial in range(6):
    problem = _small_problem(
      rng, budget=float(rng.uniform(0.3, 0.75)), lo=float(rng.choice([0.0, 0.7, 0.9])), **case
    )
    solver = decomposition.solver_for(problem, options)
    assert isinstance(
      solver, direct.DirectSolver if method == "direct" else decomposition.Decomposition
    )
    index, objectives, densities = _enumerate(problem)
    band = np.all(
      (densities >= problem.lo * problem.budget - 1e-12) & (densities <= problem.budget + 1e-12), -1
    )
    primary = trial % 2
    bounds = {}
    if trial >= 3 and band.sum() > 1:  # an epsilon bound between two achievable values
      other = np.unique(objectives[band, 1 - primary])
      bounds = {
        LENGTHS[1 - primary]: float(other[len(other) // 2 - 1 : len(other) // 2 + 1].mean())
      }
    feasible = band & (objectives[:, 1 - primary] <= bounds.get(LENGTHS[1 - primary], np.inf))
    if not feasible.any():
      with pytest.raises(problem_lib.InfeasibleError):
        solver.solve(LENGTHS[primary], bounds, options)
      infeasible += 1
      continue
    solution = solver.solve(LENGTHS[primary], bounds, options)
    _check_solution(problem, solution)
    best = objectives[feasible, primary].min()
    if method == "direct":
      assert solution.objectives[LENGTHS[primary]] == pytest.approx(best, rel=1e-9)
      assert solution.optimal
    else:  # the plan is feasible; its gap to the lower bound covers its distance to the optimum
      value = solution.objectives[LENGTHS[primary]]
      assert value >= best - 1e-9
      floor = problem.costs[primary].min(-1).sum()
      assert value - best <= solution.mip_gap * (value - floor) + 1e-9
    solved += 1
  assert solved >= 2


def test_infeasible_budget_names_smallest_feasible_budget():
  rng = np.random.default_rng(5)
  case = dict(layers=1, heads=4, kv_heads=4, grouping="kv_group", max_rules=2)
  problem = _small_problem(rng, budget=0.05, lo=0.9, **case)
  index, objectives, densities = _enumerate(problem)
  # An assignment admits budgets B with max(density) <= B <= min(density) / lo and B <= 1.
  low, high = densities.max(-1), np.minimum(densities.min(-1) / problem.lo, 1.0)
  smallest, largest = low[low <= high].min(), high[low <= high].max()
  exact = direct.SolverOptions(method="direct", mip_rel_gap=0.0, time_limit=None)
  exact_solver = direct.DirectSolver(problem)
  found = exact_solver.feasible_budget_range(exact)
  assert found == pytest.approx((smallest, largest), abs=1e-7)
  with pytest.raises(ValueError, match=f"smallest feasible budget is {smallest:.4f}"):
    exact_solver.solve(options=exact)
  # The decomposition's budgets are feasible ones, no further out than the true extremes.
  options = direct.SolverOptions(method="decomposition", mip_rel_gap=0.0, time_limit=None)
  decomposed = decomposition.Decomposition(problem)
  found_low, found_high = decomposed.feasible_budget_range(options)
  for budget in (found_low, found_high):
    assert smallest - 1e-9 <= budget <= largest + 1e-9
    assert np.any((low <= budget + 1e-9) & (budget - 1e-9 <= high))
  with pytest.raises(problem_lib.InfeasibleError, match="smallest feasible budget"):
    decomposed.solve(options=options)


def test_build_problem_rejects_bad_input():
  dl = {64: np.ones((2, 4, 4))}
  kwargs = dict(num_kv_heads=2, budget=0.5, sink=SINK, block=BLOCK)
  with pytest.raises(ValueError, match="3 rules"):
    problem_lib.build_problem(dl, SMALL_RULES[:3], LENGTHS, **kwargs)
  with pytest.raises(ValueError, match="KV groups"):
    problem_lib.build_problem(dl, SMALL_RULES[:4], LENGTHS, **{**kwargs, "num_kv_heads": 3})
  with pytest.raises(ValueError, match="NaN"):
    problem_lib.build_problem({64: np.full((2, 4, 4), np.nan)}, SMALL_RULES[:4], LENGTHS, **kwargs)
  with pytest.raises(ValueError, match="grouping"):
    problem_lib.build_problem(dl, SMALL_RULES[:4], LENGTHS, grouping="heads", **kwargs)
  problem = problem_lib.build_problem(dl, SMALL_RULES[:4], LENGTHS, **kwargs)
  with pytest.raises(ValueError, match="not a profile length"):
    direct.DirectSolver(problem).solve(128)


def test_solver_for_and_the_decomposition_pool():
  rng = np.random.default_rng(6)
  problem = _small_problem(
    rng, layers=3, heads=4, kv_heads=4, grouping="kv_group", max_rules=2, budget=0.5, lo=0.7
  )  # 3 x 4 x 4 = 48 binaries
  auto = lambda limit: decomposition.solver_for(
    problem, direct.SolverOptions(direct_max_binaries=limit)
  )
  assert isinstance(auto(48), direct.DirectSolver)
  assert isinstance(auto(47), decomposition.Decomposition)
  options = direct.SolverOptions(method="decomposition", mip_rel_gap=0.0, time_limit=None)
  solver = decomposition.Decomposition(problem)
  assert solver.num_columns == 0
  first = solver.solve(64, options=options)
  pooled = solver.num_columns
  assert pooled >= problem.num_layers  # at least one column per layer
  again = solver.solve(64, options=options)  # the same target again: nothing new to price
  assert solver.num_columns == pooled
  np.testing.assert_array_equal(again.rule_index, first.rule_index)
  solver.solve(128, options=options)
  fresh = decomposition.Decomposition(problem)  # the problem holds no pool: this one is empty
  assert fresh.num_columns == 0
  fresh.solve(128, options=options)
  assert solver.num_columns > max(pooled, fresh.num_columns)  # the 64 solve's columns stayed


# ---------------------------------------------------------------------- Pareto and choice


def _three_objective_problem(rng, **case):
  rules = SMALL_RULES[:4]
  dl = {n: rng.exponential(size=(case["layers"], case["heads"], 4)) for n in (64, 96, 128)}
  return problem_lib.build_problem(
    dl,
    rules,
    LENGTHS,
    num_kv_heads=case["kv_heads"],
    budget=0.6,
    lo=0.5,
    max_rules_per_layer=case["max_rules"],
    grouping=case["grouping"],
    sink=SINK,
    block=BLOCK,
  )


@pytest.mark.parametrize("case", SMALL_CASES[:3])
def test_pareto_front_is_feasible_distinct_and_non_dominated(case):
  problem = _three_objective_problem(np.random.default_rng(7), **case)
  options = direct.SolverOptions(method="direct", mip_rel_gap=0.0, time_limit=None)
  front = pareto.pareto_front(problem, intervals=3, options=options, progress=False)
  assert front.solves == 3 + 3 * (3 * 3 - 1)
  index, objectives, densities = _enumerate(problem)
  band = np.all((densities >= problem.lo * problem.budget) & (densities <= problem.budget), -1)
  feasible = objectives[band]  # [F, 3]
  values = np.array([[s.objectives[n] for n in (64, 96, 128)] for s in front.solutions])
  assert len({s.rule_index.tobytes() for s in front.solutions}) == len(front.solutions)
  for solution, row in zip(front.solutions, values):
    _check_solution(problem, solution)
    dominated_by = np.all(feasible <= row + 1e-12, 1) & np.any(feasible < row - 1e-12, 1)
    assert not dominated_by.any()  # on the true Pareto front, not only among the returned plans
  np.testing.assert_allclose(values.min(0), feasible.min(0), rtol=1e-12)  # the anchors


def test_pareto_front_decomposition_threads():
  rng = np.random.default_rng(8)
  layers, heads, num_rules = 6, 8, 5
  dl = {
    n: rng.exponential(size=(layers, heads, num_rules)) * rng.uniform(0.2, 2, (1, heads, 1))
    for n in (64, 96, 128)
  }
  problem = problem_lib.build_problem(
    dl,
    SMALL_RULES[:num_rules],
    LENGTHS,
    num_kv_heads=4,
    budget=0.55,
    lo=0.8,
    grouping="query_head",
    sink=SINK,
    block=BLOCK,
  )
  options = direct.SolverOptions(method="decomposition", time_limit=10.0)
  front = pareto.pareto_front(problem, intervals=2, options=options, workers=2, progress=False)
  assert front.solutions and all(s.method in ("decomposition", "direct") for s in front.solutions)
  values = np.array([[s.objectives[n] for n in (64, 96, 128)] for s in front.solutions])
  for solution, row in zip(front.solutions, values):
    _check_solution(problem, solution)
    assert not np.any(np.all(values <= row, 1) & np.any(values < row, 1))
  assert [s.rule_index.tobytes() for s in pareto.non_dominated(front.solutions * 2)] == [
    s.rule_index.tobytes() for s in front.solutions
  ]


def test_select_plan_picks_lowest_validation_loss():
  problem = _three_objective_problem(np.random.default_rng(9), **SMALL_CASES[0])
  options = direct.SolverOptions(method="direct", mip_rel_gap=0.0, time_limit=None)
  front = pareto.pareto_front(problem, intervals=2, options=options, progress=False)
  plans = [problem.to_plan(s) for s in front.solutions]
  assert len(plans) >= 2
  loss = lambda plan: float(np.sum(plan.windows(160)))  # a stand-in for the validation loss
  chosen, table = select.select_plan(plans, loss, progress=False)
  losses = [loss(plan) for plan in plans]
  assert chosen is plans[int(np.argmin(losses))]
  assert [row["loss"] for row in table] == losses
  assert sum(row["chosen"] for row in table) == 1
  assert table[0]["objectives"] == plans[0].objectives
  with_nan = lambda plan: np.nan if plan is plans[0] else loss(plan)
  assert select.select_plan(plans, with_nan, progress=False)[0] is not plans[0]
  with pytest.raises(ValueError, match="NaN"):
    select.select_plan(plans, lambda plan: np.nan, progress=False)
  with pytest.raises(ValueError, match="at least one plan"):
    select.select_plan([], loss, progress=False)
