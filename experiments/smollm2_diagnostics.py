"""Why MoA's first-order plan is no better than a uniform window on SmolLM2-135M-Instruct.

  python experiments/smollm2_diagnostics.py --parts=data,profiles,ablation,masks,report \
      --cache=runs/smollm2_diag --out=benchmarks/smollm2_diagnostics.json

Parts (each caches its arrays under --cache, so a later part or a re-run reuses them):
  data      calibration pools at --length, sized in SmolLM2's own tokens (calibration/buckets.py):
            'text' = the last --length tokens of Python stdlib modules (size ranks 56..), 'tasks'
            = passkey, multi-key needle, variable tracking and UUID key-value samples (seed 2025),
            each with the ground-truth response ('_ref') or the model's own ('_model'); held-out
            sets never used for any profile: 'val_text' (stdlib ranks 40..43, their own last 64
            tokens) and 'val_passkey' (seed 77, the true pass key).
  profiles  per-sample block influence of every pool in --pools for every loss in --losses, all
            three magnitudes (entries = sum |E|, blocks = |sum E|, signed = sum E) from one
            backward pass per sample, so sizes and sources are compared without re-profiling.
  ablation  the measured response loss of the held-out samples with one KV group (or one layer)
            narrowed to sink + --window tokens and everything else dense (optimize/measured.py).
  masks     measured loss of whole-model masks: uniform (StreamingLLM) at KV density 0.5, the
            MILP plan of every profile variant, random masks, and in-sample oracles (the k
            groups the held-out ablation finds costliest kept whole, the rest narrowed to the
            same KV budget: an optimistic bound on what any allocation of that kind reaches).
  ablation_plan  a plan from the measured ablation ranking that part report recorded in --out
            (part_ablation_plan), at KV density --plan_density, for the evaluation script.
  report    the analyses, from the caches: (1) first-order check: predicted dL (each variant's
            E_bar) against the measured loss increase for single groups, single layers, random
            masks, the uniform and the chosen plans (Spearman and measured / predicted);
            (2) ablation by KV group against the profile's ranking; (3) sensitivity to the
            calibration size, source, answers and loss options; (4) the optimizer against its
            own objective: predicted dL vs measured loss of each variant's plan and of uniform.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from scipy import stats

from moa_jax.calibration import buckets as buckets_lib
from moa_jax.calibration.build import CalibrationBucket
from moa_jax.data import longtext
from moa_jax.models.loading import load_checkpoint, load_checkpoint_tokenizer
from moa_jax.optimize import measured
from moa_jax.optimize.direct import SolverOptions
from moa_jax.optimize.loss_delta import loss_delta
from moa_jax.optimize.pareto import pareto_front
from moa_jax.optimize.problem import build_problem
from moa_jax.plans import rules as rules_lib
from moa_jax.plans.plan import dense_plan
from moa_jax.profile import at_plan
from moa_jax.profile.influence import MAGNITUDES, block_influence_tiled
from moa_jax.profile.probes import valid_lengths
from moa_jax.profile.profiler import output_grads, response_targets
from moa_jax.workdir import atomic_write, atomic_write_text

PARTS = ("data", "profiles", "ablation", "masks", "at_plan", "report", "ablation_plan")
MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "model.path or a .gguf file")
PARTS_FLAG = flags.DEFINE_list("parts", list(PARTS), f"parts to run, of {PARTS}")
LENGTH = flags.DEFINE_integer("length", 1024, "calibration / measurement length")
POOL_SIZE = flags.DEFINE_integer("pool_size", 8, "samples per calibration pool")
VAL_SIZE = flags.DEFINE_integer("val_size", 4, "held-out samples per held-out set")
POOLS = flags.DEFINE_list("pools", ["text_ref", "tasks_ref"], "pools to profile")
LOSSES = flags.DEFINE_list("losses", ["nll"], "profile losses")
FISHER = flags.DEFINE_integer("fisher_draws", 0, "part at_plan: second-order label draws")
WINDOW = flags.DEFINE_integer("window", 128, "window of an ablated group (tokens, plus the sink)")
CACHE = flags.DEFINE_string("cache", "runs/smollm2_diag", "cache folder")
OUT = flags.DEFINE_string("out", "benchmarks/smollm2_diagnostics.json", "results file")
KEEP = flags.DEFINE_integer("keep", 30, "part ablation_plan: KV groups kept whole")
PLAN_DENSITY = flags.DEFINE_float("plan_density", 0.5, "part ablation_plan: the plan's KV density")
PLAN_OUT = flags.DEFINE_string(
  "plan_out", "benchmarks/smollm2_plans/ablation_both_k30.json", "part ablation_plan: plan file"
)

SINK, BLOCK, DENSITY = 64, 64, 0.5
TASKS = ("passkey", "niah", "vt", "uuid")
TEXT_CALIBRATION_RANK, TEXT_VAL_RANK = 56, 40  # stdlib size ranks (evaluation: 0..39)
CONSTRAINTS = (1024, 2048, 4096)


def log(message: str) -> None:
  print(f"[diag {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Cache:
  """Arrays and buckets under one folder, written atomically."""

  def __init__(self, root: Path):
    self.root = root
    root.mkdir(parents=True, exist_ok=True)

  def path(self, name: str) -> Path:
    return self.root / f"{name}.npz"

  def has(self, name: str) -> bool:
    return self.path(name).is_file()

  def save(self, name: str, **arrays) -> None:
    atomic_write(self.path(name), lambda f: np.savez(f, **arrays))

  def load(self, name: str) -> dict[str, np.ndarray]:
    with np.load(self.path(name)) as data:
      return {k: data[k] for k in data.files}

  def bucket(self, name: str) -> CalibrationBucket:
    d = self.load(name)
    return CalibrationBucket(d["tokens"], d["loss_mask"], d["lengths"])

  def save_bucket(self, name: str, bucket: CalibrationBucket) -> None:
    self.save(name, tokens=bucket.tokens, loss_mask=bucket.loss_mask, lengths=bucket.lengths)


def concat(buckets: list[CalibrationBucket]) -> CalibrationBucket:
  return CalibrationBucket(
    *(np.concatenate([getattr(b, f) for b in buckets]) for f in ("tokens", "loss_mask", "lengths"))
  )


def take(bucket: CalibrationBucket, rows) -> CalibrationBucket:
  rows = np.asarray(rows)
  return CalibrationBucket(bucket.tokens[rows], bucket.loss_mask[rows], bucket.lengths[rows])


# --- data ---------------------------------------------------------------------------------------


def part_data(cache: Cache, model, tokenizer, n: int) -> None:
  docs = longtext.stdlib_documents(TEXT_CALIBRATION_RANK + POOL_SIZE.value)
  jobs = {
    "val_text": lambda: buckets_lib.document_bucket(
      model, tokenizer, docs[TEXT_VAL_RANK : TEXT_VAL_RANK + VAL_SIZE.value], n
    ),
    "val_passkey": lambda: buckets_lib.task_bucket(
      model, tokenizer, "passkey", n, VAL_SIZE.value, seed=77
    ),
  }
  calibration_docs = docs[TEXT_CALIBRATION_RANK : TEXT_CALIBRATION_RANK + POOL_SIZE.value]
  per_task = -(-POOL_SIZE.value // len(TASKS))
  for answers in ("ref", "model"):
    full = "reference" if answers == "ref" else "model"
    jobs[f"text_{answers}"] = lambda full=full: buckets_lib.document_bucket(
      model, tokenizer, calibration_docs, n, answers=full
    )
    jobs[f"tasks_{answers}"] = lambda full=full: concat(
      [
        buckets_lib.task_bucket(model, tokenizer, task, n, per_task, seed=2025, answers=full)
        for task in TASKS
      ]
    )
  for name, build in jobs.items():
    key = f"bucket_{name}_{n}"
    if not cache.has(key):
      start = time.perf_counter()
      cache.save_bucket(key, build())
      log(f"data {key}: {time.perf_counter() - start:.0f} s")


# --- profiles -----------------------------------------------------------------------------------


@jax.jit
def _tiled_all(q, k, v, d_out, lengths):
  return {
    m: block_influence_tiled(q, k, v, d_out, lengths, block=BLOCK, magnitude=m)[0]
    for m in MAGNITUDES
  }


def per_sample_profile(model, bucket: CalibrationBucket, loss: str) -> dict[str, np.ndarray]:
  """{magnitude: float32 [S, L, N, NB, NB]}: each sample's block influence."""
  graphdef, state = nnx.split(model)
  out = {m: [] for m in MAGNITUDES}
  positions = bucket.positions()
  for row in range(bucket.num_samples):
    hidden_index, weight = response_targets(bucket.loss_mask[row : row + 1])
    tokens, pos = jnp.asarray(bucket.tokens[row : row + 1]), jnp.asarray(positions[row : row + 1])
    d_outs, records = output_grads(
      graphdef,
      state,
      tokens,
      pos,
      jnp.asarray(hidden_index),
      jnp.asarray(weight),
      implementation="xla",
      padded=True,
      loss=loss,
    )
    lengths = valid_lengths(pos)
    layers = [_tiled_all(*records[l], d_outs[l], lengths) for l in range(len(d_outs))]
    for m in MAGNITUDES:
      out[m].append(np.stack([np.asarray(x[m]) for x in layers]))
  return {m: np.stack(v).astype(np.float32) for m, v in out.items()}


