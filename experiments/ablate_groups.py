"""Which KV groups does line retrieval need, and does the profile see them?

  python experiments/ablate_groups.py --workdir=runs/demo --out=benchmarks/ablation.json

For every (layer, KV group) of the reference model, that group alone is cut to a short window
(sink + `--window` tokens) while every other group stays dense; LongEval line-retrieval accuracy
at `--length` tokens (one prompt per depth decile x `--per-decile`) tells how much retrieval
depends on the group's long-range attention. Beside it: the group's share of the profiled
influence E_bar outside that window (from `<workdir>/compress/profile/influence.npz`), and the
window the chosen plan gives it at that length. Prints a table; writes JSON.
"""

import argparse
import json
import time

import numpy as np
from scipy import stats

from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.calibration import prompts
from moa_jax.data import tasks
from moa_jax.eval import metrics
from moa_jax.generate import generate
from moa_jax.models.hf import load_pretrained, load_tokenizer
from moa_jax.models.loading import reference_model_dir
from moa_jax.plans.plan import Plan
from moa_jax.plans.rules import DEFAULT_SINK, expand_to_query_heads


def accuracy(model, tokenizer, samples, attention) -> float:
  prompts = [prompts.chat_prompt_ids(tokenizer, s.prompt) for s in samples]
  outputs = generate(model, prompts, 12, attention=attention, eos_id=tokenizer.eos_token_id)
  return float(
    np.mean(
      [
        metrics.score(s.metric, tokenizer.decode(o).split("\n")[0], s.answer)
        for s, o in zip(samples, outputs)
      ]
    )
  )


def far_influence(e_bar: np.ndarray, window: int, block: int, group_size: int) -> np.ndarray:
  """[L, K] influence outside the window (non-sink blocks with r - c >= window / block),
  summed over each group's query heads, as a share of the total."""
  nb = e_bar.shape[-1]
  r, c = np.tril_indices(nb)
  far = (r - c >= window // block) & (c > 0)
  share = e_bar[..., r[far], c[far]].sum(-1)  # [L, N]
  l, n = share.shape
  return share.reshape(l, n // group_size, group_size).sum(-1) / share.sum()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--per-decile", type=int, default=1)
  parser.add_argument("--out", default="benchmarks/ablation.json")
  args = parser.parse_args()
  start = time.perf_counter()
  model, config = load_pretrained(reference_model_dir(), dtype="float32")
  tokenizer = load_tokenizer(reference_model_dir())
  samples = tasks.make_samples(
    "lines", tokenizer, args.length, 10 * args.per_decile, seed=99, depths=tasks.DECILES
  )
  plan = Plan.load(f"{args.workdir}/compress/plan.json")
  with np.load(f"{args.workdir}/compress/profile/influence.npz") as data:
    profiled = min((int(n) for n in data.files), key=lambda n: abs(n - args.length))
    share = far_influence(data[str(profiled)], args.window, plan.block, config.group_size)
  plan_windows = plan.cache_windows(args.length)  # [L, K]
  dense = accuracy(model, tokenizer, samples, DenseAttention())
  rows = []
  for layer in range(config.num_layers):
    for group in range(config.num_kv_heads):
      windows = np.full((config.num_layers, config.num_kv_heads), args.length)
      windows[layer, group] = args.window
      attention = MoAAttention(expand_to_query_heads(windows, config.num_heads), sink=DEFAULT_SINK)
      rows.append(
        dict(
          layer=layer,
          group=group,
          accuracy=accuracy(model, tokenizer, samples, attention),
          far_influence_share=float(share[layer, group]),
          plan_window=int(plan_windows[layer, group]),
        )
      )
      print(
        f"layer {layer} group {group}: accuracy {rows[-1]['accuracy']:.2f}  far-influence "
        f"share {share[layer, group]:.3f}  plan window {plan_windows[layer, group]}",
        flush=True,
      )
  drop = np.array([dense - r["accuracy"] for r in rows])
  result = dict(
    command="python experiments/ablate_groups.py "
    + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
    length=args.length,
    window=args.window,
    profiled_length=profiled,
    num_prompts=len(samples),
    dense_accuracy=dense,
    rows=rows,
    spearman_drop_vs_far_influence=float(
      stats.spearmanr(drop, [r["far_influence_share"] for r in rows]).statistic
    ),
    seconds=time.perf_counter() - start,
  )
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(
    f"dense {dense:.2f}; Spearman(accuracy drop, far-influence share) = "
    f"{result['spearman_drop_vs_far_influence']:.2f}"
  )


if __name__ == "__main__":
  main()
