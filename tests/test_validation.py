"""Validation up front (moa_jax/validate.py): every bad input is one line naming the field or
file and what is valid, found before a model is loaded or a stage runs."""

import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moa_jax import validate
from moa_jax.cli import load_config
from moa_jax.models.config import LlamaConfig
from moa_jax.models.hf import load_pretrained
from moa_jax.models.loading import reference_model_dir
from moa_jax.optimize import pareto
from moa_jax.optimize.direct import SolverOptions
from moa_jax.optimize.problem import InfeasibleError, build_problem
from moa_jax.plans.plan import dense_plan

REPO = Path(__file__).resolve().parents[1]
COMPRESS = "configs/compress.py:tiny"


def _one_line(error) -> str:
  message = str(error.value)
  assert message and "\n" not in message
  return message


def _fails(check, spec, overrides, workdir, match, kind=ValueError):
  with pytest.raises(kind, match=match) as error:
    check(load_config(spec, overrides), workdir)
  return _one_line(error)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "moa_jax", *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


# -------------------------------------------------------------------- the shipped configs


def _config(spec, overrides=()):
  """The locked config of `spec`; skipped while the command's config file is not there yet."""
  if not (REPO / spec.split(":")[0]).is_file():
    pytest.skip(f"{spec} does not exist in this checkout")
  return load_config(spec, overrides)


@pytest.mark.parametrize(
  "command, spec",
  [
    ("compress", "configs/compress.py:tiny"),
    ("compress", "configs/compress.py"),
    ("demo", "configs/demo.py:tiny"),
    ("generate", "configs/generate.py:tiny"),
    ("generate", "configs/generate.py"),
    ("eval", "configs/eval.py:tiny"),
    ("eval", "configs/eval.py"),
    ("sweep", "configs/sweep.py:tiny"),
    ("sweep", "configs/sweep.py"),
    ("plan_memory", "configs/memory.py:tiny"),
    ("plan_memory", "configs/memory.py"),
  ],
)
def test_shipped_configs_pass(command, spec, tmp_path):
  config = _config(spec)
  result = getattr(validate, command)(config, tmp_path / "work")
  if command not in ("sweep", "plan_memory"):
    assert result.config.num_layers > 0 and len(result.tokenizer) <= result.config.vocab_size


# -------------------------------------------------------------------------- field rules


@pytest.mark.parametrize(
  "override, match",
  [
    (
      "optimize.density=1.7",
      r"--config.optimize.density=1.7 is invalid: expected a finite "
      r"number in \(0, 1\] \(a KV density",
    ),
    ("optimize.density=0.0", r"optimize.density=0.0 is invalid"),
    ("optimize.density=nan", r"optimize.density=nan is invalid"),
    ("optimize.lower=1.5", r"optimize.lower=1.5 is invalid: expected a finite number in \[0, 1\]"),
    ("calibration.lengths=()", r"calibration.lengths=\(\) is invalid: expected a non-empty"),
    ("calibration.lengths=(256, 256)", r"tuple of distinct token counts"),
    ("profile.lengths=(-1,)", r"profile.lengths=\(-1,\) is invalid"),
    (
      "optimize.betas=(1.5,)",
      r"optimize.betas=\(1.5,\) is invalid: expected a non-empty tuple "
      r"of slopes in \[0, 1\]",
    ),
    ("optimize.sink=-1", r"optimize.sink=-1 is invalid: expected an integer in \[0, "),
    ("profile.block=0", r"profile.block=0 is invalid"),
    ("profile.path=fast", r"profile.path='fast' is invalid: expected one of 'lean', 'direct'"),
    ("optimize.grouping=layer", r"expected one of 'kv_group', 'query_head'"),
    ("calibration.template=llama9", r"calibration.template='llama9' is invalid: expected one of"),
    ("calibration.min_fill=-0.1", r"calibration.min_fill=-0.1 is invalid"),
    ("optimize.time_limit=0.0", r"optimize.time_limit=0.0 is invalid"),
    ("seed=-1", r"--config.seed=-1 is invalid: expected an integer in \[0, 4294967295\]"),
    ("model.dtype=float8", r"model.dtype='float8' is invalid: expected one of '', 'float32'"),
    ("model.preset=llama-9-giant", r"model.preset='llama-9-giant' is invalid: expected one of"),
    ("select.num_samples=0", r"select.num_samples=0 is invalid: expected an integer in \[1, "),
  ],
)
def test_field_rules(override, match, tmp_path):
  _fails(validate.compress, COMPRESS, [override], tmp_path, match)