def part_profiles(cache: Cache, model, n: int) -> None:
  for pool in POOLS.value:
    for loss in LOSSES.value:
      key = f"profile_{pool}_{loss}_{n}"
      if cache.has(key):
        continue
      start = time.perf_counter()
      cache.save(key, **per_sample_profile(model, cache.bucket(f"bucket_{pool}_{n}"), loss))
      log(f"profile {key}: {time.perf_counter() - start:.0f} s")


# --- measured masks -----------------------------------------------------------------------------


def val_traces(cache: Cache, model, n: int) -> dict[str, measured.DenseTrace]:
  return {
    name: measured.dense_trace(model, cache.bucket(f"bucket_{name}_{n}"))
    for name in ("val_text", "val_passkey")
  }


def measure(model, traces, windows) -> dict[str, np.ndarray]:
  """{held-out set: per-sample loss increase over dense}."""
  return {
    name: measured.masked_losses(model, t, windows, SINK) - t.dense for name, t in traces.items()
  }


def group_windows(config, n: int, cut: dict[tuple[int, int], int]) -> np.ndarray:
  windows = np.full((config.num_layers, config.num_kv_heads), n)
  for (l, g), w in cut.items():
    windows[l, g] = w
  return windows


def part_ablation(cache: Cache, model, n: int) -> None:
  config = model.config
  traces = val_traces(cache, model, n)
  for kind in ("group", "layer"):
    key = f"ablation_{kind}_w{WINDOW.value}_{n}"
    if cache.has(key):
      continue
    start = time.perf_counter()
    units = (
      [(l, g) for l in range(config.num_layers) for g in range(config.num_kv_heads)]
      if kind == "group"
      else [(l, -1) for l in range(config.num_layers)]
    )
    rows = {name: [] for name in traces}
    for l, g in units:
      groups = [g] if g >= 0 else range(config.num_kv_heads)
      deltas = measure(
        model, traces, group_windows(config, n, {(l, k): WINDOW.value for k in groups})
      )
      for name, d in deltas.items():
        rows[name].append(d)
    cache.save(key, units=np.array(units), **{name: np.array(v) for name, v in rows.items()})
    log(f"ablation {key}: {time.perf_counter() - start:.0f} s")


