"""The CLI: `python -m moa_jax generate --config=configs/generate.py:tiny`, locked configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moa_jax.__main__ import COMMANDS
from moa_jax.cli import UsageError, load_config, parse_command_line
from moa_jax.generate import generate_command

REPO = Path(__file__).resolve().parents[1]
GENERATE_FIELDS = ("dtype, max_new_tokens, model_path, model_preset, prompts, "
                   "random_prompt_lengths, seed, temperature, top_k")


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "moa_jax", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
def test_generate_command_end_to_end(tmp_path):
  result = run_cli("generate", "--config=configs/generate.py:tiny",
                   "--config.max_new_tokens=4", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  generated = json.loads((tmp_path / "generated.json").read_text())
  assert [len(g["prompt_ids"]) for g in generated] == [5, 12, 9]
  assert all(len(g["new_ids"]) <= 4 for g in generated)
  assert f"[2] 9 prompt tokens -> {len(generated[2]['new_ids'])} new: " in result.stdout
  # Same config in-process: same tokens.
  config = load_config("configs/generate.py:tiny", ["max_new_tokens=4"])
  assert [g["new_ids"] for g in generate_command(config, None)] == \
      [g["new_ids"] for g in generated]


def test_misspelt_override_fails_with_one_line_listing_valid_names():
  result = run_cli("generate", "--config=configs/generate.py:tiny", "--config.max_new_tokns=3")
  assert result.returncode == 1
  assert result.stderr == (f"error: unknown config field --config.max_new_tokns; valid names: "
                           f"{GENERATE_FIELDS}\n")


@pytest.mark.parametrize("args, message", [
    (["generat", "--config=configs/generate.py"], r"expected one command \(generate, compress, demo\), got 'generat'"),
    (["generate"], "--config is required"),
    (["generate", "--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (["generate", "--config=configs/generate.py:big"], "takes 'tiny' or 'hf', got 'big'"),
    (["generate", "--config=configs/generate.py", "--config.sampling.top_k=3"],
     f"unknown config field --config.sampling.top_k; valid names: {GENERATE_FIELDS}"),
    (["generate", "--config=configs/generate.py", "--config.top_k=many"],
     "flag --config.top_k=many: invalid literal for int"),
    (["generate", "--config=configs/generate.py", "--workdr=x"], "Unknown command line flag 'workdr'"),
])
def test_usage_errors_are_one_line(args, message, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(UsageError, match=message) as info:
    parse_command_line(["moa_jax", *args], COMMANDS)
  assert "\n" not in str(info.value)


def test_overrides_and_workdir(monkeypatch):
  monkeypatch.chdir(REPO)
  command, config, workdir = parse_command_line(
      ["moa_jax", "generate", "--config=configs/generate.py:hf", "--config.model_path=/ckpt",
       "--config.prompts=('a', 'b')", "--config.temperature=0.5", "--workdir=runs/x"], COMMANDS)
  assert (command, workdir) == ("generate", Path("runs/x"))
  assert (config.model_path, config.prompts, config.temperature) == ("/ckpt", ("a", "b"), 0.5)
  assert load_config("configs/generate.py:hf").model_path is None  # a required placeholder
  with pytest.raises(ValueError, match="needs --config.model_path="):
    generate_command(load_config("configs/generate.py:hf"), None)


def test_generate_command_with_checkpoint_and_tokenizer(tiny_checkpoint, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  config = load_config("configs/generate.py:hf", [
      f"model_path={tiny_checkpoint}", "max_new_tokens=3",
      "prompts=('sparse attention', 'long contexts for')"])
  results = generate_command(config, tmp_path)
  assert [r["prompt_ids"] for r in results] == [[3, 4], [6, 7, 5]]
  assert json.loads((tmp_path / "generated.json").read_text()) == results
  for r in results:
    assert 1 <= len(r["new_ids"]) <= 3
    assert isinstance(r["text"], str)
