"""PNG plots of harness records: accuracy or perplexity against length, length x depth heatmaps.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moa_jax.eval.harness import ACCURACY_THRESHOLD, accuracy_table, perplexity_table
from moa_jax.workdir import atomic_write


def _save(fig: Figure, path: str | os.PathLike) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  atomic_write(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:], dpi=110))
  return os.fspath(path)


def _by_length_panels(
  table: Mapping[str, Mapping[str, Mapping[int, float]]],
  path: str | os.PathLike,
  ylabel: str,
  threshold: float | None,
  log_y: bool = False,
) -> str:
  """One panel per task, one line per method: a value against prompt length."""
  tasks = sorted({t for by_task in table.values() for t in by_task})
  if not tasks:
    raise ValueError("no records to plot")
  fig = Figure(figsize=(4.5 * len(tasks), 3.6), layout="constrained")
  for ax, task in zip(np.atleast_1d(fig.subplots(1, len(tasks))), tasks):
    for method, by_task in table.items():
      if task in by_task:
        lengths = sorted(by_task[task])
        ax.plot(lengths, [by_task[task][n] for n in lengths], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set(title=task, xlabel="prompt length (tokens)", ylabel=ylabel)
    if log_y:
      ax.set_yscale("log")
    if threshold is not None:
      ax.set_ylim(-0.03, 1.03)
      ax.axhline(threshold, color="gray", linewidth=0.8, linestyle=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, path)


def plot_accuracy_vs_length(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
  """One panel per task, one line per method: accuracy (all depths; LongBench score / 100)
  against prompt length."""
  return _by_length_panels(accuracy_table(records), path, "accuracy", ACCURACY_THRESHOLD)


def plot_perplexity_vs_length(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
  """One panel per longtext task, one line per method: perplexity against length."""
  table = perplexity_table([r for r in records if r["accuracy"] is None])
  return _by_length_panels(table, path, "perplexity (last tokens)", None, log_y=True)


def plot_depth_heatmaps(
  records: Sequence[Mapping[str, Any]], path: str | os.PathLike, task: str
) -> str:
  """One heatmap per method for `task`: accuracy by length (rows) and needle depth decile."""
  rows = [r for r in records if r["task"] == task and r.get("decile") is not None]
  if not rows:
    raise ValueError(f"no records of task {task!r} to plot")
  methods = sorted({r["method"] for r in rows})
  lengths = sorted({r["length"] for r in rows})
  fig = Figure(figsize=(4.2 * len(methods), 0.5 * len(lengths) + 2.2), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(methods)))
  for ax, method in zip(axes, methods):
    grid = np.full((len(lengths), 10), np.nan)  # [lengths, deciles]
    for r in rows:
      if r["method"] == method:
        grid[lengths.index(r["length"]), r["decile"]] = r["accuracy"]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
      if not np.isnan(value):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7)
    ax.set(
      title=f"{method}: {task}",
      xlabel="needle depth (decile)",
      ylabel="length (tokens)",
      xticks=range(10),
      yticks=range(len(lengths)),
      yticklabels=[str(n) for n in lengths],
    )
  fig.colorbar(image, ax=list(axes), label="accuracy", shrink=0.8)
  return _save(fig, path)


def plot_all(records: Sequence[Mapping[str, Any]], directory: str | os.PathLike) -> list[str]:
  """In `directory`: accuracy_vs_length.png (tasks with an accuracy), perplexity_vs_length.png
  (longtext) and heatmap_<task>.png for every task with needle depths."""
  paths = []
  if any(r["accuracy"] is not None for r in records):
    paths.append(
      plot_accuracy_vs_length(records, os.path.join(directory, "accuracy_vs_length.png"))
    )
  if any(r["accuracy"] is None for r in records):
    paths.append(
      plot_perplexity_vs_length(records, os.path.join(directory, "perplexity_vs_length.png"))
    )
  for task in sorted({r["task"] for r in records if r.get("decile") is not None}):
    paths.append(plot_depth_heatmaps(records, os.path.join(directory, f"heatmap_{task}.png"), task))
  return paths
