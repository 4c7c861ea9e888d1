"""Plans for SmolLM2-135M-Instruct at a KV density budget (--density, 0.5 by default), one
variant per run, all in one results file.

  python experiments/smollm2_method.py --variant=NAME --method=METHOD [options]

Each run adds (or replaces) the variant NAME in --out (benchmarks/smollm2_method.json) with its
command, its plan (written to --plans_dir/NAME.json), the plan's predicted objective, its KV
densities and its measured response loss on the choice sets (exact masked forward passes,
optimize/measured.py), beside dense and the uniform window on the same samples.

Methods:
  uniform      StreamingLLM: alpha = 0, beta = --density - 64 / 1024 for every KV group.
  moa          MoA's pipeline: E_bar profiled at the dense model (--loss, --magnitude) at
               --profile_lengths, the MILP's Pareto front, the plan of lowest choice-set loss.
  atplan       the at-plan first-order estimate linearized at the dense model
               (profile/at_plan.py: exact in each head's output, signed, per sample averaged),
               then the same MILP and choice.
  refine       optimize/refine.py from the plan --start (a plan file or 'uniform'): rounds of
               re-linearizing at the plan, re-solving with trust-region penalties, and keeping a
               candidate only if its measured choice-set loss is lower.
Data (sized in SmolLM2's own tokens, calibration/buckets.py), disjoint from every evaluation:
  calibration 'text': last tokens of Python stdlib modules of size ranks 56..; 'tasks': passkey,
    multi-key needle, variable tracking, UUID key-value (seed 2025); 'mix': both; responses the
    ground truth (--answers=reference) or the model's own (--answers=model);
  choice sets (used by moa/atplan to pick a Pareto plan and by refine to accept a step):
    stdlib ranks 44.. (their own last 64 tokens) and passkey seed 78 (1k) / 79 (2k);
  the final evaluation (experiments/smollm2_results.py) uses stdlib ranks 0..39 and passkey
    seed 0; the diagnostics' held-out sets are ranks 40..43 and passkey seed 77.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from moa_jax.calibration import buckets as buckets_lib
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.data import longtext
from moa_jax.models.loading import load_checkpoint, load_checkpoint_tokenizer
from moa_jax.optimize import measured, refine
from moa_jax.optimize.direct import SolverOptions
from moa_jax.optimize.loss_delta import loss_delta
from moa_jax.optimize.pareto import pareto_front
from moa_jax.optimize.problem import build_problem
from moa_jax.plans import rules as rules_lib
from moa_jax.plans.plan import Plan, dense_plan, uniform_plan
from moa_jax.profile import at_plan
from moa_jax.profile.profiler import profile_model
from moa_jax.workdir import atomic_write, atomic_write_text

METHODS = ("uniform", "moa", "atplan", "refine")
MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "model.path or a .gguf file")
VARIANT = flags.DEFINE_string("variant", None, "name of this variant in the results", required=True)
METHOD = flags.DEFINE_enum("method", None, METHODS, "how the plan is made", required=True)
CALIBRATION = flags.DEFINE_enum("calibration", "mix", ["text", "tasks", "mix"], "source")
ANSWERS = flags.DEFINE_enum("answers", "reference", list(buckets_lib.ANSWERS), "responses")
SAMPLES = flags.DEFINE_integer("samples", 8, "calibration samples per source at 1k (half at 2k)")
PROFILE_LENGTHS = flags.DEFINE_list("profile_lengths", ["1024"], "profile lengths")
LOSS = flags.DEFINE_enum("loss", "nll", ["nll", "log_odds"], "profile loss")
DENSITY = flags.DEFINE_float("density", 0.5, "KV density budget of the plan (and of uniform)")
MAGNITUDE = flags.DEFINE_enum(
  "magnitude", "entries", ["entries", "blocks", "signed"], "E_bar magnitude (method moa)"
)
START = flags.DEFINE_string("start", "uniform", "refine: start plan file or 'uniform'")
ROUNDS = flags.DEFINE_integer("rounds", 3, "refine rounds")
PENALTIES = flags.DEFINE_list("penalties", ["0", "0.1", "0.4"], "refine trust-region penalties")
TEXT_FIRST_ORDER = flags.DEFINE_bool("text_first_order", True, "refine: text first-order term")
TEXT_FISHER = flags.DEFINE_integer("text_fisher", 0, "refine: text second-order label draws")
TASKS_FISHER = flags.DEFINE_integer("tasks_fisher", 0, "refine: tasks second-order draws")
CHOICE_SAMPLES = flags.DEFINE_integer("choice_samples", 4, "choice samples per source and length")
CHOICE_LENGTHS = flags.DEFINE_list("choice_lengths", ["1024", "2048"], "choice-set lengths")
CACHE = flags.DEFINE_string("cache", "runs/smollm2_method", "cache folder (data, profiles)")
PLANS_DIR = flags.DEFINE_string("plans_dir", "benchmarks/smollm2_plans", "plan files")
OUT = flags.DEFINE_string("out", "benchmarks/smollm2_method.json", "results file")

SINK, BLOCK = 64, 64
CONSTRAINTS = (1024, 2048, 4096)
ALPHA_STEP = 256
TASKS = ("passkey", "niah", "vt", "uuid")
CALIBRATION_RANK, CHOICE_RANK = 56, 44


def log(message: str) -> None:
  print(f"[method {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _load_bucket(path: Path) -> CalibrationBucket:
  with np.load(path) as d:
    return CalibrationBucket(d["tokens"], d["loss_mask"], d["lengths"])


def cached_bucket(name: str, build) -> CalibrationBucket:
  path = Path(CACHE.value) / f"{name}.npz"
  if not path.is_file():
    start = time.perf_counter()
    bucket = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
      path,
      lambda f: np.savez(
        f, tokens=bucket.tokens, loss_mask=bucket.loss_mask, lengths=bucket.lengths
      ),
    )
    log(f"data {name}: {time.perf_counter() - start:.0f} s")
  return _load_bucket(path)


def concat(buckets) -> CalibrationBucket:
  return CalibrationBucket(
    *(np.concatenate([getattr(b, f) for b in buckets]) for f in ("tokens", "loss_mask", "lengths"))
  )


def calibration_buckets(model, tokenizer) -> dict[int, dict[str, CalibrationBucket]]:
  """{profile length: {'text' and/or 'tasks': bucket}} of the chosen source and answers."""
  out = {}
  for n in map(int, PROFILE_LENGTHS.value):
    count = SAMPLES.value if n <= 1024 else max(2, SAMPLES.value // 2)
    parts = {}
    if CALIBRATION.value in ("text", "mix"):
      docs = longtext.stdlib_documents(CALIBRATION_RANK + count)[CALIBRATION_RANK:]
      parts["text"] = cached_bucket(
        f"text_{ANSWERS.value}_{count}_{n}",
        lambda: buckets_lib.document_bucket(model, tokenizer, docs, n, answers=ANSWERS.value),
      )
    if CALIBRATION.value in ("tasks", "mix"):
      per_task = -(-count // len(TASKS))
      parts["tasks"] = cached_bucket(
        f"tasks_{ANSWERS.value}_{count}_{n}",
        lambda: concat(
          [
            buckets_lib.task_bucket(
              model, tokenizer, task, n, per_task, seed=2025, answers=ANSWERS.value
            )
            for task in TASKS
          ]
        ),
      )
    out[n] = parts
  return out


def linearizations(sources) -> dict[int, list[refine.Linearization]]:
  """The refine sources: text with --text_first_order / --text_fisher, tasks with
  --tasks_fisher."""
  out = {}
  for n, parts in sources.items():
    out[n] = []
    if "text" in parts:
      out[n].append(
        refine.Linearization(
          parts["text"], first_order=TEXT_FIRST_ORDER.value, fisher_draws=TEXT_FISHER.value
        )
      )
    if "tasks" in parts:
      out[n].append(refine.Linearization(parts["tasks"], fisher_draws=TASKS_FISHER.value))
  return out


def choice_traces(model, tokenizer) -> dict[str, measured.DenseTrace]:
  traces = {}
  count = CHOICE_SAMPLES.value
  for i, n in enumerate(map(int, CHOICE_LENGTHS.value)):
    rank = CHOICE_RANK + i * count
    docs = longtext.stdlib_documents(rank + count)[rank:]
    text = cached_bucket(
      f"choice_text_{count}_{n}", lambda: buckets_lib.document_bucket(model, tokenizer, docs, n)
    )
    passkey = cached_bucket(
      f"choice_passkey_{count}_{n}",
      lambda: buckets_lib.task_bucket(model, tokenizer, "passkey", n, count, seed=78 + i),
    )
    traces[f"text@{n}"] = measured.dense_trace(model, text)
    traces[f"passkey@{n}"] = measured.dense_trace(model, passkey)
  return traces


def choice_losses(model, plan: Plan, traces) -> dict[str, float]:
  """{set: mean response loss increase over dense} and the mean over sets ('mean')."""
  out = {
    name: float(
      np.mean(measured.masked_losses(model, t, plan.windows(t.length), plan.sink) - t.dense)
    )
    for name, t in traces.items()
  }
  out["mean"] = float(np.mean(list(out.values())))
  return out


def candidate_rules():
  lengths = [int(n) for n in PROFILE_LENGTHS.value]
  return rules_lib.candidate_rules(
    lengths, CONSTRAINTS, alpha_step=ALPHA_STEP, betas=tuple(i / 8 for i in range(9))
  )


def front_plans(model, dl: dict[int, np.ndarray], rules) -> list[Plan]:
  problem = build_problem(
    dl,
    rules,
    CONSTRAINTS,
    num_kv_heads=model.config.num_kv_heads,
    budget=DENSITY.value,
    lo=0.9,
    max_rules_per_layer=2,
    sink=SINK,
    block=BLOCK,
  )
  front = pareto_front(problem, intervals=2, options=SolverOptions(time_limit=20.0), progress=False)
  return [problem.to_plan(s, provenance={"variant": VARIANT.value}) for s in front.solutions]


def choose(model, plans: list[Plan], traces) -> tuple[Plan, list[dict]]:
  table = [{"objectives": p.objectives, **choice_losses(model, p, traces)} for p in plans]
  best = int(np.argmin([row["mean"] for row in table]))
  table[best]["chosen"] = True
  return plans[best], table


def make_plan(model, tokenizer, traces) -> tuple[Plan, dict]:
  method, info = METHOD.value, {}
  if method == "uniform":
    return uniform_plan(model.config, DENSITY.value, 1024, sink=SINK, block=BLOCK), info
  rules = candidate_rules()
  sources = calibration_buckets(model, tokenizer)
  calibration = {n: concat(list(parts.values())) for n, parts in sources.items()}
  if method == "moa":
    e = profile_model(
      model,
      model.config,
      calibration,
      sorted(calibration),
      block=BLOCK,
      magnitude=MAGNITUDE.value,
      loss=LOSS.value,
      progress=False,
    )
    dl = {n: loss_delta(e[n], rules, n, SINK, BLOCK) for n in e}
    plan, info["front"] = choose(model, front_plans(model, dl, rules), traces)
    return plan, info
  if method == "atplan":
    dense = dense_plan(model.config, sink=SINK, block=BLOCK)
    dl = {}
    for n, bucket in calibration.items():
      windows = rules_lib.window_size([r.alpha for r in rules], [r.beta for r in rules], n, BLOCK)
      candidates, index = np.unique(windows, return_inverse=True)
      deltas = at_plan.window_deltas(
        model, bucket, dense.windows(n), candidates, sink=SINK, loss=LOSS.value
      ).mean(0)
      dl[n] = deltas[..., index]
    plan, info["front"] = choose(model, front_plans(model, dl, rules), traces)
    return plan, info
  start = (
    uniform_plan(model.config, DENSITY.value, 1024, sink=SINK, block=BLOCK)
    if START.value == "uniform"
    else Plan.load(START.value).validate(model.config)
  )
  options = refine.RefineOptions(
    rounds=ROUNDS.value,
    penalties=tuple(float(p) for p in PENALTIES.value),
    loss=LOSS.value,
    budget=DENSITY.value,
    constraint_lengths=CONSTRAINTS,
  )
  plan, info["history"] = refine.refine_plan(
    model, start, rules, linearizations(sources), list(traces.values()), options, log=log
  )
  return plan, info


def main(argv):
  del argv
  start = time.perf_counter()
  model, _ = load_checkpoint(MODEL.value)
  tokenizer = load_checkpoint_tokenizer(MODEL.value)
  traces = choice_traces(model, tokenizer)
  plan, info = make_plan(model, tokenizer, traces)
  plan = plan.with_densities(sorted(set(CONSTRAINTS) | {int(n) for n in CHOICE_LENGTHS.value}))
  plan = dataclasses.replace(plan, provenance=dict(plan.provenance, variant=VARIANT.value))
  plan_path = Path(PLANS_DIR.value) / f"{VARIANT.value}.json"
  plan_path.parent.mkdir(parents=True, exist_ok=True)
  plan.save(plan_path)
  uniform = uniform_plan(model.config, DENSITY.value, 1024, sink=SINK, block=BLOCK)
  row = {
    "command": shlex.join(["python", "experiments/smollm2_method.py", *sys.argv[1:]]),
    "method": METHOD.value,
    "plan": str(plan_path),
    "kv_densities": {str(n): v for n, v in plan.kv_densities.items()},
    "choice_loss_increase": choice_losses(model, plan, traces),
    "uniform_choice_loss_increase": choice_losses(model, uniform, traces),
    "dense_choice_loss": {name: float(t.dense.mean()) for name, t in traces.items()},
    "windows_1024": plan.cache_windows(1024).tolist(),
    "windows_2048": plan.cache_windows(2048).tolist(),
    "seconds": time.perf_counter() - start,
    **info,
  }
  out = Path(OUT.value)
  results = json.loads(out.read_text()) if out.is_file() else {"variants": {}}
  results["variants"][VARIANT.value] = row
  atomic_write_text(out, json.dumps(results, indent=1, default=float) + "\n")
  log(
    f"{VARIANT.value}: choice loss increase {row['choice_loss_increase']} (uniform "
    f"{row['uniform_choice_loss_increase']}); {row['seconds']:.0f} s"
  )


if __name__ == "__main__":
  app.run(main)