def variants(cache: Cache, n: int) -> list[str]:
  """Cached profile names at length n (profile_<pool>_<loss>_<n>), plus 'mix_<answers>_<loss>'
  (the mean of the text and tasks pools' E_bar) where both exist."""
  names = sorted(
    p.stem.removeprefix("profile_").removesuffix(f"_{n}")
    for p in cache.root.glob(f"profile_*_{n}.npz")
  )
  mixes = [
    name.replace("text_", "mix_", 1)
    for name in names
    if name.startswith("text_") and name.replace("text_", "tasks_", 1) in names
  ]
  return names + mixes


def e_bar(cache: Cache, variant: str, n: int, magnitude: str, rows=None) -> np.ndarray:
  if variant.startswith("mix_"):
    return np.mean(
      [
        e_bar(cache, variant.replace("mix_", pool, 1), n, magnitude, rows)
        for pool in ("text_", "tasks_")
      ],
      0,
    )
  per_sample = cache.load(f"profile_{variant}_{n}")[magnitude]
  return (per_sample if rows is None else per_sample[rows]).mean(0)


def milp_plan(config, e: np.ndarray, n: int) -> np.ndarray:
  """[L, K] windows at n of the optimizer's plan for one E_bar (the smollm2 settings at one
  profile length)."""
  rules = rules_lib.candidate_rules(
    [n], CONSTRAINTS, alpha_step=256, betas=tuple(i / 8 for i in range(9))
  )
  problem = build_problem(
    {n: loss_delta(e, rules, n, SINK, BLOCK)},
    rules,
    CONSTRAINTS,
    num_kv_heads=config.num_kv_heads,
    budget=DENSITY,
    lo=0.9,
    max_rules_per_layer=2,
    sink=SINK,
    block=BLOCK,
  )
  front = pareto_front(problem, intervals=1, options=SolverOptions(time_limit=20.0), progress=False)
  return problem.to_plan(front.solutions[0]).cache_windows(n)


