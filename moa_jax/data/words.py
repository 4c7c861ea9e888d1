"""The in-repo adjective and noun lists that name LongEval lines and needle keys."""

from __future__ import annotations

import functools
import pathlib

_WORDS_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "words"


@functools.cache
def _read(name: str) -> tuple[str, ...]:
  path = _WORDS_DIR / name
  if not path.is_file():
    raise FileNotFoundError(f"word list {path} is missing; reinstall moa_jax")
  words = tuple(sorted(set(path.read_text("utf-8").split())))
  if not words:
    raise ValueError(f"word list {path} is empty; reinstall moa_jax")
  return words


def adjectives() -> tuple[str, ...]:
  """Sorted, unique lowercase adjectives."""
  return _read("adjectives.txt")


def nouns() -> tuple[str, ...]:
  """Sorted, unique lowercase nouns."""
  return _read("nouns.txt")


def num_keys() -> int:
  """How many distinct `adjective-noun` keys exist."""
  return len(adjectives()) * len(nouns())


def key(index: int) -> str:
  """The `adjective-noun` key number `index` in [0, num_keys())."""
  adjs, nns = adjectives(), nouns()
  if not 0 <= index < len(adjs) * len(nns):
    raise ValueError(f"key index {index} outside [0, {len(adjs) * len(nns)})")
  return f"{adjs[index // len(nns)]}-{nns[index % len(nns)]}"
