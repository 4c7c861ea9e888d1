"""PNG plots of plans: spans per layer x head, and the Pareto front (matplotlib, no display)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moa_jax.plans.plan import Plan
from moa_jax.workdir import atomic_write


def plot_spans(plan: Plan, n: int, path: str | os.PathLike) -> None:
  """Heatmap of every query head's window at planned length n: layers down, heads across."""
  windows = plan.windows(n)  # [L, H]
  fig = Figure(
    figsize=(max(6.0, 0.22 * plan.num_heads + 3), max(4.0, 0.2 * plan.num_layers + 2)),
    layout="constrained",
  )
  ax = fig.add_subplot()
  image = ax.imshow(windows, aspect="auto", cmap="viridis", vmin=0, vmax=n, interpolation="nearest")
  fig.colorbar(image, ax=ax, label="window W(N), tokens\n(sink not included)")
  ax.set_xlabel("query head")
  ax.set_ylabel("layer")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title(
    f"spans at N={n}\nKV density {plan.kv_density(n):.3f}, "
    f"attention density {plan.attention_density(n):.3f}",
    fontsize=9,
  )
  atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def plot_pareto_front(
  plans: Sequence[Plan], path: str | os.PathLike, chosen: Plan | None = None
) -> None:
  """Scatter of every pair of objectives (predicted dL at two profile lengths) over the plans;
  the `chosen` plan (one of `plans`) is marked."""
  if not plans:
    raise ValueError("plot_pareto_front needs at least one plan")
  objectives = [plan.objectives for plan in plans]
  if not objectives[0]:
    raise ValueError("the plans carry no objective values to plot")
  lengths = sorted(objectives[0])
  values = np.array([[row[n] for n in lengths] for row in objectives])  # [plans, P]
  pairs = list(itertools.combinations(range(len(lengths)), 2)) or [(0, 0)]
  fig = Figure(figsize=(4 * len(pairs), 3.6))
  for k, (i, j) in enumerate(pairs):
    ax = fig.add_subplot(1, len(pairs), k + 1)
    ax.scatter(values[:, i], values[:, j], s=18, label="Pareto plans")
    for plan, row in zip(plans, values):
      if plan is chosen:
        ax.scatter(row[i], row[j], s=80, marker="*", color="tab:red", label="chosen")
    ax.set_xlabel(f"predicted dL at N={lengths[i]}")
    ax.set_ylabel(f"predicted dL at N={lengths[j]}")
    ax.legend(fontsize=7)
  fig.suptitle(f"Pareto front: {len(objectives)} plans", fontsize=10)
  fig.tight_layout()
  atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