def random_masks(config, n: int, count: int, seed: int = 0) -> list[np.ndarray]:
  """Random [L, K] windows: a random half of the groups at a random short window (64..512),
  the rest dense (about KV density 0.5-0.7 at 1k)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    windows = np.full((config.num_layers, config.num_kv_heads), n)
    chosen = rng.random(windows.shape) < 0.5
    windows[chosen] = rng.choice([64, 128, 256, 512], size=int(chosen.sum()))
    out.append(windows)
  return out


def oracle_masks(cache: Cache, config, n: int) -> dict[str, np.ndarray]:
  """Upper-bound [L, K] windows at KV density 0.5 from the held-out sets' own single-group
  ablation (in-sample, so optimistic): the k groups whose narrowing costs most (on val_text, or
  on the mean of both sets) keep all n tokens; the others share the rest of the budget as one
  window, rounded down to the block."""
  key = f"ablation_group_w{WINDOW.value}_{n}"
  if not cache.has(key):
    return {}
  ablation = cache.load(key)
  costs = {
    "text": ablation["val_text"].mean(-1),
    "both": (ablation["val_text"].mean(-1) + ablation["val_passkey"].mean(-1)) / 2,
  }
  groups = config.num_layers * config.num_kv_heads
  out = {}
  for name, cost in costs.items():
    for k in (5, 10, 20, 30):
      rest = (DENSITY * groups * n - k * n) / (groups - k) - SINK
      windows = np.full((config.num_layers, config.num_kv_heads), int(rest // BLOCK * BLOCK))
      for unit in np.argsort(-cost)[:k]:
        layer, group = ablation["units"][unit]
        windows[layer, group] = n
      out[f"oracle_{name}_k{k}"] = windows
  return out


def part_ablation_plan(config) -> None:
  """A plan from the measured single-group ablation ranking that part report recorded in --out
  (`ablation_groups.per_group`: both held-out sets, 8 samples at --length): the --keep costliest
  KV groups attend everything (alpha 0, beta 1); every other group keeps the sink and a window of
  its share of KV density --plan_density at every length (alpha = -sink, beta = (density * G -
  keep) / (G - keep) for G groups). Evaluated on other prompts by experiments/smollm2_results.py."""
  per_group = json.loads(Path(OUT.value).read_text())["ablation_groups"]["per_group"]
  cost = (np.array(per_group["val_text"]) + np.array(per_group["val_passkey"])) / 2  # [L * K]
  groups = config.num_layers * config.num_kv_heads
  rest = (PLAN_DENSITY.value * groups - KEEP.value) / (groups - KEEP.value)
  if not 0 < rest < 1:
    raise ValueError(
      f"--keep={KEEP.value} whole groups leave the other groups a KV share of {rest:.3f} at "
      f"--plan_density={PLAN_DENSITY.value}: it must lie in (0, 1)"
    )
  base = dense_plan(config, sink=SINK, block=BLOCK)
  alphas, betas = np.full(base.alphas.shape, -float(SINK)), np.full(base.betas.shape, rest)
  for unit in np.argsort(-cost)[: KEEP.value]:
    layer, group = divmod(int(unit), config.num_kv_heads)  # units are layer-major
    alphas[layer, group], betas[layer, group] = 0.0, 1.0
  provenance = {
    "method": "measured single-group ablation ranking",
    "command": shlex.join(["python", "experiments/smollm2_diagnostics.py", *sys.argv[1:]]),
    "ranking": f"{OUT.value}: ablation_groups.per_group (mean of val_text and val_passkey)",
    "ranking_samples": "diagnostics held-out sets: stdlib ranks 40-43, passkey seed 77",
    "keep": KEEP.value,
    "kv_density": PLAN_DENSITY.value,
  }
  plan = dataclasses.replace(
    base, alphas=alphas, betas=betas, provenance=provenance
  ).with_densities([1024, 2048, 4096])
  plan.save(PLAN_OUT.value)
  log(f"wrote {PLAN_OUT.value}: KV density {plan.kv_densities}")


def part_masks(cache: Cache, model, n: int) -> None:
  config = model.config
  masks = {
    "uniform": np.full(
      (config.num_layers, config.num_kv_heads), int(rules_lib.window_size(0, DENSITY - SINK / n, n))
    )
  }
  for i, w in enumerate(random_masks(config, n, 8)):
    masks[f"random{i}"] = w
  masks.update(oracle_masks(cache, config, n))
  for variant in variants(cache, n):
    for magnitude in ("entries", "blocks"):
      masks[f"plan_{variant}_{magnitude}"] = milp_plan(
        config, e_bar(cache, variant, n, magnitude), n
      )
  traces = None
  for name, windows in masks.items():
    key = f"mask_{name}_{n}"
    if cache.has(key) and np.array_equal(cache.load(key)["windows"], windows):
      continue
    traces = traces or val_traces(cache, model, n)
    start = time.perf_counter()
    cache.save(key, windows=windows, **measure(model, traces, windows))
    log(f"mask {key}: {time.perf_counter() - start:.0f} s")


def part_at_plan(cache: Cache, model, n: int) -> None:
  """The at-plan estimator linearized at dense (profile/at_plan.py) for every pool, at every
  window some measured mask uses."""
  config = model.config
  windows = {
    int(w)
    for p in cache.root.glob(f"mask_*_{n}.npz")
    for w in np.unique(cache.load(p.stem)["windows"])
  } | {WINDOW.value}
  candidates = np.array(sorted(w for w in windows if w < n))
  dense = np.full((config.num_layers, config.num_heads), n)
  for pool in POOLS.value:
    for loss in LOSSES.value:
      draws = FISHER.value
      key = f"atplan{f'f{draws}' if draws else ''}_{pool}_{loss}_{n}"
      if cache.has(key) and np.array_equal(cache.load(key)["candidates"], candidates):
        continue
      start = time.perf_counter()
      first, second = at_plan.window_deltas(
        model,
        cache.bucket(f"bucket_{pool}_{n}"),
        dense,
        candidates,
        sink=SINK,
        loss=loss,
        fisher_draws=draws,
        components=True,
      )
      cache.save(key, candidates=candidates, deltas=first, second=second)
      log(f"at_plan {key}: {time.perf_counter() - start:.0f} s")


# --- report -------------------------------------------------------------------------------------


def predicted(e: np.ndarray, windows_kv: np.ndarray, n: int) -> float:
  """Predicted dL of per-group windows [L, K] from E_bar [L, N, NB, NB] (query heads)."""
  layers, heads = e.shape[:2]
  windows = rules_lib.expand_to_query_heads(windows_kv, heads)  # [L, N]
  distinct = sorted(set(int(w) for w in windows.ravel()))
  rules = [rules_lib.ElasticRule(float(w), 0.0) for w in distinct]
  dl = loss_delta(e, rules, n, SINK, BLOCK)  # [L, N, R]
  index = np.searchsorted(distinct, windows)
  return float(np.take_along_axis(dl, index[..., None], -1).sum())


def spearman(a, b) -> float:
  return float(stats.spearmanr(a, b).statistic)


def summary(pred: np.ndarray, meas: np.ndarray) -> dict:
  pred, meas = np.asarray(pred, float), np.asarray(meas, float)
  keep = np.abs(pred) > 0
  return {
    "spearman": spearman(pred, meas),
    "pearson": float(np.corrcoef(pred, meas)[0, 1]),
    "median_ratio_measured_over_predicted": float(np.median(meas[keep] / pred[keep]))
    if keep.any()
    else None,
    "n": int(len(pred)),
  }


def predictors(cache: Cache, n: int, rows=None) -> dict:
  """{name: windows [L, K] -> predicted loss increase} for every cached profile variant and
  magnitude ('<pool>_<loss>/<magnitude>') and every at-plan estimate ('<pool>_<loss>/at_plan'),
  from the samples `rows` of each pool (None: all)."""
  out = {}
  for variant in variants(cache, n):
    for magnitude in MAGNITUDES:
      e = e_bar(cache, variant, n, magnitude, rows)
      out[f"{variant}/{magnitude}"] = lambda w, e=e: predicted(e, w, n)
  for path in sorted(cache.root.glob(f"atplan_*_{n}.npz")):
    d = cache.load(path.stem)
    deltas = d["deltas"] if rows is None else d["deltas"][rows]
    mean = deltas.mean(0)  # [L, N, C]
    out[path.stem.removeprefix("atplan_").removesuffix(f"_{n}") + "/at_plan"] = (
      lambda w, mean=mean, c=d["candidates"]: predicted_at_plan(mean, c, w, n)
    )
  for path in sorted(cache.root.glob(f"atplanf*_{n}.npz")):
    d = cache.load(path.stem)
    draws, name = path.stem.removeprefix("atplanf").removesuffix(f"_{n}").split("_", 1)
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])
    first, second = pick(d["deltas"]).mean(0), pick(d["second"]).mean(0)
    for label, mean in ((f"fisher{draws}", second), (f"at_plan+fisher{draws}", first + second)):
      out[f"{name}/{label}"] = lambda w, mean=mean, c=d["candidates"]: predicted_at_plan(
        mean, c, w, n
      )
  return out


def predicted_at_plan(
  mean: np.ndarray, candidates: np.ndarray, windows_kv: np.ndarray, n: int
) -> float:
  """Sum over heads of the at-plan (dense) estimate [L, N, C] at each head's window."""
  windows = rules_lib.expand_to_query_heads(windows_kv, mean.shape[1])
  narrowed = windows < n
  index = np.searchsorted(candidates, np.where(narrowed, windows, candidates[0]))
  if not np.all(candidates[index][narrowed] == windows[narrowed]):
    raise ValueError("a mask window is not among the at-plan candidates: rerun part at_plan")
  return float(
    np.where(narrowed, np.take_along_axis(mean, index[..., None], -1)[..., 0], 0.0).sum()
  )


