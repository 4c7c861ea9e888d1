"""Does the profile rank the KV groups line retrieval needs? Loss x magnitude variants compared.

  python experiments/compare_profiles.py --workdir=runs/demo_agnostic \
      --ablation=benchmarks/ablation.json --out=benchmarks/profile_variants.json

Profiles the reference model on the calibration set of a finished compress/demo run
(`<workdir>/compress/calibration/train`) at `--length`, once per profile loss ('nll', 'log_odds')
and magnitude ('entries' = sum |E|, 'blocks' = |sum E|), and compares each
KV group's share of the influence outside a `--window`-token window (the measure of
experiments/ablate_groups.py) with the accuracy drop that cutting that group alone causes
(`--ablation`, written by ablate_groups.py with the same window). Prints a table; writes JSON.
"""

import argparse
import itertools
import json
import time

import numpy as np
from ablate_groups import far_influence
from scipy import stats

from moa_jax.calibration.build import CalibrationSet
from moa_jax.models.hf import load_pretrained
from moa_jax.models.loading import reference_model_dir
from moa_jax.profile.profiler import profile_model


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo_agnostic")
  parser.add_argument("--ablation", default="benchmarks/ablation.json")
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--block", type=int, default=64)
  parser.add_argument("--out", default="benchmarks/profile_variants.json")
  args = parser.parse_args()
  start = time.perf_counter()
  with open(args.ablation) as f:
    ablation = json.load(f)
  model, config = load_pretrained(reference_model_dir(), dtype="float32")
  calibration = CalibrationSet.load(f"{args.workdir}/compress/calibration/train")
  groups = [(r["layer"], r["group"]) for r in ablation["rows"]]
  drop = np.array([ablation["dense_accuracy"] - r["accuracy"] for r in ablation["rows"]])
  needed = [g for g, d in zip(groups, drop) if d > 0]
  records = []
  for loss, magnitude in itertools.product(("nll", "log_odds"), ("entries", "blocks")):
    e_bar = profile_model(
      model, config, calibration, [args.length], args.block, magnitude=magnitude, loss=loss
    )[args.length]
    share = far_influence(e_bar, ablation["window"], args.block, config.group_size)  # [L, K]
    order = [groups[i] for i in np.argsort(-share.ravel())]
    records.append(
      dict(
        loss=loss,
        magnitude=magnitude,
        rank_of_needed_groups={f"{l}/{g}": order.index((l, g)) + 1 for l, g in needed},
        share_of_needed_groups={f"{l}/{g}": float(share[l, g]) for l, g in needed},
        layer0_share=float(share[0].sum()),
        top5=[f"{l}/{g}" for l, g in order[:5]],
        spearman_drop_vs_share=float(stats.spearmanr(drop, share.ravel()).statistic),
        far_influence_share=share.round(5).tolist(),
      )
    )
  result = dict(
    command="python experiments/compare_profiles.py "
    + " ".join(f"--{k}={v}" for k, v in vars(args).items()),
    length=args.length,
    window=ablation["window"],
    num_samples=int(calibration.buckets[args.length].num_samples),
    groups_retrieval_needs=[f"{l}/{g}" for l, g in needed],
    records=records,
    seconds=time.perf_counter() - start,
  )
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"groups whose cut drops line retrieval: {result['groups_retrieval_needs']}")
  print(
    "| loss | magnitude | rank of those groups (of 24) | their share | layer-0 share | Spearman |"
  )
  for r in records:
    print(
      f"| {r['loss']} | {r['magnitude']} | {r['rank_of_needed_groups']} | "
      f"{ {k: round(v, 3) for k, v in r['share_of_needed_groups'].items()} } | "
      f"{r['layer0_share']:.2f} | {r['spearman_drop_vs_share']:.2f} |"
    )


if __name__ == "__main__":
  main()
