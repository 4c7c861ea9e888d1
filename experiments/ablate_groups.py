"""Which KV groups does line retrieval need, and does the profile see them?

  python experiments/ablate_groups.py --workdir=runs/demo_agnostic --out=benchmarks/ablation.json

For every (layer, KV group) of the reference model, that group alone is cut to a short window
(sink + `--window` tokens) while every other group stays dense (`moa_jax.eval.ablation`); the
harness's LongEval line-retrieval accuracy at `--length` tokens (one prompt per depth decile x
`--per_decile`) tells how much retrieval depends on the group's long-range attention. Beside it:
the group's share of the profiled influence outside that window (from
`<workdir>/compress/profile/influence.npz`), and the window the chosen plan gives it at that
length. Prints a table; writes JSON.
"""

import json
import shlex
import sys
import time

import numpy as np
from absl import app, flags
from scipy import stats

from moa_jax.eval import ablation, harness
from moa_jax.models.loading import load_model, model_section
from moa_jax.plans.plan import Plan
from moa_jax.plans.rules import DEFAULT_SINK

WORKDIR = flags.DEFINE_string("workdir", "runs/demo_agnostic", "a finished demo/compress run")
LENGTH = flags.DEFINE_integer("length", 1024, "prompt tokens")
WINDOW = flags.DEFINE_integer("window", 128, "window of the cut group (tokens, besides the sink)")
PER_DECILE = flags.DEFINE_integer("per_decile", 1, "prompts per needle-depth decile")
OUT = flags.DEFINE_string("out", "benchmarks/ablation.json", "results file")


def main(argv):
  del argv
  start = time.perf_counter()
  model, tokenizer, model_id = load_model(model_section())  # the embedded reference model
  config = model.config
  plan = Plan.load(f"{WORKDIR.value}/compress/plan.json").validate(config)
  with np.load(f"{WORKDIR.value}/compress/profile/influence.npz") as data:
    profiled = min((int(n) for n in data.files), key=lambda n: abs(n - LENGTH.value))
    share = ablation.far_influence_share(
      data[str(profiled)], WINDOW.value, plan.block, config.group_size
    )  # [L, K]
  groups = [(l, g) for l in range(config.num_layers) for g in range(config.num_kv_heads)]
  methods = ["dense"] + [ablation.cut_method(l, g) for l, g in groups]
  records = harness.evaluate(
    model,
    tokenizer,
    methods=methods,
    attention_factory=ablation.group_cut_factory(config, WINDOW.value, sink=DEFAULT_SINK),
    tasks=("lines",),
    lengths=(LENGTH.value,),
    samples_per_depth=PER_DECILE.value,
    seed=99,
    max_new_tokens=12,
    batch_size=10,
    with_ce=False,
  )
  accuracy = {
    m: by_task["lines"][LENGTH.value] for m, by_task in harness.accuracy_table(records).items()
  }
  plan_windows = plan.cache_windows(LENGTH.value)  # [L, K]
  rows = [
    dict(
      layer=l,
      group=g,
      accuracy=accuracy[ablation.cut_method(l, g)],
      far_influence_share=float(share[l, g]),
      plan_window=int(plan_windows[l, g]),
    )
    for l, g in groups
  ]
  for r in rows:
    print(
      f"layer {r['layer']} group {r['group']}: accuracy {r['accuracy']:.2f}  far-influence "
      f"share {r['far_influence_share']:.3f}  plan window {r['plan_window']}"
    )
  dense = accuracy["dense"]
  drop = np.array([dense - r["accuracy"] for r in rows])
  result = dict(
    command=shlex.join(["python", "experiments/ablate_groups.py", *sys.argv[1:]]),
    model=model_id,
    length=LENGTH.value,
    window=WINDOW.value,
    profiled_length=profiled,
    num_prompts=10 * PER_DECILE.value,
    dense_accuracy=dense,
    rows=rows,
    spearman_drop_vs_far_influence=float(
      stats.spearmanr(drop, [r["far_influence_share"] for r in rows]).statistic
    ),
    seconds=time.perf_counter() - start,
  )
  with open(OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  print(
    f"dense {dense:.2f}; Spearman(accuracy drop, far-influence share) = "
    f"{result['spearman_drop_vs_far_influence']:.2f}"
  )


if __name__ == "__main__":
  app.run(main)
