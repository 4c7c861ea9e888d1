"""Every input of a command checked before any model is loaded or any stage runs.

`compress`, `demo`, `generate`, `eval`, `sweep`, `convert` and `plan_memory` (each
`(config, workdir)`; the command's name with '_' for '-') are what their commands call first.
Each checks, stopping at the first problem:
  1. every config field's type and range (`FIELDS`: one `Rule` per dotted field name);
  2. relations between fields (profile lengths among the calibration lengths, lengths beyond
     the answer and the sink, ...);
  3. the model's files without loading a weight: config.json and the safetensors headers (or a
     GGUF header), the tokenizer and its vocabulary against the checkpoint's vocab_size;
  4. what the inputs must serve: lengths within the model's context, calibration records (JSONL
     read line by line) that fill every length, the feasible KV-density range of the rule grid
     (the MILP's own feasibility problem, which does not depend on the profile), plan files
     (schema, version, fitting the model);
  5. a writable workdir.
A problem is one ValueError or FileNotFoundError line naming the field or file and what would be
valid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moa_jax.calibration import build as calibration_build
from moa_jax.calibration import prompts
from moa_jax.cli import field_names
from moa_jax.models import gguf, hf, loading
from moa_jax.models.config import PRESETS, LlamaConfig
from moa_jax.models.loading import reference_model_dir
from moa_jax.optimize import decomposition
from moa_jax.optimize.direct import SolverOptions
from moa_jax.optimize.problem import GROUPINGS, InfeasibleError, build_problem
from moa_jax.plans import rules as rules_lib
from moa_jax.plans.plan import Plan, uniform_plan
from moa_jax.profile.influence import MAGNITUDES
from moa_jax.profile.profiler import LOSSES, PATHS

DTYPES = ("float32", "bfloat16", "float16")
MAX_LENGTH = 2**24  # positions are int32; a profile grows with the length squared
MAX_SEED = 2**32 - 1  # numpy and jax.random take seeds in [0, 2**32)
DENSITY_SLACK = 1e-3  # the decomposition's budgets lie within its gap of the extremes
MAX_BATCH = 4096  # batches are padded to full size with copies: a huge one only exhausts memory
MAX_COUNT = 100_000  # samples per length (or depth): beyond this a run would not end


# ----------------------------------------------------------------------------- field rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one config field accepts: `accepts(value)`, and `valid`, words for the message."""

  accepts: Callable[[Any], bool]
  valid: str


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(lo: int, hi: int | None = None) -> Rule:
  """An int in [lo, hi] (no upper end if hi is None)."""
  words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
  return Rule(lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi), words)


def number(lo: float, hi: float | None = None, *, open_lo: bool = False, why: str = "") -> Rule:
  """A finite int or float in [lo, hi] ((lo, hi] if open_lo)."""
  above = (lambda v: v > lo) if open_lo else (lambda v: v >= lo)
  span = f"{'(' if open_lo else '['}{lo:g}, {'inf)' if hi is None else f'{hi:g}]'}"
  return Rule(
    lambda v: _is_number(v) and above(v) and (hi is None or v <= hi),
    f"a finite number in {span}{why}",
  )


def one_of(*options: str) -> Rule:
  return Rule(
    lambda v: isinstance(v, str) and v in options, "one of " + ", ".join(repr(o) for o in options)
  )


def text(empty: bool = False) -> Rule:
  return Rule(
    lambda v: isinstance(v, str) and (empty or bool(v.strip())),
    "a string" if empty else "a non-empty string",
  )


