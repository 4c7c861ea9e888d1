"""Resumable, atomic pipeline stages in a work directory, and atomic file writes.

A stage writes its outputs into a hidden temporary folder and, once everything is written,
renames it to `DIR/<stage>/` with a `COMPLETE.json` holding the fingerprint of its inputs and the
size of every file it wrote. A stage whose folder is complete with the same fingerprint (and
files of those sizes) is skipped; a run killed mid-stage leaves only a temporary folder, which
the next run discards (temporary names carry their writer's pid@host: only a writer that is
gone loses them, so runs sharing a workdir, as sweep points do, do not remove each other's).
Single files are written to a temporary name and renamed (`atomic_write`, `atomic_path`), so
a reader sees the old or the new file, never a half-written one. A full disk
(ENOSPC, EDQUOT, or EFBIG past a file-size limit) is one `DiskFullError` line; earlier results
stay as they were.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

COMPLETE = "COMPLETE.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname()


class DiskFullError(OSError):
  """A write ran out of disk space (or past the file-size limit); one line, nothing replaced."""


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


def _disk_full(error: BaseException, what: str) -> DiskFullError | None:
  """The one-line DiskFullError for an OSError of a full disk, else None."""
  if isinstance(error, DiskFullError):
    return error
  if not isinstance(error, OSError) or error.errno not in DISK_FULL:
    return None
  full = DiskFullError(
    f"{os.strerror(error.errno)} while writing {what}; earlier results are "
    "intact: free space (or raise the file-size limit) and run again"
  )
  full.errno = error.errno
  return full


def _partial_prefix(name: str) -> str:
  """The name start of a temporary file or folder for `name`: hidden, and naming its writer
  (pid@host), so that a cleanup removes only what a process that is gone left behind."""
  return f".{name}.partial-{os.getpid()}@{_HOST}~"


def _abandoned(path: Path) -> bool:
  """True for a temporary file or folder whose writer has ended (one of another host is kept)."""
  owner = path.name.split(".partial-", 1)[1]
  if "~" not in owner:  # the old unmarked names
    return True
  pid, _, host = owner.split("~", 1)[0].partition("@")
  if host != _HOST or not pid.isdigit():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yield a temporary path beside `path` to write (by any library); when the block succeeds it
  is synced and renamed over `path`, otherwise removed. Readers never see a partial file."""
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_partial_prefix(path.name))
  except OSError as error:
    raise _disk_full(error, str(path)) or error from None
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)  # as a plain open() would create it (mkstemp makes it 0600)
    yield Path(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException as error:
    Path(tmp).unlink(missing_ok=True)
    if full := _disk_full(error, str(path)):
      raise full from None
    raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
  """Call `write(f)` on a temporary file beside `path`, then rename it over `path`: readers see
  the old or the new content, never a partial one (also when the process is killed)."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Write a text file atomically (see `atomic_write`)."""
  atomic_write(path, lambda f: f.write(text.encode()))


def _file_sizes(folder: Path) -> dict[str, int]:
  return {
    str(p.relative_to(folder)): p.stat().st_size
    for p in sorted(folder.rglob("*"))
    if p.is_file() and p.name != COMPLETE
  }


class Workdir:
  """Stages of one pipeline run under `root`."""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)
    self.root.mkdir(parents=True, exist_ok=True)
    for stale in self.root.glob(".*.partial-*"):
      if _abandoned(stale):
        if stale.is_dir():
          shutil.rmtree(stale, ignore_errors=True)
        else:
          stale.unlink(missing_ok=True)

  def path(self, stage: str) -> Path:
    return self.root / stage

  def is_complete(self, stage: str, key: str) -> bool:
    """True if the stage's folder was published for `key` and its files are all there whole."""
    marker = self.path(stage) / COMPLETE
    try:
      info = json.loads(marker.read_text())
    except (OSError, ValueError):  # missing, unreadable or garbled: not complete
      return False
    if not isinstance(info, dict) or info.get("fingerprint") != key:
      return False
    files = info.get("files")
    return files is None or _file_sizes(self.path(stage)) == files

  @contextlib.contextmanager
  def stage(self, stage: str, key: str, info: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder for the stage's outputs; publish it on success.

    The old folder is first renamed out of the way (a temporary name the next run discards), so
    a kill at any point leaves the old stage, no stage, or the new one, never a mix.
    """
    try:
      tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=_partial_prefix(stage)))
    except OSError as error:
      raise _disk_full(error, f"stage {stage} in {self.root}") or error from None
    try:
      yield tmp
      marker = {"fingerprint": key, **(info or {}), "files": _file_sizes(tmp)}
      atomic_write_text(tmp / COMPLETE, json.dumps(marker, indent=1))
      final = self.path(stage)
      if final.exists():
        old = Path(tempfile.mkdtemp(dir=self.root, prefix=_partial_prefix(f"{stage}-old")))
        os.replace(final, old / stage)
        shutil.rmtree(old, ignore_errors=True)
      os.rename(tmp, final)
    except BaseException as error:
      shutil.rmtree(tmp, ignore_errors=True)
      if full := _disk_full(error, f"stage {stage} in {self.root}"):
        raise full from None
      raise
