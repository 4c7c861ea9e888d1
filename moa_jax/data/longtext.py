"""Long natural text for perplexity: the largest source files of the running Python's stdlib.

Every machine that runs moa_jax has these files, so the task needs no download and is the same
wherever the Python version is the same (`provenance` records the version, the files and their
SHA-256). A document is one module's source; test suites are left out. The scored window of a
document at length n is its last n tokens: BOS (when the tokenizer has one), the context, and
the last `target_tokens` tokens, whose cross-entropy given everything before them is the score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any

SKIPPED_DIRS = frozenset(
  {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_CHARS_PER_TOKEN = 8  # first guess of the text tail that holds n tokens (doubled until it does)


@dataclasses.dataclass(frozen=True)
class Document:
  """name: path relative to the stdlib root (e.g. 'typing.py'); text; sha256 of its bytes."""

  name: str
  text: str
  sha256: str


def stdlib_root() -> Path:
  """The running interpreter's standard-library directory."""
  return Path(sysconfig.get_path("stdlib"))


def stdlib_documents(num: int, root: str | Path | None = None) -> list[Document]:
  """The `num` largest .py files under `root` (default the stdlib), largest first (ties by
  name), skipping test suites and installed packages (`SKIPPED_DIRS`)."""
  root = stdlib_root() if root is None else Path(root)
  if num < 1:
    raise ValueError(f"longtext needs at least one document, got num_documents={num}")
  files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]
  if len(files) < num:
    raise FileNotFoundError(
      f"{root} holds {len(files)} Python source files, fewer than the {num} documents asked for"
    )
  files.sort(key=lambda p: (-p.stat().st_size, p.relative_to(root).as_posix()))
  docs = []
  for path in files[:num]:
    data = path.read_bytes()
    docs.append(
      Document(
        path.relative_to(root).as_posix(), data.decode("utf-8"), hashlib.sha256(data).hexdigest()
      )
    )
  return docs


def provenance(documents: list[Document], root: str | Path | None = None) -> dict[str, Any]:
  """Which text was scored: Python version, stdlib root, and each file's name, size and hash."""
  return {
    "source": "python stdlib",
    "python": sys.version.split()[0],
    "implementation": platform.python_implementation(),
    "root": str(stdlib_root() if root is None else root),
    "files": [{"name": d.name, "chars": len(d.text), "sha256": d.sha256} for d in documents],
  }


def scored_window(
  tokenizer, document: Document, length: int, target_tokens: int
) -> tuple[list[int], list[int]]:
  """(context ids, target ids): the document's last `length` tokens split before the last
  `target_tokens`; the context starts with BOS when the tokenizer has one."""
  if not 0 < target_tokens < length - 1:
    raise ValueError(
      f"longtext target_tokens must be in [1, length - 2], got {target_tokens} at length {length}"
    )
  bos = getattr(tokenizer, "bos_token_id", None)
  need = length - (bos is not None)
  chars = need * _CHARS_PER_TOKEN
  while True:
    tail = document.text[-chars:]
    ids = list(tokenizer.encode(tail, add_special_tokens=False))[1:]  # the first may be cut
    if len(ids) >= need:
      break
    if chars >= len(document.text):
      raise ValueError(
        f"document {document.name} has {len(ids)} tokens, fewer than the "
        f"length {length}: use a shorter length or larger documents"
      )
    chars *= 2
  ids = ([bos] if bos is not None else []) + ids[-need:]
  return ids[:-target_tokens], ids[-target_tokens:]
