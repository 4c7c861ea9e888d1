"""Fuzz of the CLI: random and boundary values for every field of every command's configs,
generated from the locked ConfigDicts themselves (a new field is fuzzed without a change here).
A case either passes validation and reaches the command's work, or ends in one line starting
'error:'; anything else (a traceback) fails the test. The cases run in-process through
`moa_jax.__main__.main` with the work stubbed out; a few processes check the same end to end,
and that MOA_DEBUG=1 gives the traceback instead."""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moa_jax import __main__ as cli_main
from moa_jax.cli import field_names, load_config

REPO = Path(__file__).resolve().parents[1]
SEED = 20261202
# command -> (config specs with the overrides every case of them starts from, extra
# single-field cases, multi-field cases, fields always fuzzed once each: a prefix, '' for all).
REFERENCE = str(REPO / "moa_jax/assets/reference_model")
PLAN = {
  "compress": ([("configs/compress.py:tiny", [])], 30, 15, ""),
  "demo": ([("configs/demo.py:tiny", [])], 10, 5, "eval."),
  "generate": (
    [("configs/generate.py:tiny", []), ("configs/generate.py:hf", [f"model.path={REFERENCE}"])],
    20,
    10,
    "",
  ),
  "eval": ([("configs/eval.py:tiny", [])], 20, 10, "eval."),
  "sweep": ([("configs/sweep.py:tiny", [])], 15, 5, "slurm."),
  "convert": ([("configs/convert.py", ["gguf=smollm2-135m-instruct"])], 6, 4, ""),
  "plan-memory": ([("configs/memory.py:tiny", [])], 15, 5, ""),
}
# command -> (module, function) of its work, stubbed out after validation.
WORK = {
  "compress": ("moa_jax.pipeline", "compress"),
  "demo": ("moa_jax.demo", "run"),
  "generate": ("moa_jax.models.loading", "load_model"),
  "eval": ("moa_jax.eval.command", "run_eval"),
  "sweep": ("moa_jax.sweep.command", "run_sweep"),
  "convert": ("moa_jax.models.convert", "convert_gguf"),
  "plan-memory": ("moa_jax.memory", "plan_memory"),
}
RUN_FOR_REAL = 2  # accepted generate cases that then run the real command


class Accepted(Exception):
  """The command passed validation and reached its work."""


@pytest.fixture
def files(tmp_path_factory):
  """Paths a string field may be fuzzed with: missing, garbled, empty, a directory."""
  root = tmp_path_factory.mktemp("fuzz_files")
  (root / "garbled.json").write_text('{"format": "moa_jax.plan", ')
  (root / "garbled.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\xff")
  (root / "empty.jsonl").write_text("")
  (root / "dir").mkdir()
  return root


def _values(default, rng: np.random.Generator, files: Path) -> list[str]:
  """Command-line values for a field whose default is `default`: boundaries, wrong types and
  random draws."""
  if isinstance(default, bool):
    return ["true", "false", "0", "maybe"]
  if isinstance(default, int):
    return [
      "0",
      "-1",
      "1",
      str(default + 1),
      str(2**31),
      str(-(2**40)),
      "1.5",
      "x",
      str(int(rng.integers(2, 10**6))),
    ]
  if isinstance(default, float):
    return [
      "0.0",
      "-0.0",
      "-1.0",
      "1e-12",
      "1.0",
      "1.7",
      "1e308",
      "nan",
      "inf",
      "-inf",
      "x",
      repr(float(rng.uniform(0, 2))),
    ]
  if isinstance(default, tuple):
    element = default[0] if default else 0
    if isinstance(element, str):
      return ["()", "('',)", "('x',)", repr(default + default), "(1,)"]
    if isinstance(element, float):
      return [
        "()",
        "(-0.5,)",
        "(0.0,)",
        "(2.0,)",
        "(0.5, 0.5)",
        "('a',)",
        repr(tuple(float(b) for b in np.sort(rng.uniform(0, 1, 3)).round(3))),
      ]
    drawn = np.sort(rng.integers(1, 2048, size=int(rng.integers(1, 4))))
    return [
      "()",
      "(0,)",
      "(-1,)",
      "(1,)",
      "(2147483648,)",
      "(256, 256)",
      "(512, 256)",
      "('a',)",
      "(0.5,)",
      repr(tuple(int(n) for n in drawn)),
    ]
  letters = list("abcxyz019 _.-é✓")
  random_text = "".join(rng.choice(letters, size=int(rng.integers(1, 12))))
  return [
    default or "",
    " ",
    "x",
    "/nonexistent/file.json",
    str(files / "garbled.json"),
    str(files / "garbled.gguf"),
    str(files / "empty.jsonl"),
    str(files / "dir"),
    "configs/compress.py",
    random_text,
  ]


