"""Command-line parsing: `<command> --config=configs/<file>.py[:arg] [--config.key=value ...]`.

Configs are ml_collections files with `get_config(arg)`, loaded through absl's config_flags and
locked, so a misspelt override is an error that lists the valid field names. Every problem is
reported as one `UsageError` line.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from absl import flags
from ml_collections import ConfigDict, config_flags

USAGE = (
  "usage: python -m moa_jax <command> --config=configs/<file>.py[:arg] "
  "[--config.key=value ...] [--workdir=DIR]"
)


class UsageError(ValueError):
  """A one-line command-line error."""


def field_names(config: ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of every leaf field of a (nested) ConfigDict."""
  names = []
  for key, value in config.items():
    if isinstance(value, ConfigDict):
      names.extend(field_names(value, f"{prefix}{key}."))
    else:
      names.append(f"{prefix}{key}")
  return names


def _last_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def _importable_config_package(spec: str | None) -> None:
  """Let a config file import its own package (`from configs import common`): put the folder
  that holds the config file's package on sys.path, wherever the command runs from."""
  if not spec:
    return
  folder = Path(spec.split(":", 1)[0]).resolve().parent
  if (folder / "__init__.py").is_file() and str(folder.parent) not in sys.path:
    sys.path.insert(0, str(folder.parent))


def _parse_flags(argv: Sequence[str]) -> tuple[list[str], ConfigDict | None, str | None]:
  """absl-parse argv with a fresh flag registry -> (positional args, config, workdir)."""
  _importable_config_package(_config_spec(argv))
  registry = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
    "config",
    None,
    "ml_collections config file[:arg]",
    flag_values=registry,
    lock_config=True,
    sys_argv=list(argv),
  )
  workdir_flag = flags.DEFINE_string("workdir", None, "directory for outputs", flag_values=registry)
  with warnings.catch_warnings():
    # ml_collections 1.1 loads config files with importlib's deprecated load_module(); only this.
    warnings.filterwarnings(
      "ignore", r"the load_module\(\) method is deprecated", DeprecationWarning
    )
    positional = registry(list(argv))
  config = config_flag.value
  if config is not None and not isinstance(config, ConfigDict):
    try:
      config.lock()  # a config file that failed to load raises its IOError on any access
    except OSError as error:
      raise UsageError(
        _last_line(error).replace(
          "Configuration is not available because of an earlier failure to load: ", ""
        )
      ) from None
  return positional[1:], config, workdir_flag.value


def _config_spec(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_command_line(
  argv: Sequence[str], commands: Iterable[str]
) -> tuple[str, ConfigDict, Path | None]:
  """['prog', command, flags...] -> (command, locked config, workdir or None).

  Raises UsageError (one line) for a missing/unknown command, a missing or unloadable config,
  an unknown flag, a misspelt override (listing the valid names) or a badly typed value.
  """
  commands = list(commands)
  try:
    positional, config, workdir = _parse_flags(argv)
  except (AttributeError, KeyError) as error:  # a locked config has no such field
    valid = field_names(_parse_flags([argv[0], f"--config={_config_spec(argv)}"])[1])
    overrides = [
      a.split("=", 1)[0].removeprefix("--config.") for a in argv if a.startswith("--config.")
    ]
    unknown = next((name for name in overrides if name not in valid), None)
    if unknown is None:
      raise UsageError(_last_line(error)) from None
    raise UsageError(
      f"unknown config field --config.{unknown}; valid names: {', '.join(valid)}"
    ) from None
  except (flags.Error, TypeError, ValueError) as error:
    raise UsageError(_last_line(error)) from None
  if len(positional) != 1 or positional[0] not in commands:
    got = " ".join(positional) or "no command"
    raise UsageError(f"expected one command ({', '.join(commands)}), got {got!r}; {USAGE}")
  if config is None:
    raise UsageError(f"--config is required; {USAGE}")
  return positional[0], config, None if workdir is None else Path(workdir)


def load_config(spec: str, overrides: Iterable[str] = ()) -> ConfigDict:
  """The locked config `spec` ('configs/x.py[:arg]') with overrides like 'max_new_tokens=4'."""
  argv = ["moa_jax", "load", f"--config={spec}", *(f"--config.{o}" for o in overrides)]
  return parse_command_line(argv, ["load"])[1]
