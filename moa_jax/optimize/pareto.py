"""Pareto front over the profile lengths' objectives by the epsilon-constraint method.

1. Minimize every Z_p alone (the anchors). Each other objective's observed range is
   [its minimum, its maximum over the anchors].
2. Split every range into `intervals` equal parts. For every primary objective p and every
   combination of interval upper ends for the other objectives, minimize Z_p subject to
   Z_q <= bound_q (the all-loose combination is the anchor itself and is skipped).
3. Keep the distinct, non-dominated assignments.
Every solve of one front goes through one solver (`decomposition.solver_for`): with the
decomposition, later solves reuse the columns earlier ones generated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import time
from collections.abc import Sequence

import numpy as np
import tqdm

from moa_jax.optimize import decomposition, direct
from moa_jax.optimize import problem as problem_lib


@dataclasses.dataclass(frozen=True)
class ParetoFront:
  """solutions: distinct non-dominated assignments, sorted by the first objective;
  solves: MILPs solved; no_solution: epsilon combinations that were infeasible or timed out."""

  solutions: list[problem_lib.Solution]
  solves: int
  no_solution: int
  seconds: float


def non_dominated(solutions: Sequence[problem_lib.Solution]) -> list[problem_lib.Solution]:
  """Distinct assignments (first occurrence kept) that no other one dominates, sorted by the
  objective vector (profile lengths ascending)."""
  distinct = {}
  for solution in solutions:
    distinct.setdefault(solution.rule_index.tobytes(), solution)
  candidates = list(distinct.values())
  values = np.array([[z for _, z in sorted(s.objectives.items())] for s in candidates])  # [S, P]
  keep = []
  for i, row in enumerate(values):
    dominated = np.any(np.all(values <= row, axis=1) & np.any(values < row, axis=1))
    if not dominated:
      keep.append(i)
  return [candidates[i] for i in sorted(keep, key=lambda i: tuple(values[i]))]


def epsilon_bounds(
  anchors: Sequence[problem_lib.Solution], profile_lengths: Sequence[int], intervals: int
) -> list[tuple[int, dict[int, float]]]:
  """(primary, {other length: upper bound}) for every primary and interval combination."""
  values = np.array([[a.objectives[n] for n in profile_lengths] for a in anchors])  # [P, P]
  low, high = values.min(0), values.max(0)
  jobs, seen = [], set()
  for p, primary in enumerate(profile_lengths):
    others = [q for q in range(len(profile_lengths)) if q != p]
    for steps in itertools.product(range(1, intervals + 1), repeat=len(others)):
      if all(step == intervals for step in steps):
        continue  # no bound is tighter than the anchors' range: this is the anchor again
      bounds = {
        profile_lengths[q]: float(low[q] + step / intervals * (high[q] - low[q]))
        for q, step in zip(others, steps)
      }
      key = (primary, tuple(sorted(bounds.items())))
      if key not in seen:
        seen.add(key)
        jobs.append((primary, bounds))
  return jobs


def pareto_front(
  problem: problem_lib.AssignmentProblem,
  intervals: int = 3,
  options: direct.SolverOptions = direct.SolverOptions(),
  workers: int = 1,
  progress: bool = True,
) -> ParetoFront:
  """The epsilon-constraint Pareto front of `problem` over its profile lengths' objectives.

  `workers` > 1 solves the epsilon subproblems in that many threads (HiGHS releases the GIL).
  An infeasible budget raises InfeasibleError from the first anchor.
  """
  if intervals < 1:
    raise ValueError(f"intervals must be >= 1, got {intervals}")
  start = time.perf_counter()
  solver = decomposition.solver_for(problem, options)
  lengths = problem.profile_lengths
  anchors = [
    solver.solve(n, options=options)
    for n in tqdm.tqdm(lengths, desc="pareto anchors", disable=not progress)
  ]
  jobs = epsilon_bounds(anchors, lengths, intervals) if len(lengths) > 1 else []

  def run(job):
    primary, bounds = job
    try:
      return solver.solve(primary, bounds, options)
    except (problem_lib.InfeasibleError, TimeoutError):
      return None

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    results = list(
      tqdm.tqdm(pool.map(run, jobs), total=len(jobs), desc="pareto epsilon", disable=not progress)
    )
  found = [r for r in results if r is not None]
  return ParetoFront(
    solutions=non_dominated(anchors + found),
    solves=len(anchors) + len(jobs),
    no_solution=len(jobs) - len(found),
    seconds=time.perf_counter() - start,
  )
