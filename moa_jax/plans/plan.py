"""A compression plan: one elastic rule per KV group (or per query head) of a model, and its JSON.

Two file formats:
  * ours (`to_json` / `from_json`, versioned): model identity, sink, block size, grouping mode,
    the rules, KV and attention densities per length, objective values and provenance;
  * the official MoA one (`to_official_json` / `from_official_json`):
    `{"alphas": [[alpha per head] per layer], "betas": [...]}`, alpha in tokens, sink 64 implied,
    one entry per query head (MHA layout, also for GQA models).

Model shapes come from any object with `num_layers`, `num_heads` and `num_kv_heads` attributes
(e.g. `moa_jax.models.config.LlamaConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from moa_jax.plans import rules as rules_lib
from moa_jax.workdir import atomic_write_text

FORMAT_NAME = "moa_jax.plan"
FORMAT_VERSION = 1
GROUPINGS = ("kv_group", "query_head")
DEFAULT_ARCHITECTURE = "LlamaForCausalLM"
OFFICIAL_SINK = 64
# Plan file fields: name -> (JSON types, what is valid). Optional fields are marked '?'.
_INT = ("int",)
SCHEMA = {
  "model": (("dict",), "an object {architecture, num_layers, num_heads, num_kv_heads}"),
  "sink": (_INT, "an integer >= 0"),
  "block": (_INT, "an integer > 0"),
  "grouping": (("str",), f"one of {GROUPINGS}"),
  "alphas": (("list",), "a [layers][groups] list of numbers"),
  "betas": (("list",), "a [layers][groups] list of numbers"),
  "kv_densities?": (("dict",), "an object {length: density}"),
  "attention_densities?": (("dict",), "an object {length: density}"),
  "objectives?": (("dict",), "an object {length: value}"),
  "provenance?": (("dict",), "an object"),
}
MODEL_SCHEMA = {
  "architecture": (("str",), "a string such as 'LlamaForCausalLM'"),
  "num_layers": (_INT, "an integer > 0"),
  "num_heads": (_INT, "an integer > 0"),
  "num_kv_heads": (_INT, "an integer > 0"),
}
_JSON_TYPES = {"int": int, "float": float, "str": str, "list": list, "dict": dict}


def _check_schema(data: dict, schema: dict, prefix: str) -> None:
  """A one-line ValueError for the first field of `schema` missing from `data` or of a wrong
  JSON type (booleans are not numbers)."""
  for key, (types, valid) in schema.items():
    name = key.rstrip("?")
    if name not in data:
      if key.endswith("?"):
        continue
      raise ValueError(f"plan field {prefix}{name!r} is missing (expected {valid})")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, tuple(_JSON_TYPES[t] for t in types)):
      raise ValueError(f"plan field {prefix}{name!r} must be {valid}, got {value!r:.60}")


def _check_tables(data: dict) -> None:
  """A one-line ValueError unless the optional tables map lengths (digit strings) to numbers."""
  for name in ("kv_densities", "attention_densities", "objectives"):
    for length, value in data.get(name, {}).items():
      if not length.isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
          f"plan field {name!r} must map lengths to numbers, got {length!r}: {value!r:.60}"
        )


def model_shape(config: Any) -> tuple[int, int, int]:
  """(num_layers, num_heads, num_kv_heads) of a model config."""
  try:
    return int(config.num_layers), int(config.num_heads), int(config.num_kv_heads)
  except AttributeError as error:
    raise ValueError(
      f"{type(config).__name__} lacks num_layers/num_heads/num_kv_heads: pass a model config"
    ) from error


def _architecture(config: Any) -> str:
  return str(getattr(config, "architecture", DEFAULT_ARCHITECTURE))


def _int_keys(table: Mapping[Any, float]) -> dict[int, float]:
  return {int(n): float(v) for n, v in table.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Elastic rules for every layer and KV group (or query head) of one model.

  alphas, betas: float64 [L, R] with R = num_kv_heads ('kv_group': one rule per KV group) or
  num_heads ('query_head': one rule per query head; each group's cache holds its largest span).
  kv_densities / attention_densities: {length: density}; objectives: {profile length: predicted
  loss increase dL summed over heads}; provenance: JSON-serialisable {config, seed, calibration}.
  """

  num_layers: int
  num_heads: int
  num_kv_heads: int
  alphas: np.ndarray
  betas: np.ndarray
  sink: int = rules_lib.DEFAULT_SINK
  block: int = rules_lib.DEFAULT_BLOCK
  grouping: str = "kv_group"
  architecture: str = DEFAULT_ARCHITECTURE
  kv_densities: Mapping[int, float] = dataclasses.field(default_factory=dict)
  attention_densities: Mapping[int, float] = dataclasses.field(default_factory=dict)
  objectives: Mapping[int, float] = dataclasses.field(default_factory=dict)
  provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)
    for name in ("alphas", "betas"):
      try:
        set_field(name, np.array(getattr(self, name), dtype=np.float64))
      except (TypeError, ValueError) as error:
        raise ValueError(f"plan {name} must be a rectangular numeric array: {error}") from error
    for name in ("kv_densities", "attention_densities", "objectives"):
      set_field(name, _int_keys(getattr(self, name)))
    set_field("provenance", dict(self.provenance))
    if self.grouping not in GROUPINGS:
      raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
    if min(self.num_layers, self.num_heads, self.num_kv_heads) <= 0:
      raise ValueError("num_layers, num_heads and num_kv_heads must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.num_heads} query heads cannot form {self.num_kv_heads} KV groups")
    if self.sink < 0 or self.block <= 0:
      raise ValueError(f"sink must be >= 0 and block > 0, got sink={self.sink} block={self.block}")
    expected = (self.num_layers, self.rules_per_layer)
    for name in ("alphas", "betas"):
      shape = getattr(self, name).shape
      if shape != expected:
        raise ValueError(
          f"plan {name} have shape {shape}, expected {expected} ([layers, "
          f"{'KV groups' if self.grouping == 'kv_group' else 'query heads'}])"
        )
    for name in ("alphas", "betas"):
      bad = np.argwhere(~np.isfinite(getattr(self, name)))
      if bad.size:
        raise ValueError(f"plan {name} hold NaN/inf, first at [layer, head] {bad[0].tolist()}")
    bad = np.argwhere(self.betas < 0)
    if bad.size:
      raise ValueError(
        f"negative beta (span shrinking with length) at [layer, head] "
        f"{bad[0].tolist()}: {self.betas[tuple(bad[0])]}"
      )
    bad = np.argwhere((self.betas == 0) & (self.alphas <= 0))
    if bad.size:
      l, h = bad[0]
      raise ValueError(
        f"rule (alpha={self.alphas[l, h]}, beta=0) at [layer, head] [{l}, {h}] has "
        "a non-positive span at every length"
      )

  @property
  def rules_per_layer(self) -> int:
    """R: KV groups per layer ('kv_group') or query heads per layer ('query_head')."""
    return self.num_kv_heads if self.grouping == "kv_group" else self.num_heads

  def rules(self) -> list[list[rules_lib.ElasticRule]]:
    """The rules as [layer][group or head] ElasticRule."""
    return [
      [rules_lib.ElasticRule(float(a), float(b)) for a, b in zip(ra, rb)]
      for ra, rb in zip(self.alphas, self.betas)
    ]

  def windows(self, n: int) -> np.ndarray:
    """int64 [L, H]: window in tokens of every query head at planned total length n."""
    windows = rules_lib.window_size(self.alphas, self.betas, n, self.block)  # [L, R]
    if self.grouping == "kv_group":
      return rules_lib.expand_to_query_heads(windows, self.num_heads)
    return windows

  def cache_windows(self, n: int) -> np.ndarray:
    """int64 [L, K]: ring-buffer window of every KV group's cache (the group's largest span)."""
    windows = rules_lib.window_size(self.alphas, self.betas, n, self.block)  # [L, R]
    if self.grouping == "kv_group":
      return windows
    group = self.num_heads // self.num_kv_heads
    return windows.reshape(self.num_layers, self.num_kv_heads, group).max(-1)

  def kv_density(self, n: int) -> float:
    """Memory density at length n: cached tokens of the native GQA cache / (L * K * n)."""
    return rules_lib.kv_density(self.cache_windows(n), self.sink, n)

  def attention_density(self, n: int) -> float:
    """Compute density at length n: attended causal pairs / (L * H * n (n + 1) / 2)."""
    unique, inverse = np.unique(self.windows(n), return_inverse=True)
    pairs = rules_lib.attended_pairs(unique, self.sink, n)[inverse]  # [L, H]
    return float(pairs.mean() / (n * (n + 1) / 2))

  def with_densities(self, lengths: Iterable[int]) -> Plan:
    """A copy whose kv_densities and attention_densities hold the values at `lengths`."""
    lengths = sorted({int(n) for n in lengths})
    return dataclasses.replace(
      self,
      kv_densities={n: self.kv_density(n) for n in lengths},
      attention_densities={n: self.attention_density(n) for n in lengths},
    )

  def validate(self, config: Any) -> Plan:
    """Raise ValueError unless this plan fits the model `config`; returns the plan."""
    shape = model_shape(config)
    mine = (self.num_layers, self.num_heads, self.num_kv_heads)
    if shape != mine:
      raise ValueError(
        f"plan is for a model with (layers, heads, kv_heads) = {mine}, but the model has "
        f"{shape}: use a plan made for this model"
      )
    architecture = getattr(config, "architecture", None)
    if architecture is not None and architecture != self.architecture:
      raise ValueError(f"plan is for architecture {self.architecture!r}, model is {architecture!r}")
    return self

  # ------------------------------------------------------------------------------------ JSON

  def to_dict(self) -> dict[str, Any]:
    return {
      "format": FORMAT_NAME,
      "version": FORMAT_VERSION,
      "model": {
        "architecture": self.architecture,
        "num_layers": self.num_layers,
        "num_heads": self.num_heads,
        "num_kv_heads": self.num_kv_heads,
      },
      "sink": self.sink,
      "block": self.block,
      "grouping": self.grouping,
      "alphas": self.alphas.tolist(),
      "betas": self.betas.tolist(),
      "kv_densities": {str(n): v for n, v in sorted(self.kv_densities.items())},
      "attention_densities": {str(n): v for n, v in sorted(self.attention_densities.items())},
      "objectives": {str(n): v for n, v in sorted(self.objectives.items())},
      "provenance": self.provenance,
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_dict(cls, data: Any) -> Plan:
    """The Plan of a parsed plan file; a one-line ValueError names the first field that does not
    fit the schema (`SCHEMA`, `MODEL_SCHEMA`) or an unsupported format version."""
    if not isinstance(data, dict):
      raise ValueError(f"a plan file holds a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
      raise ValueError(
        f"not a {FORMAT_NAME} file (format={data.get('format')!r}); for the "
        "official {alphas, betas} format use Plan.from_official_json"
      )
    if data.get("version") != FORMAT_VERSION:
      raise ValueError(
        f"unsupported plan version {data.get('version')!r}; this moa_jax reads "
        f"version {FORMAT_VERSION}"
      )
    _check_schema(data, SCHEMA, "")
    _check_schema(data["model"], MODEL_SCHEMA, "model.")
    _check_tables(data)
    model = data["model"]
    return cls(
      num_layers=model["num_layers"],
      num_heads=model["num_heads"],
      num_kv_heads=model["num_kv_heads"],
      architecture=model["architecture"],
      alphas=data["alphas"],
      betas=data["betas"],
      sink=data["sink"],
      block=data["block"],
      grouping=data["grouping"],
      kv_densities=data.get("kv_densities", {}),
      attention_densities=data.get("attention_densities", {}),
      objectives=data.get("objectives", {}),
      provenance=data.get("provenance", {}),
    )

  @classmethod
  def from_json(cls, text: str) -> Plan:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as error:
      raise ValueError(
        f"not valid JSON ({error.msg} at line {error.lineno} column "
        f"{error.colno}); expected a {FORMAT_NAME} file (version "
        f"{FORMAT_VERSION}) as written by compress"
      ) from None
    return cls.from_dict(data)

  def save(self, path: str | os.PathLike) -> None:
    """Write our JSON atomically (temporary file + rename)."""
    atomic_write_text(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike) -> Plan:
    """Read a plan file written by `save`; every problem is one line naming the file."""
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"plan file {path} not found (expected a plan.json written by compress)"
      )
    try:
      with open(path, encoding="utf-8") as f:
        return cls.from_json(f.read())
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
      raise ValueError(f"plan file {path}: {error}") from None

  # -------------------------------------------------------------------------- official format

  def to_official_json(self) -> str:
    """`{"alphas": [[...] per layer], "betas": [...]}`, one entry per query head (MHA layout)."""
    if self.sink != OFFICIAL_SINK:
      raise ValueError(
        f"the official format implies sink {OFFICIAL_SINK}; this plan uses sink {self.sink}"
      )
    per_head = lambda values: rules_lib.expand_to_query_heads(values, self.num_heads)
    if self.grouping == "query_head":
      per_head = lambda values: values
    as_number = lambda x: int(x) if float(x).is_integer() else float(x)
    return json.dumps(
      {
        "alphas": [[as_number(a) for a in row] for row in per_head(self.alphas)],
        "betas": [[as_number(b) for b in row] for row in per_head(self.betas)],
      }
    )

  @classmethod
  def from_official_json(
    cls,
    text: str,
    config: Any,
    *,
    grouping: str | None = None,
    block: int = rules_lib.DEFAULT_BLOCK,
  ) -> Plan:
    """Read an official plan for the model `config`.

    The file holds one rule per query head. grouping=None picks 'kv_group' when the heads of
    every KV group share one rule and 'query_head' otherwise; 'kv_group' requires sharing.
    """
    layers, heads, kv_heads = model_shape(config)
    data = json.loads(text)
    if not isinstance(data, dict) or not {"alphas", "betas"} <= data.keys():
      raise ValueError('an official plan is a JSON object {"alphas": [...], "betas": [...]}')
    arrays = {}
    for name in ("alphas", "betas"):
      rows = data[name]
      if not isinstance(rows, list) or len(rows) != layers:
        raise ValueError(
          f"official plan {name} must list {layers} layers, got "
          f"{len(rows) if isinstance(rows, list) else type(rows).__name__}"
        )
      for layer, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != heads:
          raise ValueError(
            f"official plan {name}[{layer}] must hold {heads} entries (one per query head, "
            f"MHA layout) for this model, got {len(row) if isinstance(row, list) else row!r}"
          )
      arrays[name] = np.array(rows, dtype=np.float64)  # [L, H]
    group = heads // kv_heads
    grouped = {name: a.reshape(layers, kv_heads, group) for name, a in arrays.items()}
    shared = all(np.all(a == a[..., :1]) for a in grouped.values())
    if grouping is None:
      grouping = "kv_group" if shared else "query_head"
    if grouping == "kv_group":
      if not shared:
        raise ValueError(
          "the heads of some KV group have different rules; read the plan with "
          "grouping='query_head' (each group's cache holds its largest span)"
        )
      arrays = {name: a[..., 0] for name, a in grouped.items()}
    return cls(
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      alphas=arrays["alphas"],
      betas=arrays["betas"],
      sink=OFFICIAL_SINK,
      block=block,
      grouping=grouping,
      architecture=_architecture(config),
      provenance={"source": "official MoA plan"},
    )


def dense_plan(
  config: Any, sink: int = rules_lib.DEFAULT_SINK, block: int = rules_lib.DEFAULT_BLOCK
) -> Plan:
  """Every KV group attends everything: alpha = 0, beta = 1 (W(N) = N)."""
  layers, heads, kv_heads = model_shape(config)
  return Plan(
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    alphas=np.zeros((layers, kv_heads)),
    betas=np.ones((layers, kv_heads)),
    sink=sink,
    block=block,
    architecture=_architecture(config),
    provenance={"baseline": "dense"},
  )


def uniform_plan(
  config: Any,
  density: float,
  n: int,
  sink: int = rules_lib.DEFAULT_SINK,
  block: int = rules_lib.DEFAULT_BLOCK,
) -> Plan:
  """StreamingLLM baseline: every KV group alpha = 0, beta = density - sink / n, so that the KV
  density at length n is `density` (up to flooring the window to whole tokens)."""
  layers, heads, kv_heads = model_shape(config)
  if n <= sink:
    raise ValueError(f"a uniform plan needs a length beyond the sink ({sink}), got {n}")
  smallest = min(sink + min(block, n), n) / n
  if not smallest <= density <= 1:
    raise ValueError(
      f"a uniform plan at length {n} needs a density in [{smallest:.4f}, 1] "
      f"(sink {sink} + one block), got {density}"
    )
  beta = density - sink / n
  return Plan(
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    alphas=np.zeros((layers, kv_heads)),
    betas=np.full((layers, kv_heads), beta),
    sink=sink,
    block=block,
    architecture=_architecture(config),
    provenance={"baseline": "uniform", "density": density, "length": n},
  )
