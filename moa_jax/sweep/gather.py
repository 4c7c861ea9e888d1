"""Gathered sweep results: accuracy and perplexity against KV density, per task and length.

Every finished point's evaluation (DIR/points/<name>/eval/results.json) gives MoA's and
uniform's scores at that point's KV budget and dense's (the same at every point). `rows` puts
them in one list, `write` saves DIR/sweep_results.json, the table DIR/sweep.md and the plot
DIR/sweep.png: one panel per task and length, x the KV density each method has at that length,
MoA and uniform as lines over the budgets and dense as a horizontal line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_jax.workdir import atomic_write, atomic_write_text

METHODS = ("moa", "uniform", "dense")
# Tasks scored by perplexity only (no answer to check): their panels plot perplexity.
PERPLEXITY_TASKS = ("longtext",)


def rows(
  results: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
) -> list[dict[str, Any]]:
  """{point name: (overrides, eval results)} -> one row per (method, task, length, point);
  dense once (from the first point)."""
  out = []
  for i, (name, (overrides, result)) in enumerate(sorted(results.items())):
    summary, kv = result["summary"], result["meta"]["kv_density"]
    budget = result["meta"]["config"]["eval"]["density"]
    for method in METHODS:
      if method == "dense" and i > 0 or method not in kv:
        continue
      tasks = sorted(
        set(summary["accuracy"].get(method, {})) | set(summary["perplexity"].get(method, {}))
      )
      for task in tasks:
        accuracy = summary["accuracy"].get(method, {}).get(task, {})
        perplexity = summary["perplexity"].get(method, {}).get(task, {})
        for length in sorted(set(accuracy) | set(perplexity), key=int):
          out.append(
            dict(
              point=name if method != "dense" else "",
              overrides=dict(overrides),
              method=method,
              budget=1.0 if method == "dense" else budget,
              task=task,
              length=int(length),
              kv_density=kv[method][length],
              accuracy=accuracy.get(length),
              perplexity=perplexity.get(length),
            )
          )
  return out


def _number(value: float | None, digits: int) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def markdown(table: Sequence[Mapping[str, Any]], failed: Mapping[str, str]) -> str:
  lines = [
    "# Sweep results",
    "",
    "Accuracy and perplexity against KV density; dense is the reference above them.",
    "",
    "| task | length | method | point | budget | KV density | accuracy | perplexity |",
    "|---|---|---|---|---|---|---|---|",
  ]
  order = {m: i for i, m in enumerate(METHODS)}
  for r in sorted(table, key=lambda r: (r["task"], r["length"], order[r["method"]], r["budget"])):
    lines.append(
      f"| {r['task']} | {r['length']} | {r['method']} | {r['point']} | "
      f"{r['budget']:g} | {r['kv_density']:.4f} | {_number(r['accuracy'], 3)} | "
      f"{_number(r['perplexity'], 3)} |"
    )
  if failed:
    lines += [
      "",
      "## Failed points (not in the table)",
      "",
      *[f"- {name}: {why}" for name, why in sorted(failed.items())],
    ]
  return "\n".join(lines) + "\n"


def plot(table: Sequence[Mapping[str, Any]], path: Path) -> None:
  """One panel per (task, length): the task's metric against KV density per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = sorted({r["task"] for r in table})
  lengths = sorted({r["length"] for r in table})
  fig, axes = plt.subplots(
    len(tasks),
    len(lengths),
    squeeze=False,
    figsize=(3.6 * len(lengths), 2.9 * len(tasks)),
    layout="constrained",
  )
  styles = {"moa": dict(color="tab:red", marker="o"), "uniform": dict(color="tab:blue", marker="s")}
  for i, task in enumerate(tasks):
    metric = "perplexity" if task in PERPLEXITY_TASKS else "accuracy"
    for j, length in enumerate(lengths):
      ax = axes[i][j]
      cell = [
        r for r in table if r["task"] == task and r["length"] == length and r[metric] is not None
      ]
      for method, style in styles.items():
        points = sorted((r["kv_density"], r[metric]) for r in cell if r["method"] == method)
        if points:
          ax.plot(*zip(*points), label=method, **style)
      for r in cell:
        if r["method"] == "dense":
          ax.axhline(r[metric], color="black", linestyle="--", label="dense")
      if metric == "accuracy":
        ax.set_ylim(-0.03, 1.03)
      ax.set_title(f"{task} @ {length}", fontsize=10)
      ax.set_xlabel("KV density")
      ax.set_ylabel(metric)
      ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles))
  atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
  plt.close(fig)


def write(
  folder: Path,
  results: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
  failed: Mapping[str, str],
) -> dict[str, Any]:
  """Write sweep_results.json, sweep.md and (when there is a row) sweep.png into folder."""
  table = rows(results)
  gathered = {"rows": table, "points": sorted(results), "failed": dict(failed)}
  atomic_write_text(folder / "sweep_results.json", json.dumps(gathered, indent=1) + "\n")
  atomic_write_text(folder / "sweep.md", markdown(table, failed))
  if table:
    plot(table, folder / "sweep.png")
  return gathered
