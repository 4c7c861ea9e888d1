"""The CLI: `python -m moa_jax generate --config=configs/generate.py:tiny`, locked configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moa_jax.__main__ import COMMANDS
from moa_jax.cli import UsageError, load_config, parse_command_line
from moa_jax.data import tasks
from moa_jax.generate import generate_command
from moa_jax.models.loading import load_model
from moa_jax.plans.plan import dense_plan, uniform_plan

REPO = Path(__file__).resolve().parents[1]
GENERATE_FIELDS = (
  "chat, max_new_tokens, mesh.coordinator, mesh.distributed, mesh.num_processes, "
  "mesh.process_id, mesh.shape, model.dtype, model.path, model.preset, "
  "model.seed, model.tokenizer, plan, prompts, seed, temperature, top_k"
)


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "moa_jax", *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


@pytest.mark.slow
def test_generate_command_end_to_end(tmp_path):
  result = run_cli(
    "generate",
    "--config=configs/generate.py:tiny",
    "--config.max_new_tokens=4",
    f"--workdir={tmp_path}",
  )
  assert result.returncode == 0, result.stderr
  generated = json.loads((tmp_path / "generated.json").read_text())
  config = load_config("configs/generate.py:tiny", ["max_new_tokens=4"])
  assert [g["prompt"] for g in generated] == list(config.prompts)
  assert all(1 <= len(g["new_ids"]) <= 4 for g in generated)
  n = len(generated[2]["prompt_ids"])
  assert f"[2] {n} prompt tokens -> {len(generated[2]['new_ids'])} new: " in result.stdout
  # Same config in-process: same tokens.
  assert [g["new_ids"] for g in generate_command(config, None)] == [g["new_ids"] for g in generated]


def test_misspelt_override_fails_with_one_line_listing_valid_names():
  result = run_cli("generate", "--config=configs/generate.py:tiny", "--config.max_new_tokns=3")
  assert result.returncode == 1
  assert result.stderr == (
    f"error: unknown config field --config.max_new_tokns; valid names: {GENERATE_FIELDS}\n"
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["generat", "--config=configs/generate.py"],
      r"expected one command \(generate, compress, demo.*\), got 'generat'",
    ),
    (["generate"], "--config is required"),
    (["generate", "--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (
      ["generate", "--config=configs/generate.py:big"],
      "takes one of reference, tiny, hf, got 'big'",
    ),
    (
      ["generate", "--config=configs/generate.py", "--config.sampling.top_k=3"],
      f"unknown config field --config.sampling.top_k; valid names: {GENERATE_FIELDS}",
    ),
    (
      ["generate", "--config=configs/generate.py", "--config.top_k=many"],
      "flag --config.top_k=many: invalid literal for int",
    ),
    (
      ["generate", "--config=configs/generate.py", "--workdr=x"],
      "Unknown command line flag 'workdr'",
    ),
  ],
)
def test_usage_errors_are_one_line(args, message, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(UsageError, match=message) as info:
    parse_command_line(["moa_jax", *args], COMMANDS)
  assert "\n" not in str(info.value)


def test_overrides_and_workdir(monkeypatch):
  monkeypatch.chdir(REPO)
  command, config, workdir = parse_command_line(
    [
      "moa_jax",
      "generate",
      "--config=configs/generate.py:hf",
      "--config.model.path=/ckpt",
      "--config.prompts=('a', 'b')",
      "--config.temperature=0.5",
      "--workdir=runs/x",
    ],
    COMMANDS,
  )
  assert (command, workdir) == ("generate", Path("runs/x"))
  assert (config.model.path, config.prompts, config.temperature) == ("/ckpt", ("a", "b"), 0.5)
  assert load_config("configs/generate.py:hf").model.path is None  # a required placeholder
  with pytest.raises(ValueError, match="needs --config.model.path="):
    generate_command(load_config("configs/generate.py:hf"), None)


def test_generate_command_with_checkpoint_and_tokenizer(tiny_checkpoint, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  config = load_config(
    "configs/generate.py:hf",
    [
      f"model.path={tiny_checkpoint}",
      "max_new_tokens=3",
      "prompts=('sparse attention', 'long contexts for')",
    ],
  )
  results = generate_command(config, tmp_path)
  assert [r["prompt_ids"] for r in results] == [[3, 4], [6, 7, 5]]
  assert json.loads((tmp_path / "generated.json").read_text()) == results
  for r in results:
    assert 1 <= len(r["new_ids"]) <= 3
    assert isinstance(r["text"], str)


def test_generate_command_with_a_plan(tmp_path, monkeypatch):
  """A plan's MoA attention and cache through the CLI path, on the reference model: a dense plan
  gives the dense tokens; a 64-token window loses a line-retrieval needle near the start."""
  monkeypatch.chdir(REPO)
  config = load_config("configs/generate.py", ["max_new_tokens=8", "chat=True"])
  model, tokenizer, _ = load_model(config.model)
  sample = tasks.make_samples("lines", tokenizer, 768, 1, seed=5, depths=[0.1])[0]
  dense_plan(model.config).save(tmp_path / "dense.json")
  uniform_plan(model.config, 0.128, 1000, sink=64).save(tmp_path / "short.json")
  overrides = ["max_new_tokens=8", "chat=True", f"prompts=({sample.prompt!r},)"]
  run = lambda *extra: generate_command(
    load_config("configs/generate.py", [*overrides, *extra]), None
  )[0]["text"].split("\n")[0]
  dense = run()
  assert sample.answer in dense
  assert run(f"plan={tmp_path / 'dense.json'}") == dense
  assert sample.answer not in run(f"plan={tmp_path / 'short.json'}")