FLAG = Rule(lambda v: isinstance(v, bool), "True or False")
SEED = integer(0, MAX_SEED)
LENGTHS = Rule(
  lambda v: isinstance(v, (tuple, list))
  and len(v) > 0
  and all(_is_int(n) and 1 <= n <= MAX_LENGTH for n in v)
  and len(set(v)) == len(v),
  f"a non-empty tuple of distinct token counts in [1, {MAX_LENGTH}], e.g. (1024, 2048)",
)
LENGTH = integer(1, MAX_LENGTH)
BETAS = Rule(
  lambda v: isinstance(v, (tuple, list))
  and len(v) > 0
  and all(_is_number(b) and 0 <= b <= 1 for b in v),
  "a non-empty tuple of slopes in [0, 1], e.g. (0.0, 0.5, 1.0)",
)
PROMPTS = Rule(
  lambda v: isinstance(v, (tuple, list))
  and len(v) > 0
  and all(isinstance(p, str) and p for p in v),
  "a non-empty tuple of non-empty strings",
)
NAMES = Rule(
  lambda v: PROMPTS.accepts(v) and len(set(v)) == len(v),
  "a non-empty tuple of distinct non-empty names",
)
BATCH = integer(1, MAX_BATCH)
COUNT = integer(1, MAX_COUNT)


