"""The main job on the embedded default: compress the reference model with MoA, then compare
dense, uniform window (StreamingLLM) and MoA at the same KV density on LongEval line retrieval,
all decoding on their own caches (dense cache; MoA's static per-head cache for both windowed
methods)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from moa_jax import pipeline, validate
from moa_jax.eval import harness, plots
from moa_jax.plans.plan import uniform_plan
from moa_jax.workdir import atomic_write_text

METHODS = ("dense", "uniform", "moa")


def summary_table(records, lengths) -> str:
  """Markdown table: accuracy per method and length (all depths)."""
  table = harness.accuracy_table(records)
  task = records[0]["task"]
  rows = [
    "| method | " + " | ".join(str(n) for n in lengths) + " |",
    "|---" * (len(lengths) + 1) + "|",
  ]
  for method in METHODS:
    by_length = table.get(method, {}).get(task, {})
    rows.append(
      f"| {method} | " + " | ".join(f"{by_length.get(n, float('nan')):.2f}" for n in lengths) + " |"
    )
  return "\n".join(rows)


def run(config, workdir: str | Path, command: str = "") -> dict:
  """Compress, evaluate the three methods, write DIR/results.json, plots and DIR/report.md.
  `command` (the command line that ran this) is recorded in the results."""
  start = time.perf_counter()
  workdir = Path(workdir)
  compressed = pipeline.compress(config, workdir / "compress")
  plan, model, tokenizer, model_id = (
    compressed.plan,
    compressed.model,
    compressed.tokenizer,
    compressed.model_id,
  )
  ev = config.eval
  factory = harness.plan_factory(
    model.config, density=config.optimize.density, plans={"moa": plan}, sink=config.optimize.sink
  )
  records = harness.evaluate(
    model,
    tokenizer,
    methods=METHODS,
    attention_factory=factory,
    tasks=tuple(ev.tasks),
    lengths=tuple(ev.lengths),
    samples_per_depth=ev.samples_per_depth,
    seed=ev.seed,
    batch_size=ev.batch_size,
  )
  densities = {
    n: {
      "moa": plan.kv_density(n),
      "uniform": uniform_plan(
        model.config, config.optimize.density, n, sink=config.optimize.sink
      ).kv_density(n),
    }
    for n in ev.lengths
  }
  meta = {
    "command": command,
    "model": model_id,
    "seconds": time.perf_counter() - start,
    "kv_density": {str(n): d for n, d in densities.items()},
    "plan": str(workdir / "compress" / "plan.json"),
  }
  result = harness.save_results(records, workdir / "results.json", meta)
  figures = plots.plot_all(records, workdir)
  table = summary_table(records, list(ev.lengths))
  report = "\n".join(
    [
      "# MoA demo",
      "",
      f"Model: {model_id}. KV-density budget {config.optimize.density}.",
      "",
      "Line-retrieval accuracy (LongEval) by prompt length:",
      "",
      table,
      "",
      "KV density actually used per length: " + json.dumps(meta["kv_density"]),
      "",
      "Effective context length (longest length with accuracy >= 0.9): "
      + json.dumps(result["summary"]["effective_context_length"]),
      "",
      *[f"![{Path(f).stem}]({Path(f).name})" for f in figures],
      "",
      "Compression report: [compress/report.md](compress/report.md)",
      "",
    ]
  )
  atomic_write_text(workdir / "report.md", report)
  print(table, flush=True)
  print(f"[moa_jax] demo finished in {meta['seconds']:.0f} s; report: {workdir / 'report.md'}")
  return result


def demo_command(config, workdir: Path | None) -> dict:
  """`python -m moa_jax demo --config=configs/demo.py [--workdir=DIR]` (default runs/demo)."""
  command = shlex.join(["python", "-m", "moa_jax", *sys.argv[1:]])
  validate.demo(config, workdir or Path("runs/demo"))
  return run(config, workdir or Path("runs/demo"), command)
