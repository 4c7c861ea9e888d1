"""Dense LongEval line-retrieval accuracy of the reference model, per length and depth decile.

  python3 experiments/eval_reference.py [--model=DIR] [--lengths=1024,2048,...]
      [--samples_per_depth=5] [--out=benchmarks/reference_model.json] [--deadline_s=0]

Prompts come from `moa_jax.data.tasks.make_samples('lines', ...)` in the model's chat template;
answers from `moa_jax.generate.generate` with DenseAttention (greedy, prefill + cached decode),
scored by the last-integer metric. Every batch of one length is left-padded to that length's
longest prompt (the longest prompt rides along as a filler row, scored once), so each length
compiles the generate loop once (unless memory allows only one row per batch). Writes JSON in
the layout of `moa_jax.eval.harness.save_results` (meta with the command, summary, per-decile
records); it does not import the harness, whose LongBench loader needs `datasets`, absent on
the GPU image.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moa_jax.calibration import prompts  # noqa: E402
from moa_jax.data import tasks  # noqa: E402
from moa_jax.eval import metrics  # noqa: E402
from moa_jax.generate import generate  # noqa: E402
from moa_jax.models import hf  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "moa_jax" / "assets" / "reference_model"
ATTENTION_TEMPORARIES = 4  # float32 [K, G, T, S] arrays the reference attention holds at once


def rows_per_batch(config, tokens: int, memory_bytes: float) -> int:
  """How many prompts of `tokens` tokens fit one dense-reference batch in `memory_bytes`."""
  per_row = ATTENTION_TEMPORARIES * 4 * config.num_heads * tokens * tokens
  return max(1, int(memory_bytes // per_row))


def evaluate_length(model, config, tokenizer, length: int, samples_per_depth: int, seed: int,
                    memory_bytes: float, max_new_tokens: int) -> list[dict]:
  """Per-decile records (harness format) for `samples_per_depth` prompts at each decile."""
  samples = tasks.make_samples("lines", tokenizer, length, samples_per_depth * 10, seed=seed,
                               depths=tasks.DECILES)
  prompts = [prompts.chat_prompt_ids(tokenizer, s.prompt) for s in samples]
  longest = int(np.argmax([len(p) for p in prompts]))
  rows = rows_per_batch(config, len(prompts[longest]) + max_new_tokens, memory_bytes)
  if rows >= 2:  # every batch carries the longest prompt: one shape, one compile per length
    others = [i for i in range(len(samples)) if i != longest]
    batches = [[longest] + others[i:i + rows - 1] for i in range(0, len(others), rows - 1)]
    batches = [b + [longest] * (rows - len(b)) for b in batches] or [[longest]]
  else:  # one prompt per call: it compiles per prompt length, but holds one row in memory
    batches = [[i] for i in range(len(samples))]
  scored: set[int] = set()
  cells: dict[int, list[dict]] = {}
  for batch in batches:
    outputs = generate(model, [prompts[i] for i in batch], max_new_tokens,
                       eos_id=tokenizer.eos_token_id)
    for i, out in zip(batch, outputs):
      if i in scored:  # the filler copies of the longest prompt
        continue
      scored.add(i)
      s = samples[i]
      prediction = tokenizer.decode(out, skip_special_tokens=True).strip().split("\n")[0]
      cells.setdefault(s.decile, []).append(dict(
          score=metrics.score(s.metric, prediction, s.answer), depth=s.depth,
          tokens=len(prompts[i]), prediction=prediction, answer=s.answer))
  return [{"method": "dense", "task": "lines", "length": length, "decile": d,
           "num_samples": len(r), "accuracy": float(np.mean([x["score"] for x in r])),
           "mean_depth": float(np.mean([x["depth"] for x in r])),
           "mean_tokens": float(np.mean([x["tokens"] for x in r])), "ce": None,
           "perplexity": None, "predictions": [[x["prediction"], x["answer"]] for x in r]}
          for d, r in sorted(cells.items())]


def accuracy_by_length(records: list[dict]) -> dict[int, float]:
  """Sample-weighted accuracy over all deciles, per length."""
  totals: dict[int, list[float]] = {}
  for r in records:
    t = totals.setdefault(r["length"], [0.0, 0])
    t[0] += r["accuracy"] * r["num_samples"]
    t[1] += r["num_samples"]
  return {n: s / c for n, (s, c) in sorted(totals.items())}


def save(records: list[dict], path: str, meta: dict, threshold: float = 0.9) -> None:
  table = accuracy_by_length(records)
  summary = {"accuracy": {"dense": {"lines": {str(n): a for n, a in table.items()}}},
             "effective_context_length": {"dense": {"lines": max(
                 [n for n, a in table.items() if a >= threshold], default=0)}}}
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(json.dumps({"meta": meta, "summary": summary, "records": records},
                                   indent=1, ensure_ascii=False) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=str(DEFAULT_MODEL))
  parser.add_argument("--lengths", default="1024,2048,3072,4096,6144,8192")
  parser.add_argument("--samples_per_depth", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_new_tokens", type=int, default=8)
  parser.add_argument("--memory_gb", type=float, default=0.0,
                      help="attention memory per batch (0: 40 GB on GPU, 6 GB on CPU)")
  parser.add_argument("--deadline_s", type=float, default=0.0,
                      help="stop before a length that would start after this many seconds")
  parser.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
  parser.add_argument("--out", default="benchmarks/reference_model.json")
  args = parser.parse_args()
  start = time.perf_counter()
  model, config = hf.load_pretrained(args.model, dtype=args.dtype)
  tokenizer = hf.load_tokenizer(args.model)
  memory = (args.memory_gb or (40.0 if jax.default_backend() == "gpu" else 6.0)) * 2**30
  records, seconds = [], {}
  meta = {"command": "python3 experiments/eval_reference.py " + " ".join(sys.argv[1:]),
          "model": Path(args.model).name, "device": jax.devices()[0].device_kind,
          "backend": jax.default_backend(), "python": platform.python_version(),
          "jax": jax.__version__, "samples_per_length": 10 * args.samples_per_depth,
          "seconds_per_length": seconds}
  for length in [int(n) for n in args.lengths.split(",")]:
    if args.deadline_s and time.perf_counter() - start > args.deadline_s:
      print(f"deadline reached: skipping {length} and longer")
      break
    t0 = time.perf_counter()
    records += evaluate_length(model, config, tokenizer, length, args.samples_per_depth,
                               args.seed, memory, args.max_new_tokens)
    seconds[str(length)] = round(time.perf_counter() - t0, 1)
    save(records, args.out, meta)  # after every length: a killed run keeps what it measured
    acc = accuracy_by_length(records)[length]
    print(f"length {length}: accuracy {acc:.3f} ({seconds[str(length)]} s)", flush=True)
  table = accuracy_by_length(records)
  print("length  accuracy")
  for length, acc in table.items():
    print(f"{length:>6}  {acc:.3f}")


if __name__ == "__main__":
  main()
