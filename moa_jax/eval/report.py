"""Markdown tables and the report of an evaluation's results (`moa_jax.eval.command`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_jax.eval.harness import accuracy_table, perplexity_table


def markdown_table(
  table: Mapping[str, Mapping[str, Mapping[int, float]]],
  task: str,
  methods: Sequence[str],
  scale: float = 1.0,
  digits: int = 2,
) -> str:
  """Rows: methods; columns: the task's lengths; cells: value x scale ('-' where missing)."""
  lengths = sorted({n for m in methods for n in table.get(m, {}).get(task, {})})
  rows = [
    "| method | " + " | ".join(str(n) for n in lengths) + " |",
    "|---" * (len(lengths) + 1) + "|",
  ]
  for method in methods:
    by_length = table.get(method, {}).get(task, {})
    rows.append(
      f"| {method} | "
      + " | ".join(f"{by_length[n] * scale:.{digits}f}" if n in by_length else "-" for n in lengths)
      + " |"
    )
  return "\n".join(rows)


def summary_tables(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> str:
  """One titled table per task: accuracy (synthetic), LongBench score x 100, or perplexity."""
  accuracy, perplexity = accuracy_table(records), perplexity_table(records)
  parts = []
  for task in dict.fromkeys(r["task"] for r in records):
    if task.startswith("longbench/"):
      parts.append(
        f"{task}: LongBench score (x 100) by prompt length\n\n"
        + markdown_table(accuracy, task, methods, scale=100, digits=1)
      )
    elif any(r["task"] == task and r["accuracy"] is None for r in records):
      parts.append(
        f"{task}: perplexity of the last tokens by length\n\n"
        + markdown_table(perplexity, task, methods, digits=3)
      )
    else:
      parts.append(
        f"{task}: accuracy (all depths) by prompt length\n\n"
        + markdown_table(accuracy, task, methods)
      )
  return "\n\n".join(parts)


def markdown_report(result: Mapping[str, Any], figures: Sequence[str]) -> str:
  """The report of a results dict (`harness.save_results` layout, meta from `run_eval`)."""
  meta, records = result["meta"], result["records"]
  methods = meta["methods"]
  lines = [
    "# Evaluation",
    "",
    f"Model: {meta['model']}.",
    "",
    f"Command: `{meta['command']}`",
    "",
    "Methods and their KV density (cached tokens / dense cache) per length:",
    "",
  ]
  for method in methods:
    source = f" (plan {meta['plans'][method]})" if method in meta["plans"] else ""
    lines.append(f"- {method}{source}: {json.dumps(meta['kv_density'][method])}")
  lines += [
    "",
    summary_tables(records, methods),
    "",
    "Effective context length (longest length with accuracy >= 0.9): "
    + json.dumps(result["summary"]["effective_context_length"]),
    "",
  ]
  if "longtext" in meta:
    files = ", ".join(f["name"] for f in meta["longtext"]["files"])
    lines += [
      f"Long text: the largest modules of Python {meta['longtext']['python']}'s "
      f"standard library ({files}).",
      "",
    ]
  cells = meta["cells"]
  lines += [
    f"Cells: {cells['total']} ({len(cells['computed'])} computed in this run, "
    f"{len(cells['reused'])} reused); {meta['seconds']:.0f} s.",
    "",
  ]
  lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
  return "\n".join(lines)
