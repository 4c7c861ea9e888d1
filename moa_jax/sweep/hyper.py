"""Sweeps written in a config file (big_vision's `get_hyper` idea).

A sweep is a tuple of points; a point is a tuple of (field, value) pairs, the field a dotted
name in the config with or without the leading 'config.':

    c.sweep = hyper.product([
        hyper.sweep("config.optimize.density", (0.25, 0.375, 0.5, 0.75)),
        hyper.zipit([hyper.sweep("config.seed", (0, 1)), hyper.sweep("config.eval.seed", (0, 1))]),
    ])                                           # 4 densities x 2 seeds = 8 points

Tuples keep the sweep a plain value of an ml_collections ConfigDict field. `expand(config)`
checks every field and returns the points, each with its name and its own config.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ml_collections import ConfigDict

Point = tuple[tuple[str, Any], ...]
# Fields of a sweep config that say how to run it, not what a point computes.
RUN_FIELDS = ("sweep", "launcher", "local", "slurm", "compilation_cache")


def sweep(name: str, values: Iterable[Any]) -> tuple[Point, ...]:
  """One field over values: one point per value."""
  return tuple(((name, value),) for value in values)


def product(sweeps: Sequence[Sequence[Point]]) -> tuple[Point, ...]:
  """Every combination of one point of each sweep (the last varies fastest)."""
  return tuple(sum(combo, ()) for combo in itertools.product(*sweeps))


def zipit(sweeps: Sequence[Sequence[Point]]) -> tuple[Point, ...]:
  """The i-th points of every sweep together; the sweeps must have the same length."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f"zipit needs sweeps of one length, got lengths {sorted(lengths)}")
  return tuple(sum(combo, ()) for combo in zip(*sweeps))


def chain(sweeps: Sequence[Sequence[Point]]) -> tuple[Point, ...]:
  """The points of each sweep, one sweep after the other."""
  return tuple(point for s in sweeps for point in s)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  """One point: its folder name, its overrides {field: value} and its config (the sweep config
  with the overrides applied and without the RUN_FIELDS, locked)."""

  name: str
  overrides: dict[str, Any]
  config: ConfigDict


def _field(name: str) -> str:
  return name.removeprefix("config.")


def _format(value: Any) -> str:
  text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
  return re.sub(r"[^A-Za-z0-9_.,+-]", "_", text)


def _names(points: Sequence[dict[str, Any]]) -> list[str]:
  """'density=0.25' style names: a field's last component where that is unambiguous."""
  fields = sorted({f for p in points for f in p})
  short = {f: f.rsplit(".", 1)[-1] for f in fields}
  if len(set(short.values())) < len(short):
    short = {f: f for f in fields}
  return ["-".join(f"{short[f]}={_format(p[f])}" for f in p) or "base" for p in points]


def _set(config: ConfigDict, field: str, value: Any) -> None:
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  if isinstance(node[leaf], tuple) and isinstance(value, list):
    value = tuple(value)
  node[leaf] = value


def _leaves(config: ConfigDict, prefix: str = "") -> list[str]:
  names = []
  for key, value in config.items():
    if isinstance(value, ConfigDict):
      names.extend(_leaves(value, f"{prefix}{key}."))
    else:
      names.append(f"{prefix}{key}")
  return names


def expand(config: ConfigDict) -> list[SweepPoint]:
  """The points of `config.sweep`, checked (unknown or run fields, repeated points, bad values)
  before any work; an empty sweep is one point, the config itself."""
  base = copy.deepcopy(config)
  with base.unlocked():
    for field in RUN_FIELDS:
      if field in base:
        del base[field]
  base.lock()
  valid = set(_leaves(base))
  raw = config.sweep or ((),)
  points = []
  for point in raw:
    if not isinstance(point, (tuple, list)):
      raise ValueError(
        f"sweep point {point!r} is not a tuple of (field, value) pairs; build the "
        "sweep with moa_jax.sweep.hyper.sweep / product / zipit / chain"
      )
    overrides = {}
    for entry in point:
      if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
        raise ValueError(
          f"sweep entry {entry!r} is not a (field, value) pair; build the sweep "
          "with moa_jax.sweep.hyper.sweep / product / zipit / chain"
        )
      field = _field(entry[0])
      if field not in valid:
        raise ValueError(
          f"sweep field {entry[0]!r} is not a config field (run fields "
          f"{', '.join(RUN_FIELDS)} cannot be swept); valid: "
          f"{', '.join(sorted(valid))}"
        )
      if field in overrides:
        raise ValueError(f"sweep point sets {entry[0]!r} twice: {point!r}")
      overrides[field] = entry[1]
    points.append(overrides)
  names = _names(points)
  if len(set(names)) != len(names):
    repeated = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"sweep has repeated points: {', '.join(repeated)}")
  out = []
  for name, overrides in zip(names, points):
    point_config = copy.deepcopy(base)
    for field, value in overrides.items():
      try:
        _set(point_config, field, value)
      except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"sweep value {value!r} for {field}: {error}") from None
    out.append(SweepPoint(name, overrides, point_config))
  return out
