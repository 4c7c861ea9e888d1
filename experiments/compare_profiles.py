"""Does the profile rank the KV groups line retrieval needs? Loss x magnitude variants compared.

  python experiments/compare_profiles.py --workdir=runs/demo_agnostic \
      --ablation=benchmarks/ablation.json --out=benchmarks/profile_variants.json

Profiles the reference model on the calibration set of a finished compress/demo run
(`<workdir>/compress/calibration/train`) at `--length`, once per profile loss ('nll', 'log_odds')
and magnitude ('entries' = sum |E|, 'blocks' = |sum E|), and compares each KV group's share of
the influence outside the ablation's window (`moa_jax.eval.ablation.far_influence_share`) with
the accuracy drop that cutting that group alone causes (`--ablation`, written by
experiments/ablate_groups.py). Prints a table; writes JSON.
"""

import itertools
import json
import shlex
import sys
import time

import numpy as np
from absl import app, flags
from scipy import stats

from moa_jax.calibration.build import CalibrationSet
from moa_jax.eval.ablation import far_influence_share
from moa_jax.models.loading import load_model, model_section
from moa_jax.profile.profiler import profile_model

WORKDIR = flags.DEFINE_string("workdir", "runs/demo_agnostic", "a finished demo/compress run")
ABLATION = flags.DEFINE_string(
  "ablation", "benchmarks/ablation.json", "results of experiments/ablate_groups.py"
)
LENGTH = flags.DEFINE_integer("length", 1024, "profile length")
BLOCK = flags.DEFINE_integer("block", 64, "profile block size")
OUT = flags.DEFINE_string("out", "benchmarks/profile_variants.json", "results file")


def main(argv):
  del argv
  start = time.perf_counter()
  with open(ABLATION.value) as f:
    ablation = json.load(f)
  model, _, _ = load_model(model_section())  # the embedded reference model, float32
  config = model.config
  calibration = CalibrationSet.load(f"{WORKDIR.value}/compress/calibration/train")
  groups = [(r["layer"], r["group"]) for r in ablation["rows"]]
  drop = np.array([ablation["dense_accuracy"] - r["accuracy"] for r in ablation["rows"]])
  needed = [g for g, d in zip(groups, drop) if d > 0]
  records = []
  for loss, magnitude in itertools.product(("nll", "log_odds"), ("entries", "blocks")):
    e_bar = profile_model(
      model, config, calibration, [LENGTH.value], BLOCK.value, magnitude=magnitude, loss=loss
    )[LENGTH.value]
    share = far_influence_share(e_bar, ablation["window"], BLOCK.value, config.group_size)  # [L, K]
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
    command=shlex.join(["python", "experiments/compare_profiles.py", *sys.argv[1:]]),
    length=LENGTH.value,
    window=ablation["window"],
    num_samples=int(calibration.buckets[LENGTH.value].num_samples),
    groups_retrieval_needs=[f"{l}/{g}" for l, g in needed],
    records=records,
    seconds=time.perf_counter() - start,
  )
  with open(OUT.value, "w") as f:
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
  app.run(main)