def _cases(command: str, files: Path) -> list[tuple[str, list[str]]]:
  """(config spec, overrides) for one command, drawn with the fixed seed."""
  specs, extra, multi, always = PLAN[command]
  rng = np.random.default_rng([SEED, len(command)])
  cases = []
  for spec, base in specs:
    config = load_config(spec)
    names = field_names(config)
    pool = {}
    for name in names:
      default = config
      for part in name.split("."):
        default = default[part]
      pool[name] = [f"{name}={value}" for value in _values(default, rng, files)]
    pairs = [(name, value) for name in names for value in pool[name]]
    for name in names:
      if name.startswith(always):
        cases.append((spec, [*base, pool[name][int(rng.integers(len(pool[name])))]]))
    for i in rng.choice(len(pairs), size=min(extra, len(pairs)), replace=False):
      cases.append((spec, [*base, pairs[i][1]]))
    for _ in range(multi):
      chosen = rng.choice(len(pairs), size=3, replace=False)
      cases.append((spec, [*base, *(pairs[i][1] for i in chosen)]))
  return cases


def _outcome(argv: list[str]) -> str | None:
  """None if the command reached its work, else its one error line; any other exception
  propagates (a traceback is a failure of this test)."""
  try:
    cli_main.main(argv)
  except Accepted:
    return None
  except SystemExit as exit:
    message = exit.code
    assert isinstance(message, str), f"{argv}: exit code {message!r} without a message"
    assert message.startswith("error: ") and "\n" not in message, f"{argv}: {message!r}"
    return message
  raise AssertionError(f"{argv}: main returned without running the command")


@pytest.mark.parametrize("command", list(PLAN))
def test_fuzz_every_field_in_process(command, files, tmp_path, monkeypatch):
  if command not in cli_main.COMMANDS:
    pytest.skip(f"no {command} command in this checkout")
  if command == "convert":
    from moa_jax.models.loading import packaged_model_file

    try:
      packaged_model_file("smollm2-135m-instruct")
    except FileNotFoundError as error:
      pytest.skip(str(error))

  def stop(*args, **kwargs):
    raise Accepted

  module, function = WORK[command]
  monkeypatch.setattr(importlib.import_module(module), function, stop)
  if importlib.util.find_spec("moa_jax.distributed"):  # multi-process set-up, not validation
    monkeypatch.setattr(
      importlib.import_module("moa_jax.distributed"), "initialize", lambda config=None: False
    )
  monkeypatch.setattr(sys, "argv", ["moa_jax", command])
  monkeypatch.delenv("MOA_DEBUG", raising=False)
  accepted, outcomes = [], set()
  for i, (spec, overrides) in enumerate(_cases(command, files)):
    argv = [
      "moa_jax",
      command,
      f"--config={spec}",
      f"--workdir={tmp_path / str(i)}",
      *(f"--config.{o}" for o in overrides),
    ]
    outcome = _outcome(argv)
    outcomes.add(outcome)
    if outcome is None:
      accepted.append((spec, overrides))
  assert None in outcomes and len(outcomes) > 3  # both kinds happen, different errors
  if command == "generate":
    monkeypatch.undo()
    from moa_jax.generate import generate_command

    runnable = [(s, o) for s, o in accepted if s.endswith(":tiny")]
    for spec, overrides in runnable[:RUN_FOR_REAL]:
      config = load_config(spec, [*overrides, "max_new_tokens=2"])
      assert len(generate_command(config, None)) == len(config.prompts)


def _process(args, debug=False):
  env = (
    dict(os.environ, MOA_DEBUG="1")
    if debug
    else {k: v for k, v in os.environ.items() if k != "MOA_DEBUG"}
  )
  return subprocess.run(
    [sys.executable, "-m", "moa_jax", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "args",
  [
    ["generate", "--config=configs/generate.py:tiny", "--config.top_k=-3"],
    ["demo", "--config=configs/demo.py:tiny", "--config.eval.lengths=()"],
    ["compress", "--config=configs/compress.py:tiny", "--config.profile.lengths=(300,)"],
  ],
)
def test_rejected_values_end_to_end_are_one_error_line(args, tmp_path):
  result = _process([*args, f"--workdir={tmp_path}"])
  assert result.returncode == 1
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --config."), result.stderr


def test_moa_debug_gives_the_traceback(tmp_path):
  result = _process(
    ["generate", "--config=configs/generate.py:tiny", "--config.top_k=-3", f"--workdir={tmp_path}"],
    debug=True,
  )
  assert result.returncode == 1
  assert "Traceback (most recent call last)" in result.stderr
  assert "ValueError: --config.top_k=-3 is invalid" in result.stderr