def _prefixed(prefix: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
  return {f"{prefix}.{name}": rule for name, rule in rules.items()}


MODEL = {
  "path": Rule(
    lambda v: isinstance(v, str),
    "a HF checkpoint directory, a hub id, a .gguf file, or '' for the embedded reference model",
  ),
  "preset": one_of("", *PRESETS),
  "tokenizer": text(empty=True),
  "dtype": one_of("", *DTYPES),
  "seed": SEED,
}
CALIBRATION = {
  "source": one_of(*calibration_build.SOURCES),
  "path": text(),
  "split": text(),
  "lengths": LENGTHS,
  "samples_per_length": COUNT,
  "max_new_tokens": integer(1, MAX_LENGTH),
  "template": one_of(*prompts.TEMPLATE_NAMES),
  "min_fill": number(0, 1),
  "batch_size": BATCH,
}
PROFILE = {
  "lengths": LENGTHS,
  "block": integer(1, MAX_LENGTH),
  "path": one_of(*PATHS),
  "magnitude": one_of(*MAGNITUDES),
  "loss": one_of(*LOSSES),
  "batch_size": BATCH,
}
OPTIMIZE = {
  "density": number(
    0,
    1,
    open_lo=True,
    why=" (a KV density: cached tokens / length; a window is clipped to the length, so 1 is dense)",
  ),
  "lower": number(0, 1),
  "constraint_lengths": LENGTHS,
  "alpha_step": integer(1, MAX_LENGTH),
  "betas": BETAS,
  "max_rules_per_layer": integer(1),
  "grouping": one_of(*GROUPINGS),
  "sink": integer(0, MAX_LENGTH),
  "intervals": integer(1, 64),
  "time_limit": number(0, open_lo=True, why=" seconds"),
  "workers": integer(1),
}
SELECT = {"length": LENGTH, "num_samples": COUNT, "split": text()}
DEMO_EVAL = {
  "tasks": NAMES,
  "lengths": LENGTHS,
  "samples_per_depth": COUNT,
  "seed": SEED,
  "batch_size": BATCH,
}
STRINGS = Rule(
  lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
  "a tuple of strings",
)
EVAL = {  # moa_jax.eval.command.eval_section
  "methods": STRINGS,
  "plans": text(empty=True),
  "density": OPTIMIZE["density"],
  "sink": OPTIMIZE["sink"],
  "tasks": NAMES,
  "lengths": LENGTHS,
  "depths": Rule(
    lambda v: isinstance(v, (tuple, list))
    and len(v) > 0
    and all(_is_number(d) and 0 <= d <= 1 for d in v),
    "a non-empty tuple of depths in [0, 1]",
  ),
  "samples_per_depth": COUNT,
  "seed": SEED,
  "max_new_tokens": integer(0, MAX_LENGTH),
  "first_line": FLAG,
  "with_ce": FLAG,
  "template": one_of(*prompts.TEMPLATE_NAMES),
  "batch_size": BATCH,
  "prefill_chunk": integer(0, MAX_LENGTH),
  "longbench.data_dir": text(empty=True),
  "longbench.num_samples": integer(0, MAX_COUNT),
  "longtext.num_documents": integer(1, MAX_COUNT),
  "longtext.target_tokens": LENGTH,
}
SLURM = {  # moa_jax.sweep.launchers.slurm_section
  "partition": text(empty=True),
  "timeout_min": integer(2),
  "mem_gb": number(0, open_lo=True),
  "cpus_per_job": integer(1),
  "gpus_per_job": integer(0),
  "max_parallel": integer(0),
  "extra": text(empty=True),
  "setup": STRINGS,
}

MESH = {  # moa_jax.models.sharding.mesh_section
  "shape": Rule(
    lambda v: isinstance(v, (tuple, list))
    and len(v) == 3
    and all(_is_int(n) and (n >= 1 or n == -1) for n in v)
    and list(v).count(-1) <= 1,
    "3 device counts (data, fsdp, tensor), each >= 1, one may be -1 (the rest)",
  ),
  "distributed": FLAG,
  "coordinator": text(empty=True),
  "num_processes": integer(0),
  "process_id": integer(-1),
}

COMPRESS_FIELDS = {
  "seed": SEED,
  **_prefixed("model", MODEL),
  **_prefixed("mesh", MESH),
  **_prefixed("calibration", CALIBRATION),
  **_prefixed("profile", PROFILE),
  **_prefixed("optimize", OPTIMIZE),
  **_prefixed("select", SELECT),
}
FIELDS = {
  "compress": COMPRESS_FIELDS,
  "demo": {**COMPRESS_FIELDS, **_prefixed("eval", DEMO_EVAL)},
  "generate": {
    **_prefixed("model", MODEL),
    **_prefixed("mesh", MESH),
    "plan": text(empty=True),
    "prompts": PROMPTS,
    "chat": FLAG,
    "max_new_tokens": integer(1, MAX_LENGTH),
    "temperature": number(0, why=" (0 = greedy)"),
    "top_k": integer(0),
    "seed": SEED,
  },
  "eval": {**_prefixed("model", MODEL), **_prefixed("eval", EVAL)},
  "sweep": {
    **COMPRESS_FIELDS,
    **_prefixed("eval", EVAL),
    "sweep": Rule(
      lambda v: isinstance(v, (tuple, list)),
      "a tuple of points (moa_jax.sweep.hyper.sweep / product / zipit)",
    ),
    "launcher": one_of("local", "slurm"),
    "local.workers": integer(1, 1024),
    **_prefixed("slurm", SLURM),
    "compilation_cache": text(empty=True),
  },
  "convert": {
    "gguf": Rule(lambda v: isinstance(v, str) and bool(v), "a .gguf file or a packaged model name"),
    "dtype": one_of(*DTYPES),
  },
  "plan-memory": {
    **_prefixed("model", MODEL),
    **_prefixed("mesh", MESH),
    "task": one_of("generate", "profile"),
    "length": LENGTH,
    "batch_size": BATCH,
    "new_tokens": LENGTH,
    "prefill_chunk": integer(0, MAX_LENGTH),
    "density": OPTIMIZE["density"],
    "plan": text(empty=True),
    "sink": OPTIMIZE["sink"],
    "response_tokens": LENGTH,
    "loss": one_of(*LOSSES),
    "block": PROFILE["block"],
    "tile": LENGTH,
    "device_memory_gb": number(0, open_lo=True),
    "usable_fraction": number(0, 1, open_lo=True),
  },
}


def _get(config, name: str) -> Any:
  for part in name.split("."):
    config = config[part]
  return config


def check_fields(config, rules: Mapping[str, Rule]) -> None:
  """A one-line ValueError for the first field of `config` that its rule does not accept."""
  for name in field_names(config):
    rule = rules.get(name)
    value = _get(config, name)
    if rule is not None and value is None and not rule.accepts(value):  # a required placeholder
      raise ValueError(f"this config needs --config.{name}=<{rule.valid}>")
    if rule is not None and not rule.accepts(value):
      raise ValueError(f"--config.{name}={_show(value)} is invalid: expected {rule.valid}")


def _show(value) -> str:
  shown = repr(value)
  return shown if len(shown) <= 80 else shown[:77] + "..."


# ----------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """What a model section names, read without loading a weight: the model's LlamaConfig, where
  it comes from (a checkpoint directory or .gguf file; None for a random preset) and its
  tokenizer."""

  config: LlamaConfig
  checkpoint: Path | None
  tokenizer: Any

  @property
  def context(self) -> int | None:
    """Tokens a checkpoint serves (None for a random preset, which was never trained)."""
    return None if self.checkpoint is None else context_length(self.config)


def context_length(config: LlamaConfig) -> int:
  """max_position_embeddings, times the factor of a linear RoPE scaling (whose config.json gives
  the unscaled length; Llama-3 scaling states the extended one)."""
  scaling = config.rope_scaling_dict or {}
  factor = scaling.get("factor", 1.0) if scaling.get("rope_type") == "linear" else 1.0
  return int(config.max_position_embeddings * factor)


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str):
  return loading.load_checkpoint_tokenizer(source)


def model_inputs(section) -> ModelInputs:
  """The model a `model` config section names (as `moa_jax.models.loading.load_model` reads it),
  checked without loading a weight: config.json, every safetensors header and tensor shape (or
  the GGUF header), and the tokenizer, whose size must fit the checkpoint's vocabulary."""
  if section.preset:
    tokenizer = _tokenizer(str(section.tokenizer or section.path or reference_model_dir()))
    return ModelInputs(
      LlamaConfig.preset(section.preset, vocab_size=len(tokenizer)), None, tokenizer
    )
  dtype = section.dtype or None
  path = loading.resolve_model_path(section.path or reference_model_dir())
  if gguf.is_gguf(path):
    checkpoint = Path(path).expanduser()
    config = gguf.gguf_config(checkpoint, dtype=dtype)
  else:
    checkpoint = hf.resolve_checkpoint_dir(path)
    config = LlamaConfig.from_hf_dict(hf.read_hf_config(checkpoint), dtype=dtype)
    headers = hf.read_tensor_headers(hf.weight_files(checkpoint))
    _, expected = hf._abstract_model(config)
    hf.check_tensors(
      {name: shape for name, (_, shape, _) in headers.items()}, expected, f"checkpoint {checkpoint}"
    )
    for name, (file, _, stored) in headers.items():
      if stored not in hf.FLOAT_DTYPES:
        raise ValueError(
          f"tensor {name!r} in {file} has dtype {stored}; expected one of "
          f"{', '.join(hf.FLOAT_DTYPES)}"
        )
  tokenizer = _tokenizer(str(section.tokenizer or checkpoint))
  if len(tokenizer) > config.vocab_size:
    raise ValueError(
      f"the tokenizer of {section.tokenizer or checkpoint} has {len(tokenizer)} tokens but "
      f"checkpoint {checkpoint} has vocab_size {config.vocab_size}: ids from "
      f"{config.vocab_size} on have no embedding; use the checkpoint's own tokenizer "
      "(--config.model.tokenizer)"
    )
  return ModelInputs(config, checkpoint, tokenizer)


def check_context(model: ModelInputs, lengths: Mapping[str, Any]) -> None:
  """A one-line ValueError if a length (field name -> length or lengths) exceeds the context
  a checkpoint was trained for."""
  context = model.context
  if context is None:
    return
  for name, value in lengths.items():
    longest = max(value) if isinstance(value, (tuple, list)) else value
    if longest > context:
      raise ValueError(
        f"--config.{name}={_show(value)} reaches {longest} tokens, beyond the {context}-token "
        f"context of {model.checkpoint} (max_position_embeddings"
        f"{' x linear RoPE factor' if context != model.config.max_position_embeddings else ''}"
        "): choose lengths up to the context"
      )


def check_plan(path: str, model: ModelInputs) -> Plan:
  """The plan file at `path` (schema and version checked by Plan.load) fitted to the model."""
  plan = Plan.load(path)
  try:
    return plan.validate(model.config)
  except ValueError as error:
    raise ValueError(f"plan file {path}: {error}") from None


# ------------------------------------------------------------------------------ compress


def _calibration(
  config, *, seed: int, lengths, samples: int, split: str
) -> calibration_build.CalibrationConfig:
  section = config.calibration
  return calibration_build.CalibrationConfig(
    source=section.source,
    path=section.path,
    split=split,
    lengths=tuple(lengths),
    samples_per_length=samples,
    max_new_tokens=section.max_new_tokens,
    seed=seed,
    template=section.template,
    min_fill=section.min_fill,
    batch_size=section.batch_size,
  )


def check_relations(config) -> None:
  """Relations between compress fields that no single field's rule sees."""
  cal, prof, opt, sel = config.calibration, config.profile, config.optimize, config.select
  short = [n for n in cal.lengths if n <= cal.max_new_tokens]
  if short:
    raise ValueError(
      f"--config.calibration.lengths={_show(cal.lengths)} must each exceed "
      f"calibration.max_new_tokens={cal.max_new_tokens} (a sample is a prompt "
      "plus the answer), got " + ", ".join(map(str, short))
    )
  if sel.length <= cal.max_new_tokens:
    raise ValueError(
      f"--config.select.length={sel.length} must exceed "
      f"calibration.max_new_tokens={cal.max_new_tokens} (the validation samples "
      "hold a prompt and the answer)"
    )
  unprofiled = [n for n in prof.lengths if n not in cal.lengths]
  if unprofiled:
    raise ValueError(
      f"--config.profile.lengths={_show(prof.lengths)}: {unprofiled} not among "
      f"calibration.lengths={_show(cal.lengths)} (the profile reads calibration "
      "samples of its lengths)"
    )
  if prof.batch_size > cal.samples_per_length:
    raise ValueError(
      f"--config.profile.batch_size={prof.batch_size} exceeds "
      f"calibration.samples_per_length={cal.samples_per_length}: a batch is "
      "filled with weightless copies, so a larger one only costs time"
    )
  if prof.block > min(prof.lengths):
    raise ValueError(
      f"--config.profile.block={prof.block} exceeds the shortest profile length "
      f"{min(prof.lengths)}: choose a block of at most that many tokens"
    )
  rules = candidate_rules(config)
  if not rules:
    raise ValueError(
      f"--config.optimize.alpha_step={opt.alpha_step} and optimize.betas="
      f"{_show(opt.betas)} give no candidate rule for profile lengths "
      f"{_show(prof.lengths)}: use a smaller alpha_step or more betas"
    )


def candidate_rules(config) -> list[rules_lib.ElasticRule]:
  """The rule grid of a compress config (what its optimize stage chooses from)."""
  opt = config.optimize
  return rules_lib.candidate_rules(
    list(config.profile.lengths),
    list(opt.constraint_lengths),
    alpha_step=opt.alpha_step,
    betas=tuple(opt.betas),
  )


def feasible_density_range(config, model_config: LlamaConfig) -> tuple[float, float] | None:
  """(smallest, largest) KV-density budget that the optimize stage of `config` can meet for this
  model: the band lower * budget <= density <= budget at every constraint length, with the rule
  grid and the rules-per-layer limit, solved as the stage's solver would (the band does not
  depend on the profile, so zero costs serve). None if the solver ran out of time."""
  opt = config.optimize
  rules = candidate_rules(config)
  shape = (model_config.num_layers, model_config.num_heads, len(rules))
  problem = build_problem(
    {n: np.zeros(shape) for n in config.profile.lengths},
    rules,
    list(opt.constraint_lengths),
    num_kv_heads=model_config.num_kv_heads,
    budget=1.0,
    lo=opt.lower,
    max_rules_per_layer=opt.max_rules_per_layer,
    grouping=opt.grouping,
    sink=opt.sink,
    block=config.profile.block,
  )
  options = SolverOptions(time_limit=opt.time_limit)
  try:
    return decomposition.solver_for(problem, options).feasible_budget_range(options)
  except InfeasibleError as error:
    raise ValueError(f"--config.optimize.lower={opt.lower}: {error}") from None
  except TimeoutError:
    return None


def check_density(config, model_config: LlamaConfig) -> None:
  """The uniform baseline at select.length exists, and optimize.density is feasible."""
  opt = config.optimize
  check_uniform(
    model_config,
    opt.density,
    config.select.length,
    opt.sink,
    ("select.length", "optimize.density", "optimize.sink"),
  )
  found = feasible_density_range(config, model_config)
  if found is not None:
    smallest, largest = found
    if not smallest - DENSITY_SLACK <= opt.density <= largest + 1e-9:
      raise ValueError(
        f"--config.optimize.density={opt.density} is infeasible for this model and rule grid: "
        f"with optimize.lower={opt.lower}, sink {opt.sink} and at most "
        f"{opt.max_rules_per_layer} rules per layer, the KV density at lengths "
        f"{_show(opt.constraint_lengths)} can meet budgets in [{smallest:.4f}, "
        f"{largest:.4f}]"
      )


def check_uniform(
  model_config: LlamaConfig, density: float, n: int, sink: int, fields: tuple[str, str, str]
) -> None:
  """The uniform (StreamingLLM) baseline exists at length n for this density and sink; fields:
  the config names of (length, density, sink) for the message."""
  try:
    uniform_plan(model_config, density, n, sink=sink)
  except ValueError as error:
    raise ValueError(
      f"--config.{fields[0]}={n} with {fields[1]}={density} and {fields[2]}={sink}: {error}"
    ) from None


def check_calibration_data(config, tokenizer) -> None:
  """The calibration source parses (a JSONL file line by line) and holds, for every calibration
  length and the validation length, a record that fills it (the calibration stage's rule)."""
  cal, sel = config.calibration, config.select
  sets = [
    (
      _calibration(config, seed=config.seed, lengths=cal.lengths, samples=1, split=cal.split),
      "calibration.lengths",
    ),
    (
      _calibration(config, seed=config.seed + 1, lengths=(sel.length,), samples=1, split=sel.split),
      "select.length",
    ),
  ]
  for calibration, field in sets:
    try:
      examples = calibration_build.load_examples(calibration)
    except (ValueError, FileNotFoundError) as error:
      raise type(error)(f"--config.calibration.path={cal.path!r}: {error}") from None
    longest_first = sorted(examples, key=lambda e: -len(e.context))
    for n in calibration.lengths:
      budget = n - calibration.max_new_tokens
      longest = 0
      for example in longest_first:
        ids, full = calibration_build.fit_prompt(tokenizer, example, budget, calibration.template)
        longest = max(longest, full)
        if ids is not None and full >= calibration.min_fill * budget:
          break
      else:
        raise ValueError(
          f"--config.{field}: no record of {cal.path} fills length {n}: prompts need >= "
          f"{calibration.min_fill * budget:.0f} tokens (calibration.min_fill="
          f"{calibration.min_fill}), the longest has {longest}; lower min_fill or the length, "
          "or add longer documents"
        )


def check_workdir(workdir: str | Path) -> None:
  """The workdir is (or can be made) a directory this process can write files in."""
  path = Path(workdir)
  if path.exists() and not path.is_dir():
    raise ValueError(f"--workdir={path} is a file; expected a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise ValueError(f"--workdir={path} is not writable ({error.strerror or error})") from None


def _compress_checks(config, model: ModelInputs) -> None:
  """What compress needs of a config whose fields and relations passed, for this model."""
  cal, opt = config.calibration, config.optimize
  check_context(
    model,
    {
      "calibration.lengths": cal.lengths,
      "optimize.constraint_lengths": opt.constraint_lengths,
      "select.length": config.select.length,
    },
  )
  check_density(config, model.config)
  check_calibration_data(config, model.tokenizer)


def compress(config, workdir: str | Path | None) -> ModelInputs:
  """Check a compress config and workdir (module docstring); returns what the model section
  names."""
  if workdir is None:
    raise ValueError("compress needs --workdir=DIR (its stages resume from there)")
  check_fields(config, FIELDS["compress"])
  check_relations(config)
  model = model_inputs(config.model)
  _compress_checks(config, model)
  check_workdir(workdir)
  return model


def _sizable(model: ModelInputs, tasks, lengths, seed: int, field: str) -> None:
  """Every synthetic task can be sized to every length with this tokenizer."""
  from moa_jax.data import tasks as tasks_lib

  for n in lengths:
    for task in tasks:
      if task in tasks_lib.TASKS:
        try:
          tasks_lib.make_samples(task, model.tokenizer, n, 1, seed=seed)
        except ValueError as error:
          raise ValueError(f"--config.{field}={_show(tuple(lengths))}: {error}") from None


def demo(config, workdir: str | Path) -> ModelInputs:
  """Check a demo config (compress's checks, then the eval section) and workdir."""
  from moa_jax.eval import harness

  check_fields(config, FIELDS["demo"])
  model = compress(config, Path(workdir) / "compress")
  ev, opt = config.eval, config.optimize
  for task in ev.tasks:
    try:
      harness.task_kind(task)
    except ValueError as error:
      raise ValueError(f"--config.eval.tasks={_show(ev.tasks)}: {error}") from None
  check_context(model, {"eval.lengths": ev.lengths})
  for n in ev.lengths:
    check_uniform(
      model.config, opt.density, n, opt.sink, ("eval.lengths", "optimize.density", "optimize.sink")
    )
  _sizable(model, ev.tasks, ev.lengths, ev.seed, "eval.lengths")
  return model


def _eval_checks(config, model: ModelInputs, *, plans: bool = True) -> None:
  """The `eval` section of an eval (or sweep point) config for this model: the eval command's
  own section checks, plan files fitting the model, lengths within the context, the uniform
  baseline at every length, synthetic tasks that size to every length and LongBench data that
  loads. plans=False: the plans are yet to be made (a sweep's)."""
  from moa_jax.eval import command as eval_command

  section = config.eval
  spec = eval_command.EvalSpec.from_config(section)
  if plans:
    for path in spec.plan_paths.values():
      eval_command.load_plan(path, model.config)
  check_context(model, {"eval.lengths": section.lengths})
  if "uniform" in spec.methods:
    for n in spec.lengths:
      check_uniform(
        model.config,
        section.density,
        n,
        section.sink,
        ("eval.lengths", "eval.density", "eval.sink"),
      )
  _sizable(model, spec.tasks, spec.lengths, section.seed, "eval.lengths")
  for task in spec.tasks:
    if task.startswith("longbench/"):
      eval_command.load_longbench_records(task, section)


def eval(config, workdir: str | Path) -> ModelInputs:
  """Check an eval config (model and eval sections) and workdir."""
  check_fields(config, FIELDS["eval"])
  model = model_inputs(config.model)
  _eval_checks(config, model)
  check_workdir(workdir)
  return model


def sweep(config, workdir: str | Path | None) -> list:
  """Check a sweep config: its run fields, then every point as compress and eval would (the
  model read once per distinct model section); returns the points."""
  from moa_jax.sweep import hyper, jobs, launchers

  if workdir is None:
    raise ValueError("sweep needs --workdir=DIR (its jobs resume from there)")
  check_fields(config, FIELDS["sweep"])
  launchers.slurm_parameters(config.slurm)
  if config.launcher == "slurm" and shutil.which("sbatch") is None:
    raise ValueError(
      "--config.launcher=slurm needs sbatch on PATH (run on a SLURM login "
      "node), or use --config.launcher=local"
    )
  points = hyper.expand(config)
  models = {}
  for point in points:
    try:
      check_fields(point.config, FIELDS["sweep"])
      check_relations(point.config)
      key = json.dumps(point.config.model.to_dict(), sort_keys=True)
      model = models[key] = models.get(key) or model_inputs(point.config.model)
      _compress_checks(point.config, model)
      _eval_checks(jobs.eval_config(point.config, ("dense", "uniform"), ""), model, plans=False)
    except (ValueError, FileNotFoundError) as error:
      raise type(error)(f"sweep point {point.name}: {error}") from None
  check_workdir(workdir)
  return points


def convert(config, workdir: str | Path | None) -> Path:
  """Check a convert config (a readable GGUF header) and its target; returns the GGUF file."""
  if workdir is None:
    raise ValueError("convert needs --workdir=DIR (the HF checkpoint directory to write)")
  check_fields(config, FIELDS["convert"])
  source = Path(loading.resolve_model_path(config.gguf)).expanduser()
  if not gguf.is_gguf(source):
    raise ValueError(
      f"--config.gguf={config.gguf!r} is invalid: expected a .gguf file or one "
      f"of {', '.join(loading.PACKAGED_MODELS)}"
    )
  gguf.gguf_config(source, dtype=config.dtype)
  target = Path(workdir)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise ValueError(
      f"--workdir={target} already exists and is not an empty directory; remove "
      "it or choose another"
    )
  check_workdir(target.parent)
  return source


def plan_memory(config, workdir: str | Path | None) -> LlamaConfig:
  """Check a plan-memory config: fields, lengths that hold the new tokens, the plan file or the
  uniform stand-in plan for the model's shapes (read from the preset or config.json alone: a
  memory plan reads no weight and no tokenizer), and the workdir if given."""
  from moa_jax import memory

  check_fields(config, FIELDS["plan-memory"])
  if config.task == "generate" and not config.new_tokens < config.length:
    raise ValueError(
      f"--config.new_tokens={config.new_tokens} must be below "
      f"length={config.length} (the prompt is length - new_tokens tokens)"
    )
  if config.task == "profile" and not config.response_tokens < config.length:
    raise ValueError(
      f"--config.response_tokens={config.response_tokens} must be below length={config.length}"
    )
  model_config = memory.model_config(config.model)
  if config.plan:
    plan = Plan.load(config.plan)
    try:
      plan.validate(model_config)
    except ValueError as error:
      raise ValueError(f"plan file {config.plan}: {error}") from None
  else:
    check_uniform(
      model_config, config.density, config.length, config.sink, ("length", "density", "sink")
    )
  if workdir is not None:
    check_workdir(workdir)
  return model_config


def generate(config, workdir: str | Path | None) -> ModelInputs:
  """Check a generate config (model, plan, prompts against the context) and workdir."""
  check_fields(config, FIELDS["generate"])
  model = model_inputs(config.model)
  vocab = model.config.vocab_size
  if config.top_k > vocab:
    raise ValueError(
      f"--config.top_k={config.top_k} is invalid: expected 0 (no truncation) "
      f"or at most the vocabulary size {vocab}"
    )
  if config.plan:
    check_plan(config.plan, model)
  from moa_jax.calibration.prompts import chat_prompt_ids

  for i, prompt in enumerate(config.prompts):
    ids = (
      chat_prompt_ids(model.tokenizer, prompt)
      if config.chat
      else model.tokenizer(prompt)["input_ids"]
    )
    if not ids:
      raise ValueError(f"--config.prompts: prompt {i} ({_show(prompt)}) has no token")
    if model.context is not None and len(ids) + config.max_new_tokens > model.context:
      raise ValueError(
        f"--config.max_new_tokens={config.max_new_tokens}: prompt {i} has {len(ids)} tokens, "
        f"together beyond the {model.context}-token context of {model.checkpoint}"
      )
  if workdir is not None:
    check_workdir(workdir)
  return model