CONFIGS = {
  "compress": "configs/compress.py",
  "demo": "configs/demo.py",
  "generate": "configs/generate.py",
  "eval": "configs/eval.py",
  "sweep": "configs/sweep.py",
  "convert": "configs/convert.py",
  "plan-memory": "configs/memory.py",
}


def test_every_command_and_field_has_a_check():
  """Every command of the CLI has a validator, and every field of its config (all variants) a
  rule in validate.FIELDS (else it would go unchecked)."""
  from moa_jax.__main__ import COMMANDS
  from moa_jax.cli import field_names

  assert set(COMMANDS) <= set(CONFIGS)
  assert all(hasattr(validate, c.replace("-", "_")) for c in COMMANDS)
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  missing = {}
  for command in COMMANDS:
    module = importlib.import_module(f"configs.{Path(CONFIGS[command]).stem}")
    variants = (
      getattr(module, "VARIANTS", None)
      or getattr(getattr(module, "common", None), "VARIANTS", None)
      or [None]
    )
    names = {
      name
      for variant in variants
      for name in field_names(
        load_config(
          CONFIGS[command] + (f":{variant}" if variant else ""),
          ["gguf=x.gguf"] if command == "convert" else [],
        )
      )
    }
    missing[command] = sorted(names - set(validate.FIELDS[command]))
  assert not any(missing.values()), f"add rules to moa_jax/validate.py FIELDS: {missing}"


# ---------------------------------------------------------------- relations between fields


@pytest.mark.parametrize(
  "overrides, match",
  [
    (
      ["profile.lengths=(256, 384)"],
      r"profile.lengths=\(256, 384\): \[384\] not among "
      r"calibration.lengths=\(256, 512\)",
    ),
    (
      ["calibration.max_new_tokens=300"],
      r"calibration.lengths=\(256, 512\) must each exceed "
      r"calibration.max_new_tokens=300.*got 256",
    ),
    (["select.length=8"], r"select.length=8 must exceed calibration.max_new_tokens=8"),
    (["profile.block=300"], r"profile.block=300 exceeds the shortest profile length 256"),
    (["optimize.alpha_step=1000000"], r"give no candidate rule"),
    (
      ["optimize.sink=800"],
      r"select.length=768 with optimize.density=0.5 and optimize.sink=800: "
      r"a uniform plan needs a length beyond the sink",
    ),
  ],
)
def test_relations(overrides, match, tmp_path):
  _fails(validate.compress, COMPRESS, overrides, tmp_path, match)


# ---------------------------------------------------------------- the feasible density range


def test_density_outside_the_feasible_range_names_the_range(tmp_path):
  message = _fails(
    validate.compress,
    COMPRESS,
    ["optimize.density=0.3"],
    tmp_path,
    r"optimize.density=0.3 is infeasible for this model and rule grid",
  )
  assert message.endswith("can meet budgets in [0.5000, 1.0000]")


def test_feasible_range_is_what_the_optimize_stage_can_meet():
  """The range found up front (zero costs) is where the stage's own solve, on real-looking
  costs, succeeds: at the smallest budget, not below it, and 1.0 at most (a window is clipped
  to the length), not 1 / lower."""
  config = load_config(COMPRESS)
  model_config = LlamaConfig.tiny()
  smallest, largest = validate.feasible_density_range(config, model_config)
  assert largest == pytest.approx(1.0) and 0 < smallest < 1
  rules = validate.candidate_rules(config)
  rng = np.random.default_rng(0)
  dl = {n: rng.random((2, 4, len(rules))) for n in config.profile.lengths}
  opt = config.optimize

  def solve(budget):
    problem = build_problem(
      dl,
      rules,
      list(opt.constraint_lengths),
      num_kv_heads=2,
      budget=budget,
      lo=opt.lower,
      max_rules_per_layer=2,
      sink=opt.sink,
      block=config.profile.block,
    )
    return pareto.pareto_front(problem, intervals=1, options=SolverOptions(), progress=False)

  assert solve(smallest).solutions and solve(1.0).solutions
  with pytest.raises(
    InfeasibleError,
    match=f"smallest feasible budget is {smallest:.4f} "
    r"\(largest 1.0000\)",
  ):
    solve(smallest - 0.01)
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    solve(1.7)


# ----------------------------------------------------------------------- model files


