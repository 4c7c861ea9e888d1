"""Times the MILP and the whole epsilon-constraint Pareto front at 7B/8B scale on the CPU.

    python experiments/bench_milp.py                  # Vicuna-7B shape: 32 layers x 32 heads (MHA)
    python experiments/bench_milp.py --kv_heads 8 --grouping query_head --name llama3_8b_query_head

Each run: 48 rules, 4 constraint lengths (2k-16k), 3 profile lengths (2k-8k), budget 0.5, lo 0.9,
K = 2 rules per layer, 3 intervals per objective; it is stored under its --name in
benchmarks/milp.json (time, plans, gaps, solver options, machine, command). Every plan is checked
against the density band and the K-rule limit. About a minute per run on 2 cores (the table in
benchmarks/README.md); a small run (~20 s on one core):
    python experiments/bench_milp.py --layers 8 --heads 8 --kv_heads 8 --profile 1024,2048,4096 \
        --constraint 1024,2048,4096,8192 --intervals 2 --workers 1 --name small --out /tmp/m.json

E_bar is random but shaped like profiled influence: per head it decays with the block distance as
(1 + d)^-gamma (gamma drawn per head), the sink column carries extra mass, deeper layers have less
influence, a few 'retrieval' heads are flat with scattered long-range spikes, and lognormal noise
multiplies every block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np
import scipy
from absl import app, flags

from moa_jax.optimize import decomposition, direct, pareto
from moa_jax.optimize import loss_delta as loss_delta_lib
from moa_jax.optimize import problem as problem_lib
from moa_jax.plans import rules as rules_lib
from moa_jax.workdir import atomic_write_text

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 32, "layers L")
flags.DEFINE_integer("heads", 32, "query heads per layer")
flags.DEFINE_integer("kv_heads", 32, "KV heads per layer")
flags.DEFINE_enum("grouping", "kv_group", problem_lib.GROUPINGS, "one rule per KV group or head")
flags.DEFINE_list("profile", ["2048", "4096", "8192"], "profile lengths (one objective each)")
flags.DEFINE_list("constraint", ["2048", "4096", "8192", "16384"], "constraint lengths")
flags.DEFINE_float("budget", 0.5, "KV-density budget")
flags.DEFINE_float("lo", 0.9, "band: lo * budget <= KV density <= budget")
flags.DEFINE_integer("max_rules", 2, "at most this many distinct rules per layer")
flags.DEFINE_integer("intervals", 3, "epsilon intervals per objective")
flags.DEFINE_float("time_limit", 3.0, "seconds per MILP solve")
flags.DEFINE_float("mip_rel_gap", 1e-3, "relative MIP gap")
flags.DEFINE_enum("method", "auto", direct.METHODS, "solver method")
flags.DEFINE_integer("workers", 2, "threads solving the epsilon subproblems")
flags.DEFINE_integer("seed", 0, "seed of the synthetic influence")
flags.DEFINE_string("name", "vicuna7b_kv_group", "key of this run in --out")
flags.DEFINE_string("out", "benchmarks/milp.json", "results file (runs keyed by --name)")


def synthetic_e_bar(
  rng: np.random.Generator,
  layers: int,
  heads: int,
  n: int,
  block: int = 64,
  retrieval_fraction: float = 0.05,
) -> np.ndarray:
  """float32 [L, H, NB, NB] block-pooled influence at length n (see the module docstring)."""
  nb = rules_lib.num_blocks(n, block)
  distance = np.subtract.outer(np.arange(nb), np.arange(nb)).astype(np.float32)  # [NB, NB]
  causal = distance >= 0
  gamma = rng.uniform(0.6, 2.5, size=(layers, heads, 1, 1)).astype(np.float32)
  retrieval = rng.random((layers, heads)) < retrieval_fraction
  gamma[retrieval] = 0.1
  e_bar = np.power(1 + np.maximum(distance, 0), -gamma)  # [L, H, NB, NB]
  e_bar[..., 0] *= rng.uniform(2, 20, size=(layers, heads, 1)).astype(np.float32)  # sink column
  spikes = (rng.random((layers, heads, nb, nb)) < 0.01) & retrieval[..., None, None]
  e_bar += spikes * rng.uniform(0.5, 3, size=spikes.shape).astype(np.float32)
  e_bar *= rng.lognormal(0, 0.5, size=e_bar.shape).astype(np.float32)
  depth = np.linspace(1.5, 0.3, layers, dtype=np.float32)[:, None, None, None]
  return np.where(causal, e_bar * depth, 0).astype(np.float32) / nb


def main(argv) -> None:
  del argv
  args = FLAGS
  profile = [int(n) for n in args.profile]
  constraint = [int(n) for n in args.constraint]
  rng = np.random.default_rng(args.seed)
  rules = rules_lib.candidate_rules(profile, constraint)
  start = time.perf_counter()
  dl = {
    n: loss_delta_lib.loss_delta(synthetic_e_bar(rng, args.layers, args.heads, n), rules, n)
    for n in profile
  }
  dl_seconds = time.perf_counter() - start
  problem = problem_lib.build_problem(
    dl,
    rules,
    constraint,
    num_kv_heads=args.kv_heads,
    budget=args.budget,
    lo=args.lo,
    max_rules_per_layer=args.max_rules,
    grouping=args.grouping,
  )
  options = direct.SolverOptions(
    time_limit=args.time_limit, mip_rel_gap=args.mip_rel_gap, method=args.method
  )
  start = time.perf_counter()
  single = decomposition.solver_for(problem, options).solve(profile[-1], options=options)
  single_seconds = time.perf_counter() - start
  start = time.perf_counter()  # the front has its own solver: it reuses none of these columns
  front = pareto.pareto_front(
    problem, intervals=args.intervals, options=options, workers=args.workers
  )
  front_seconds = time.perf_counter() - start

  plans_ok = all(
    all(
      problem.lo * problem.budget - 1e-9 <= plan.kv_density(n) <= problem.budget + 1e-9
      for n in constraint
    )
    and max(problem.rules_per_layer_of(solution.rule_index)) <= args.max_rules
    for solution, plan in ((s, problem.to_plan(s)) for s in front.solutions)
  )
  gaps = np.array([solution.mip_gap for solution in front.solutions])
  result = {
    "command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    "problem": {
      "layers": args.layers,
      "heads": args.heads,
      "kv_heads": args.kv_heads,
      "grouping": args.grouping,
      "rules": len(rules),
      "profile_lengths": profile,
      "constraint_lengths": constraint,
      "budget": args.budget,
      "lo": args.lo,
      "max_rules_per_layer": args.max_rules,
      "x_binaries": args.layers * problem.units_per_layer * len(rules),
    },
    "solver": {
      "backend": f"HiGHS via scipy.optimize.milp/linprog (scipy {scipy.__version__})",
      **dataclasses.asdict(options),
      "intervals": args.intervals,
      "workers": args.workers,
    },
    "loss_delta_seconds": round(dl_seconds, 2),
    "single_solve_seconds": round(single_seconds, 2),
    "single_solve_gap": round(single.mip_gap, 6),
    "pareto_seconds": round(front_seconds, 2),
    "pareto_solves": front.solves,
    "pareto_no_solution": front.no_solution,
    "pareto_plans": len(front.solutions),
    "pareto_gap": {
      "median": round(float(np.median(gaps)), 6),
      "max": round(float(gaps.max()), 6),
      "within_mip_rel_gap": int((gaps <= args.mip_rel_gap).sum()),
    },
    "every_plan_in_band_and_k_limit": plans_ok,
    "objectives": [{str(n): round(z, 4) for n, z in s.objectives.items()} for s in front.solutions],
    "machine": {
      "cpu": _cpu_name(),
      "cores": os.cpu_count(),
      "python": platform.python_version(),
      "platform": platform.platform(),
    },
  }
  runs = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      runs = json.load(f)
  runs[args.name] = result
  atomic_write_text(args.out, json.dumps(runs, indent=1))
  print(
    f"{args.name}: dL {dl_seconds:.1f} s | one solve {single_seconds:.1f} s "
    f"(gap {single.mip_gap:.1e}) | front {front_seconds:.1f} s: {front.solves} solves, "
    f"{len(front.solutions)} plans, gap median {np.median(gaps):.1e} max {gaps.max():.1e}, "
    f"all in band and K limit: {plans_ok} -> {args.out}"
  )


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


if __name__ == "__main__":
  app.run(main)
