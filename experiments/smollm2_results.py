"""Dense vs uniform (StreamingLLM) vs MoA plans on SmolLM2-135M-Instruct (uniform at --density).

CPU (resumable: finished cells are kept under --workdir):
  python experiments/smollm2_results.py --plans=moa=benchmarks/smollm2_plans/refined.json \
      --out=benchmarks/smollm2.json
GPU (one command, no ml_collections or datasets needed; the GGUF file given by path):
  python experiments/smollm2_results.py --gguf=/path/SmolLM2-135M-Instruct.Q4_1.gguf \
      --plans=moa=benchmarks/smollm2_plans/refined.json --docs=benchmarks/smollm2_docs.jsonl \
      --passkey_per_depth=10 --longtext_documents=40 --out=benchmarks/smollm2_gpu.json

Tasks (every method decodes on its own cache, `moa_jax.eval.harness`):
  * the synthetic tasks of --tasks (passkey by default; any of moa_jax.data.tasks.TASKS) at
    --passkey_lengths: --passkey_per_depth prompts per needle-depth decile (seed --seed, never
    used for calibration or plan choice), greedy accuracy by the task's metric and the response
    cross-entropy of the true answer;
  * long-text perplexity at --longtext_lengths: the cross-entropy of the last 128 tokens of each
    of the --longtext_documents largest stdlib modules (size ranks 0.., never used for
    calibration, which takes ranks 40 and beyond), or of the documents in --docs (a JSONL of
    {name, sha256, text} written by --write_docs, so that another machine scores the same text).
Writes --out after every cell (meta.finished is false until the last): {meta (command, device,
plans, KV densities), summary (accuracy, CE, perplexity, CE increase over dense), records}.
Cells run shortest length first.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from moa_jax.data import longtext, tasks
from moa_jax.eval import harness
from moa_jax.models.loading import load_checkpoint, load_checkpoint_tokenizer
from moa_jax.plans.plan import Plan, uniform_plan
from moa_jax.workdir import atomic_write_text, fingerprint

GGUF = flags.DEFINE_string("gguf", "smollm2-135m-instruct", "the model: a .gguf file or a name")
PLANS = flags.DEFINE_list("plans", [], "name=plan.json entries (methods besides the baselines)")
METHODS = flags.DEFINE_list("methods", ["dense", "uniform"], "baselines to evaluate")
DENSITY = flags.DEFINE_float("density", 0.5, "KV density of the uniform baseline")
SYNTHETIC = flags.DEFINE_list("tasks", ["passkey"], f"synthetic tasks, of {sorted(tasks.TASKS)}")
PASSKEY_LENGTHS = flags.DEFINE_list(
  "passkey_lengths", ["1024", "2048"], "lengths of the synthetic tasks"
)
PASSKEY_PER_DEPTH = flags.DEFINE_integer(
  "passkey_per_depth", 3, "prompts per needle-depth decile of each synthetic task"
)
LONGTEXT_LENGTHS = flags.DEFINE_list(
  "longtext_lengths", ["1024", "2048", "4096"], "long-text lengths"
)
LONGTEXT_DOCUMENTS = flags.DEFINE_integer("longtext_documents", 8, "documents per length")
LONGTEXT_DOCUMENTS_4K = flags.DEFINE_integer(
  "longtext_documents_4k", 0, "documents at lengths > 2048 (0: as many)"
)
DOCS = flags.DEFINE_string("docs", "", "JSONL of documents {name, sha256, text} ('' = stdlib)")
WRITE_DOCS = flags.DEFINE_string("write_docs", "", "write the stdlib documents' tails here, exit")
SEED = flags.DEFINE_integer("seed", 0, "passkey seed")
BATCH = flags.DEFINE_integer("batch_size", 4, "rows per batch")
WORKDIR = flags.DEFINE_string("workdir", "runs/smollm2_results", "finished cells")
OUT = flags.DEFINE_string("out", "benchmarks/smollm2.json", "results file")

TAIL_CHARS = 65536  # the tail of a document kept by --write_docs (enough for 4k tokens)


def log(message: str) -> None:
  print(f"[results {time.strftime('%H:%M:%S')}] {message}", flush=True)


def documents(num: int) -> list[longtext.Document]:
  if not DOCS.value:
    return longtext.stdlib_documents(num)
  rows = [json.loads(line) for line in Path(DOCS.value).read_text().splitlines() if line]
  if len(rows) < num:
    raise ValueError(f"--docs {DOCS.value} holds {len(rows)} documents, {num} asked for")
  return [longtext.Document(r["name"], r["text"], r["sha256"]) for r in rows[:num]]


def write_docs(num: int) -> None:
  lines = [
    json.dumps({"name": d.name, "sha256": d.sha256, "text": d.text[-TAIL_CHARS:]})
    for d in longtext.stdlib_documents(num)
  ]
  atomic_write_text(WRITE_DOCS.value, "\n".join(lines) + "\n")
  log(f"wrote {num} document tails to {WRITE_DOCS.value}")


def summarize(records, methods) -> dict:
  accuracy = harness.accuracy_table(records)
  ce = {
    m: {t: {n: math.log(p) for n, p in by.items()} for t, by in by_task.items()}
    for m, by_task in harness.perplexity_table(records).items()
  }  # mean CE
  out = {"accuracy": {}, "ce": {}, "ce_increase_over_dense": {}, "increase_ratio_to_uniform": {}}
  for m in methods:
    out["accuracy"][m] = {
      t: {str(n): v for n, v in by.items()} for t, by in accuracy.get(m, {}).items()
    }
    out["ce"][m] = {t: {str(n): v for n, v in by.items()} for t, by in ce.get(m, {}).items()}
    if m != "dense" and "dense" in ce:
      out["ce_increase_over_dense"][m] = {
        t: {str(n): v - ce["dense"][t][n] for n, v in by.items() if n in ce["dense"].get(t, {})}
        for t, by in ce.get(m, {}).items()
      }
  uniform = out["ce_increase_over_dense"].get("uniform", {})
  for m, by_task in out["ce_increase_over_dense"].items():
    if m != "uniform":
      out["increase_ratio_to_uniform"][m] = {
        t: {n: v / uniform[t][n] for n, v in by.items() if uniform.get(t, {}).get(n)}
        for t, by in by_task.items()
      }
  return out


def main(argv):
  del argv
  if WRITE_DOCS.value:
    write_docs(LONGTEXT_DOCUMENTS.value)
    return
  unknown = sorted(set(SYNTHETIC.value) - set(tasks.TASKS))
  if unknown:
    raise app.UsageError(f"unknown --tasks {unknown}; choose from {sorted(tasks.TASKS)}")
  start = time.perf_counter()
  model, config = load_checkpoint(GGUF.value)
  tokenizer = load_checkpoint_tokenizer(GGUF.value)
  plans = {}
  for entry in PLANS.value:
    name, _, path = entry.partition("=")
    plans[name] = Plan.load(path).validate(config)
  methods = [*METHODS.value, *plans]
  factory = harness.plan_factory(config, density=DENSITY.value, plans=plans)
  cells_dir = Path(WORKDIR.value)
  docs_all = documents(LONGTEXT_DOCUMENTS.value)
  jobs = [(task, int(n)) for task in SYNTHETIC.value for n in PASSKEY_LENGTHS.value]
  jobs += [("longtext", int(n)) for n in LONGTEXT_LENGTHS.value]
  jobs.sort(key=lambda job: job[1])  # short lengths first: a run cut short keeps them
  lengths = sorted({n for _, n in jobs})
  kv = {
    m: {
      str(n): (
        1.0
        if m == "dense"
        else (uniform_plan(config, DENSITY.value, n) if m == "uniform" else plans[m]).kv_density(n)
      )
      for n in lengths
    }
    for m in methods
  }
  records, seconds = [], {}

  def write_results(finished: bool) -> dict:
    result = {
      "meta": {
        "command": shlex.join(["python", "experiments/smollm2_results.py", *sys.argv[1:]]),
        "model": GGUF.value,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "methods": methods,
        "plans": dict(entry.partition("=")[::2] for entry in PLANS.value),
        "kv_density": kv,
        "synthetic_tasks": SYNTHETIC.value,
        "passkey_seed": SEED.value,
        "passkey_prompts_per_length": 10 * PASSKEY_PER_DEPTH.value,
        "longtext": longtext.provenance(docs_all),
        "docs_file": DOCS.value or None,
        "cell_seconds": seconds,
        "seconds": time.perf_counter() - start,
        "finished": finished,
      },
      "summary": summarize(records, methods),
      "records": records,
    }
    atomic_write_text(OUT.value, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result

  for task, n in jobs:
    if task != "longtext":
      inputs = harness.synthetic_inputs(
        tokenizer, task, n, samples_per_depth=PASSKEY_PER_DEPTH.value, seed=SEED.value
      )
    else:
      docs = docs_all[: LONGTEXT_DOCUMENTS_4K.value or None] if n > 2048 else docs_all
      inputs = harness.longtext_inputs(tokenizer, docs, n, target_tokens=128)
    for method in methods:
      identity = {
        "method": method,
        "task": task,
        "length": n,
        "seed": SEED.value,
        "prompts": [len(p) for p in inputs.prompts],
        "items": [str(i) for i in inputs.items],
        "plan": plans[method].to_dict() if method in plans else None,
        "density": DENSITY.value if method == "uniform" else None,
        "model": GGUF.value,
      }
      path = cells_dir / f"{task}_{method}_{n}_{fingerprint(identity)}.json"
      if path.is_file():
        cell = json.loads(path.read_text())
      else:
        t0 = time.perf_counter()
        cell = {
          "records": harness.evaluate_cell(
            model, tokenizer, inputs, method, factory, batch_size=BATCH.value
          ),
          "seconds": time.perf_counter() - t0,
        }
        atomic_write_text(path, json.dumps(cell, ensure_ascii=False) + "\n")
      seconds[f"{method} {task}@{n}"] = cell["seconds"]
      records += cell["records"]
      log(f"{method} {task}@{n}: {cell['seconds']:.0f} s")
      write_results(finished=False)
  summary = write_results(finished=True)["summary"]
  for task, n in jobs:
    row = " | ".join(
      f"{m}: "
      + (f"acc {summary['accuracy'][m][task][str(n)]:.3f} " if task != "longtext" else "")
      + f"ce {summary['ce'][m][task][str(n)]:.4f}"
      for m in methods
    )
    log(f"{task}@{n}: {row}")
  log(f"wrote {OUT.value} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