def _checkpoint(tiny_checkpoint, tmp_path) -> Path:
  copy = tmp_path / "ckpt"
  shutil.copytree(tiny_checkpoint, copy)
  return copy


def _generate(path, *more):
  return ["model.preset=", f"model.path={path}", *more]


@pytest.mark.parametrize(
  "damage, match",
  [
    (
      lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:5000]
      ),
      r"model.safetensors is not a readable safetensors file \(truncated or corrupt\?\)",
    ),
    (
      lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"),
      r"model.safetensors is not a readable safetensors file",
    ),
    (
      lambda d: (d / "config.json").write_text('{"model_type": "llama",'),
      r"config.json is not valid JSON",
    ),
    (lambda d: (d / "tokenizer.json").write_text("{"), r"no usable tokenizer in "),
  ],
)
def test_corrupt_checkpoint_files(damage, match, tiny_checkpoint, tmp_path):
  directory = _checkpoint(tiny_checkpoint, tmp_path)
  damage(directory)
  kind = FileNotFoundError if "tokenizer" in match else ValueError
  _fails(validate.generate, "configs/generate.py:tiny", _generate(directory), None, match, kind)


def test_tokenizer_larger_than_the_vocabulary(tiny_checkpoint, tmp_path):
  message = _fails(
    validate.generate,
    "configs/generate.py:tiny",
    _generate(tiny_checkpoint, f"model.tokenizer={reference_model_dir()}"),
    None,
    r"has 8192 tokens but checkpoint .* has vocab_size 256",
  )
  assert "--config.model.tokenizer" in message


def test_nan_and_inf_weights_are_counted_at_load(tiny_checkpoint, tmp_path):
  directory = _checkpoint(tiny_checkpoint, tmp_path)
  tensors = load_file(directory / "model.safetensors")
  tensors["model.norm.weight"][:3] = np.nan
  tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = np.inf
  save_file(tensors, directory / "model.safetensors")
  with pytest.raises(
    ValueError,
    match=r"4 NaN/Inf values in 2 tensor\(s\), first "
    r"'model.layers.0.mlp.up_proj.weight' \(1\)",
  ) as error:
    load_pretrained(directory)
  _one_line(error)


def test_lengths_beyond_the_checkpoint_context(tiny_checkpoint, tmp_path):
  # The tiny checkpoint's config.json says max_position_embeddings 256.
  overrides = ["model.preset=", f"model.path={tiny_checkpoint}"]
  _fails(
    validate.compress,
    COMPRESS,
    overrides,
    tmp_path,
    r"calibration.lengths=\(256, 512\) reaches 512 tokens, beyond the 256-token context of",
  )
  _fails(
    validate.generate,
    "configs/generate.py:tiny",
    _generate(tiny_checkpoint, "max_new_tokens=300"),
    None,
    r"max_new_tokens=300: prompt 0 has \d+ tokens, together beyond the 256-token context",
  )


def test_context_counts_a_linear_rope_factor():
  assert validate.context_length(LlamaConfig.vicuna_7b_16k()) == 16384
  assert validate.context_length(LlamaConfig.llama31_8b()) == 131072


def test_truncated_gguf_is_one_line(tmp_path):
  pytest.importorskip("gguf")
  path = tmp_path / "model.gguf"
  path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 12)
  _fails(
    validate.generate,
    "configs/generate.py:tiny",
    _generate(path),
    None,
    r"model.gguf is not a readable GGUF file",
  )


# ------------------------------------------------------------------------------ plans


def _plan_file(tmp_path, text) -> str:
  path = tmp_path / "plan.json"
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize(
  "text, match",
  [
    (
      '{"format": "moa_jax.plan", "version": 1, x',
      r"plan file .*plan.json: not valid JSON "
      r"\(Expecting property name enclosed in double quotes at line 1 column 42\); expected a "
      r"moa_jax.plan file \(version 1\) as written by compress",
    ),
    ("[]", r"plan file .*: a plan file holds a JSON object, got list"),
    (
      '{"format": "moa_jax.plan", "version": 7}',
      r"unsupported plan version 7; this moa_jax "
      r"reads version 1",
    ),
    ('{"alphas": [], "betas": []}', r"not a moa_jax.plan file .*Plan.from_official_json"),
  ],
)
def test_bad_plan_files(text, match, tmp_path):
  _fails(
    validate.generate,
    "configs/generate.py:tiny",
    [f"plan={_plan_file(tmp_path, text)}"],
    None,
    match,
  )


