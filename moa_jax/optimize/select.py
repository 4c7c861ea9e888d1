"""The final choice among Pareto plans: the lowest validation loss at an unseen, longer length."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import tqdm

from moa_jax.plans.plan import Plan


def select_plan(
  plans: Sequence[Plan], validation_loss: Callable[[Plan], float], progress: bool = True
) -> tuple[Plan, list[dict[str, Any]]]:
  """Evaluate `validation_loss(plan)` for every plan and return the one with the lowest loss.

  Returns (chosen plan, table) where the table has one row per plan, in input order:
  {"index", "loss", "chosen", "objectives", "kv_densities"}. A NaN or infinite loss ranks last;
  if every loss is, this raises ValueError.
  """
  if not plans:
    raise ValueError("select_plan needs at least one plan (the Pareto front is empty)")
  losses = [
    float(validation_loss(plan))
    for plan in tqdm.tqdm(plans, desc="validation", disable=not progress)
  ]
  finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
  if not finite:
    raise ValueError(f"every plan's validation loss is NaN or infinite: {losses}")
  chosen = min(finite, key=lambda i: losses[i])
  table = [
    {
      "index": i,
      "loss": loss,
      "chosen": i == chosen,
      "objectives": dict(plan.objectives),
      "kv_densities": dict(plan.kv_densities),
    }
    for i, (plan, loss) in enumerate(zip(plans, losses))
  ]
  return plans[chosen], table