def ablation_cuts(config, n: int, units) -> list[np.ndarray]:
  return [
    group_windows(
      config, n, {(l, k): WINDOW.value for k in ([g] if g >= 0 else range(config.num_kv_heads))}
    )
    for l, g in units
  ]


def part_report(cache: Cache, config, n: int, start: float) -> dict:
  held_out = ("val_text", "val_passkey")
  result = {
    "command": shlex.join(["python", "experiments/smollm2_diagnostics.py", *sys.argv[1:]]),
    "length": n,
    "sink": SINK,
    "block": BLOCK,
    "window": WINDOW.value,
    "held_out": {
      "val_text": f"stdlib size ranks {TEXT_VAL_RANK}.."
      f"{TEXT_VAL_RANK + VAL_SIZE.value - 1}, their own last 64 tokens",
      "val_passkey": f"{VAL_SIZE.value} passkey prompts, seed 77, true key",
    },
    "pools": {
      "text": f"stdlib size ranks {TEXT_CALIBRATION_RANK}..",
      "tasks": f"{', '.join(TASKS)}, seed 2025",
      "_ref": "ground-truth responses",
      "_model": "the model's own",
    },
  }
  mean = lambda d, sets=held_out: float(np.mean([d[name].mean() for name in sets]))
  masks = {
    p.stem.removeprefix("mask_").removesuffix(f"_{n}"): cache.load(p.stem)
    for p in sorted(cache.root.glob(f"mask_*_{n}.npz"))
  }
  result["masks_measured"] = {
    name: {
      "mean_increase": mean(d),
      **{h: float(d[h].mean()) for h in held_out},
      "kv_density": float(rules_lib.kv_density(d["windows"], SINK, n)),
    }
    for name, d in masks.items()
  }
  ablations = {
    kind: cache.load(f"ablation_{kind}_w{WINDOW.value}_{n}")
    for kind in ("group", "layer")
    if cache.has(f"ablation_{kind}_w{WINDOW.value}_{n}")
  }
  first_order, ranking = {}, {}
  for name, predict in predictors(cache, n).items():
    row = {}
    for kind, d in ablations.items():
      units = [tuple(u) for u in d["units"]]
      pred = np.array([predict(w) for w in ablation_cuts(config, n, units)])
      for sets in (held_out, *[(h,) for h in held_out]):
        meas = np.mean([d[h] for h in sets], 0).mean(-1)
        row[f"single_{kind}" + ("" if len(sets) > 1 else f"/{sets[0]}")] = summary(pred, meas)
      if kind == "group":
        meas = np.mean([d[h] for h in held_out], 0).mean(-1)
        order, pred_order = np.argsort(-meas), np.argsort(-pred)
        pred_rank = stats.rankdata(-pred)
        ranking[name] = {
          "spearman": spearman(pred, meas),
          "profile_rank_of_top5_measured": {
            f"{units[i][0]}/{units[i][1]}": int(pred_rank[i]) for i in order[:5]
          },
          "top10_overlap": len(set(order[:10]) & set(pred_order[:10])),
          "profile_top5": [f"{units[i][0]}/{units[i][1]}" for i in pred_order[:5]],
        }
    checked = {k: d for k, d in masks.items() if not k.startswith("oracle_")}  # bounds only
    if checked:
      pred = [predict(d["windows"]) for d in checked.values()]
      meas = [mean(d) for d in checked.values()]
      row["whole_model_masks"] = dict(
        summary(pred, meas),
        pairs={name: {"predicted": p, "measured": m} for name, p, m in zip(checked, pred, meas)},
      )
    first_order[name] = row
  result["first_order_check"] = first_order
  result["ablation_vs_profile_ranking"] = ranking
  objective = {}
  all_predictors = predictors(cache, n)
  for name, d in masks.items():
    if name.startswith("plan_") and "uniform" in masks:
      variant, magnitude = name.removeprefix("plan_").rsplit("_", 1)
      own = all_predictors[f"{variant}/{magnitude}"]
      objective[name] = {
        "plan": {"predicted": own(d["windows"]), "measured": mean(d)},
        "uniform": {
          "predicted": own(masks["uniform"]["windows"]),
          "measured": mean(masks["uniform"]),
        },
        "predicted_better_but_measured_worse": bool(
          own(d["windows"]) < own(masks["uniform"]["windows"]) and mean(d) > mean(masks["uniform"])
        ),
      }
  result["optimizer_vs_own_objective"] = objective
  if "group" in ablations:
    d = ablations["group"]
    meas = np.mean([d[h] for h in held_out], 0).mean(-1)
    order = np.argsort(-meas)
    result["ablation_groups"] = {
      "top10_layer_group_increase": [
        [int(d["units"][i][0]), int(d["units"][i][1]), float(meas[i])] for i in order[:10]
      ],
      "sum_of_single_group_increases": float(meas.sum()),
      "spearman_between_held_out_sets": spearman(d[held_out[0]].mean(-1), d[held_out[1]].mean(-1)),
      "per_group": {h: d[h].mean(-1).round(6).tolist() for h in held_out},
    }
  if "layer" in ablations:
    d = ablations["layer"]
    result["ablation_layers"] = {h: d[h].mean(-1).round(6).tolist() for h in held_out}
  result["sensitivity"] = sensitivity(cache, config, n, ablations, held_out)
  result["seconds_report"] = time.perf_counter() - start
  return result