def test_plan_schema_names_the_field(tmp_path):
  data = dense_plan(LlamaConfig.tiny()).to_dict()
  for field, value, match in [
    (
      "sink",
      "64",
      r"plan field 'sink' must be an integer >= 0, got "
      r"'64'",
    ),
    ("grouping", None, r"plan field 'grouping' must be one of"),
    ("kv_densities", {"long": 0.5}, r"must map lengths to numbers"),
  ]:
    broken = dict(data, **{field: value})
    _fails(
      validate.generate,
      "configs/generate.py:tiny",
      [f"plan={_plan_file(tmp_path, json.dumps(broken))}"],
      None,
      match,
    )
  del data["model"]["num_kv_heads"]
  _fails(
    validate.generate,
    "configs/generate.py:tiny",
    [f"plan={_plan_file(tmp_path, json.dumps(data))}"],
    None,
    r"plan field model.'num_kv_heads' is missing",
  )


def test_plan_for_another_model(tmp_path):
  reference = LlamaConfig.from_hf_dict(
    json.loads((reference_model_dir() / "config.json").read_text())
  )
  path = tmp_path / "plan.json"
  dense_plan(reference).save(path)
  _fails(
    validate.generate,
    "configs/generate.py:tiny",
    [f"plan={path}"],
    None,
    r"plan file .*plan.json: plan is for a model with \(layers, heads, kv_heads\) = "
    r"\(6, 8, 4\), but the model has \(2, 4, 2\)",
  )


# ------------------------------------------------------------------ calibration data


