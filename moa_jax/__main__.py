"""`python -m moa_jax <command> --config=configs/<file>.py[:arg] [--config.key=value ...]
[--workdir=DIR]`.

Thin entry point: parse the command line, import the command's library function lazily and call
it with (config, workdir).
"""

import importlib
import os
import sys

from moa_jax.cli import USAGE, UsageError, parse_command_line

# transformers' notice that PyTorch is missing would be a second stderr line; moa_jax needs none.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# command -> "module:function"; each function takes (config: ConfigDict, workdir: Path | None).
COMMANDS = {
  "generate": "moa_jax.generate:generate_command",
  "compress": "moa_jax.pipeline:compress_command",
  "demo": "moa_jax.demo:demo_command",
  "sweep": "moa_jax.sweep.command:sweep_command",
  "eval": "moa_jax.eval.command:eval_command",
  "convert": "moa_jax.models.convert:convert_command",
  "plan-memory": "moa_jax.memory:plan_memory_command",
}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(f"{USAGE}\ncommands: {', '.join(COMMANDS)}")
    return
  try:
    command, config, workdir = parse_command_line(argv, COMMANDS)
  except UsageError as error:
    sys.exit(f"error: {error}")
  module, function = COMMANDS[command].split(":")
  try:
    importlib.import_module("moa_jax.distributed").initialize(config)  # one of several processes?
    getattr(importlib.import_module(module), function)(config, workdir)
  except (ValueError, OSError) as error:  # bad input, full disk: one line (MOA_DEBUG=1: traceback)
    if os.environ.get("MOA_DEBUG"):
      raise
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
