"""Resumable, atomic pipeline stages in a work directory.

A stage writes its outputs into a hidden temporary folder and, once everything is written,
renames it to `DIR/<stage>/` with a `COMPLETE.json` holding the fingerprint of its inputs. A stage
whose folder is complete with the same fingerprint is skipped; a run killed mid-stage leaves only
a temporary folder, which the next run discards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

COMPLETE = "COMPLETE.json"


def digest(*parts: Any) -> str:
  """The sha256 hex digest of JSON-serialisable parts (sorted keys)."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-serialisable parts (the first 16 hex digits of `digest`)."""
  return digest(*parts)[:16]


def file_digest(path: str | os.PathLike) -> str:
  """The sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
  hasher = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      hasher.update(chunk)
  return hasher.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
  """Call `write(f)` on a temporary file beside `path`, then rename it over `path`: readers see
  the old or the new content, never a partial one (also when the process is killed)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Write a text file atomically (see `atomic_write`)."""
  atomic_write(path, lambda f: f.write(text.encode()))


class Workdir:
  """Stages of one pipeline run under `root`."""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)
    self.root.mkdir(parents=True, exist_ok=True)
    for stale in self.root.glob(".*.partial-*"):
      shutil.rmtree(stale, ignore_errors=True)

  def path(self, stage: str) -> Path:
    return self.root / stage

  def is_complete(self, stage: str, key: str) -> bool:
    marker = self.path(stage) / COMPLETE
    if not marker.exists():
      return False
    return json.loads(marker.read_text()).get("fingerprint") == key

  @contextlib.contextmanager
  def stage(self, stage: str, key: str, info: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder for the stage's outputs; publish it on success."""
    tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{stage}.partial-"))
    try:
      yield tmp
      (tmp / COMPLETE).write_text(json.dumps({"fingerprint": key, **(info or {})}, indent=1))
      final = self.path(stage)
      if final.exists():
        shutil.rmtree(final)
      os.rename(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
