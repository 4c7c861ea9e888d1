"""Seconds and XLA compilations of the demo's evaluation stage, on the demo's settings.

  python experiments/time_demo_eval.py --plan=runs/demo/compress/plan.json --label=after

Runs the harness call of `moa_jax/demo.py` (dense, uniform and MoA at the demo's KV density on
LongEval line retrieval at configs/demo.py's eval lengths, every method decoding on its own
cache) on the embedded reference model with an existing plan, and appends {label, git commit,
seconds, backend compilations, the machine's load, accuracy table} to `--out`. Run from an older
checkout with PYTHONPATH=<that checkout>, the same script measures the old harness.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import jax
from absl import app, flags

from moa_jax.cli import load_config
from moa_jax.eval import harness
from moa_jax.models.loading import load_model
from moa_jax.plans.plan import Plan

PLAN = flags.DEFINE_string("plan", "runs/demo/compress/plan.json", "the demo's plan.json")
LABEL = flags.DEFINE_string("label", "after", "name of this measurement in the results file")
OUT = flags.DEFINE_string("out", "benchmarks/demo_eval_speed.json", "results file (appended)")


def main(argv):
  del argv
  config = load_config("configs/demo.py")
  ev = config.eval
  model, tokenizer, model_id = load_model(config.model)
  factory = harness.plan_factory(
    model.config,
    density=config.optimize.density,
    plans={"moa": Plan.load(PLAN.value)},
    sink=config.optimize.sink,
  )
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: compiles.append(seconds)
    if event == "/jax/core/compile/backend_compile_duration"
    else None
  )
  load = os.getloadavg()[0]
  start = time.perf_counter()
  records = harness.evaluate(
    model,
    tokenizer,
    methods=("dense", "uniform", "moa"),
    attention_factory=factory,
    tasks=tuple(ev.tasks),
    lengths=tuple(ev.lengths),
    samples_per_depth=ev.samples_per_depth,
    seed=ev.seed,
    batch_size=ev.batch_size,
    progress=False,
  )
  seconds = time.perf_counter() - start
  commit = (
    subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    or "unknown"
  )
  entry = {
    "label": LABEL.value,
    "commit": commit,
    "model": model_id,
    "plan": PLAN.value,
    "seconds": round(seconds, 1),
    "backend_compiles": len(compiles),
    "compile_seconds": round(sum(compiles), 1),
    "generations": sum(r["num_samples"] for r in records),
    "load_average_1min": [round(load, 1), round(os.getloadavg()[0], 1)],  # start, end
    "accuracy": {
      m: {t: {str(n): a for n, a in by_n.items()} for t, by_n in by_t.items()}
      for m, by_t in harness.accuracy_table(records).items()
    },
  }
  out = Path(OUT.value)
  results = (
    json.loads(out.read_text())
    if out.exists()
    else {
      "command": "python experiments/time_demo_eval.py --plan=PLAN --label=LABEL",
      "what": __doc__.split("\n")[0],
      "runs": [],
    }
  )
  results["runs"].append(entry)
  out.write_text(json.dumps(results, indent=1) + "\n")
  print(json.dumps(entry, indent=1))


if __name__ == "__main__":
  app.run(main)