@pytest.mark.parametrize(
  "content, match",
  [
    (b'{"context": "a", "question": "b"}\n\n{"context": "a"\n', r"data.jsonl:3: not valid JSON"),
    (b'{"context": "a", "question": "b"}\n\xff\xfe\n', r"data.jsonl:2: not UTF-8 text"),
    (
      b'{"context": "a", "question": 3}\n',
      r"data.jsonl:1: a record needs string fields "
      r"'context', 'question'",
    ),
    (b"\n\n", r"calibration.path=.*data.jsonl.*has no records"),
    (
      b'{"context": "short", "question": "b"}\n',
      r"--config.calibration.lengths: no record of "
      r".*data.jsonl fills length 256",
    ),
  ],
)
def test_bad_calibration_jsonl(content, match, tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(content)
  _fails(validate.compress, COMPRESS, [f"calibration.path={path}"], tmp_path / "work", match)


def test_missing_calibration_file(tmp_path):
  _fails(
    validate.compress,
    COMPRESS,
    [f"calibration.path={tmp_path / 'none.jsonl'}"],
    tmp_path,
    r"none.jsonl not found: expected a JSONL file",
    FileNotFoundError,
  )


# ------------------------------------------------------------------------------ workdir


def test_workdir_must_be_a_writable_directory(tmp_path):
  (tmp_path / "file").write_text("x")
  _fails(validate.compress, COMPRESS, [], tmp_path / "file", r"--workdir=.*file is a file")
  _fails(
    validate.compress,
    COMPRESS,
    [],
    tmp_path / "file" / "sub",
    r"--workdir=.*file/sub is not writable \(Not a directory\)",
  )
  _fails(validate.compress, COMPRESS, [], None, r"compress needs --workdir=DIR")


def test_demo_eval_section(tmp_path):
  _fails(
    validate.demo,
    "configs/demo.py:tiny",
    ["eval.tasks=('lines', 'poetry')"],
    tmp_path,
    r"eval.tasks=\('lines', 'poetry'\): unknown task 'poetry'",
  )
  _fails(
    validate.demo,
    "configs/demo.py:tiny",
    ["eval.lengths=(64, 256)"],
    tmp_path,
    r"eval.lengths=64 with optimize.density=0.5 and optimize.sink=64: a uniform plan needs",
  )
  _fails(
    validate.demo,
    "configs/demo.py:tiny",
    ["eval.lengths=(100, 256)", "optimize.sink=0", "optimize.density=0.7"],
    tmp_path,
    r"eval.lengths=\(100, 256\): cannot size task 'lines' to 100 tokens",
  )


# ----------------------------------------------------------------- end to end, one line each


def test_truncated_checkpoint_for_generate_is_one_line(tmp_path):
  directory = tmp_path / "model"
  shutil.copytree(reference_model_dir(), directory)
  weights = directory / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  result = _cli("generate", "--config=configs/generate.py", f"--config.model.path={directory}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: {weights} is not a readable safetensors file (truncated or corrupt?): Error "
    "while deserializing header: incomplete metadata, file not fully covered"
  )
  assert "Traceback" not in result.stderr


def test_malformed_plan_for_generate_is_one_line(tmp_path):
  plan = _plan_file(tmp_path, '{"format": "moa_jax.plan", "version": 1, "sink": }')
  result = _cli("generate", "--config=configs/generate.py:tiny", f"--config.plan={plan}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: plan file {plan}: not valid JSON (Expecting value at line 1 column 50); expected "
    "a moa_jax.plan file (version 1) as written by compress"
  )


def test_density_above_one_is_rejected_before_any_stage(tmp_path):
  start = time.perf_counter()
  result = _cli(
    "compress",
    "--config=configs/compress.py:tiny",
    f"--workdir={tmp_path}",
    "--config.optimize.density=1.7",
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    "error: --config.optimize.density=1.7 is invalid: expected a finite number in (0, 1] (a KV "
    "density: cached tokens / length; a window is clipped to the length, so 1 is dense)"
  )
  assert "[moa_jax]" not in result.stdout and list(tmp_path.iterdir()) == []
  assert time.perf_counter() - start < 120


# ----------------------------------------------------------------- eval, sweep and convert


def test_eval_checks(tmp_path):
  config = _config("configs/eval.py:tiny")
  reference = LlamaConfig.from_hf_dict(
    json.loads((reference_model_dir() / "config.json").read_text())
  )
  dense_plan(reference).save(tmp_path / "other.json")
  _fails(
    validate.eval,
    "configs/eval.py:tiny",
    [f"eval.plans=moa={tmp_path / 'other.json'}"],
    tmp_path / "work",
    r"other.json: plan is for a model with \(layers, heads, kv_heads\)",
  )
  _fails(
    validate.eval,
    "configs/eval.py:tiny",
    ["eval.lengths=(64, 256)"],
    tmp_path / "work",
    r"eval.lengths=64 with eval.density=0.5 and eval.sink=16: a uniform plan",
  )
  _fails(
    validate.eval,
    "configs/eval.py:tiny",
    ["eval.tasks=('longbench/qasper',)", f"eval.longbench.data_dir={tmp_path / 'none'}"],
    tmp_path / "work",
    r"longbench/qasper: cannot load LongBench qasper from .*none",
    FileNotFoundError,
  )
  assert validate.eval(config, tmp_path / "work").checkpoint is None


def test_sweep_checks_every_point(tmp_path):
  from moa_jax.sweep import hyper

  config = _config("configs/sweep.py:tiny")
  config.sweep = hyper.sweep("config.optimize.density", (0.5, 0.3))
  with pytest.raises(
    ValueError,
    match=r"sweep point density=0.3: --config.optimize.density=0.3 "
    r"is infeasible .* budgets in \[0.5000, 1.0000\]",
  ) as error:
    validate.sweep(config, tmp_path)
  _one_line(error)
  _fails(
    validate.sweep,
    "configs/sweep.py:tiny",
    ["launcher=slurm", "slurm.extra=oops"],
    tmp_path,
    r"slurm.extra entry 'oops' is not key=value",
  )
  assert len(validate.sweep(_config("configs/sweep.py:tiny"), tmp_path)) == 3


def test_convert_checks(tmp_path):
  _config("configs/convert.py", ["gguf=x.gguf"])
  garbled = tmp_path / "model.gguf"
  garbled.write_bytes(b"GGUF\x03\x00\x00\x00\xff")
  _fails(
    validate.convert,
    "configs/convert.py",
    [f"gguf={garbled}"],
    tmp_path / "out",
    r"model.gguf is not a readable GGUF file",
  )
  _fails(
    validate.convert,
    "configs/convert.py",
    ["gguf=model.safetensors"],
    tmp_path / "out",
    r"--config.gguf='model.safetensors' is invalid: expected a .gguf file or one of",
  )
  _fails(
    validate.convert,
    "configs/convert.py",
    [f"gguf={garbled}", "dtype=float8"],
    tmp_path / "out",
    r"--config.dtype='float8' is invalid",
  )
  from moa_jax.models.loading import packaged_model_file

  try:
    packaged_model_file("smollm2-135m-instruct")
  except FileNotFoundError as error:
    pytest.skip(str(error))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  _fails(
    validate.convert,
    "configs/convert.py",
    ["gguf=smollm2-135m-instruct"],
    tmp_path / "full",
    r"--workdir=.*full already exists and is not an empty directory",
  )