def sensitivity(cache, config, n, ablations, held_out) -> dict:
  """Spearman with the measured single-group ablation of each predictor built from the first
  2, 4, ... samples of its pool, and the split-half agreement of its group ranking."""
  if "group" not in ablations:
    return {}
  d = ablations["group"]
  meas = np.mean([d[h] for h in held_out], 0).mean(-1)
  cuts = ablation_cuts(config, n, [tuple(u) for u in d["units"]])
  size = POOL_SIZE.value
  out = {}
  for rows in [np.arange(k) for k in sorted({2, 4, size // 2, size}) if k <= size]:
    for name, predict in predictors(cache, n, rows).items():
      out.setdefault(name, {})[str(len(rows))] = spearman([predict(w) for w in cuts], meas)
  halves = [
    predictors(cache, n, np.arange(size // 2)),
    predictors(cache, n, np.arange(size // 2, size)),
  ]
  for name in halves[0]:
    out[name]["split_half_agreement"] = spearman(*[[h[name](w) for w in cuts] for h in halves])
  return out


def main(argv):
  del argv
  start = time.perf_counter()
  unknown = set(PARTS_FLAG.value) - set(PARTS)
  if unknown:
    raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
  cache, n = Cache(Path(CACHE.value)), LENGTH.value
  model, config = load_checkpoint(MODEL.value)
  tokenizer = load_checkpoint_tokenizer(MODEL.value)
  log(f"model loaded in {time.perf_counter() - start:.0f} s")
  if "data" in PARTS_FLAG.value:
    part_data(cache, model, tokenizer, n)
  if "profiles" in PARTS_FLAG.value:
    part_profiles(cache, model, n)
  if "ablation" in PARTS_FLAG.value:
    part_ablation(cache, model, n)
  if "masks" in PARTS_FLAG.value:
    part_masks(cache, model, n)
  if "at_plan" in PARTS_FLAG.value:
    part_at_plan(cache, model, n)
  if "ablation_plan" in PARTS_FLAG.value:
    part_ablation_plan(config)
  if "report" in PARTS_FLAG.value:
    result = part_report(cache, config, n, start)
    atomic_write_text(OUT.value, json.dumps(result, indent=1) + "\n")
    log(f"wrote {OUT.value}")


if __name__ == "__main__":
  app.run(main)
