"""Calibration sources: MultiNews through `datasets`, and local JSONL files of {context, question}.

MultiNews records have `document` (the news articles joined by '|||||') and `summary`. MoA
calibrates on them with an instruction to summarize; the dense model's own answer replaces the
human summary (moa_jax/calibration/build.py), so only `document` is used here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
  import datasets

HUB_ID = "multi_news"
FIELDS = ("document", "summary")
ARTICLE_SEPARATOR = "|||||"
INSTRUCTION = "Write a one-page summary of all the news articles above."
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class ContextQuestion(NamedTuple):
  """One calibration record: a long context and the question or instruction about it."""

  context: str
  question: str


def _local_files(path: Path, split: str) -> tuple[str, list[str]]:
  """The `datasets` builder name and data files of a local file or folder (for one split)."""
  if path.is_file():
    files = [path]
  else:
    files = sorted(p for p in path.iterdir() if p.suffix in _LOCAL_BUILDERS)
    named = [p for p in files if p.stem == split]
    files = named or files
  if not files:
    raise FileNotFoundError(f"{path} holds no .jsonl, .json or .parquet file")
  builders = {_LOCAL_BUILDERS.get(p.suffix) for p in files}
  if None in builders or len(builders) > 1:
    raise ValueError(
      f"{path}: give .jsonl/.json or .parquet files of one kind, got {[p.name for p in files]}"
    )
  return builders.pop(), [str(p) for p in files]


def load_multinews(
  source: str | os.PathLike = HUB_ID, split: str = "train", *, cache_dir: str | None = None
) -> datasets.Dataset:
  """MultiNews records (fields document, summary) from a local file/folder or the hub.

  Args:
    source: a local .jsonl/.json/.parquet file, a folder of them (files named `<split>.*` are
      preferred), or a hub dataset id (default 'multi_news').
    split: the split to read from the hub or to pick among a folder's files.
  """
  import datasets  # here, so that importing the profiler needs no `datasets` (e.g. on the GPU box)

  path = Path(source)
  if path.exists():
    builder, files = _local_files(path, split)
    ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
  else:
    try:
      ds = datasets.load_dataset(str(source), split=split, cache_dir=cache_dir)
    except Exception as error:  # no network, unknown id, a datasets version without scripts
      raise FileNotFoundError(
        f"cannot load MultiNews {source!r} split {split!r} ({error}); pass a "
        "local .jsonl/.parquet file or folder in its schema"
      ) from error
  missing = [f for f in FIELDS if f not in ds.column_names]
  if missing:
    raise ValueError(f"{source}: records lack MultiNews fields {missing} (have {ds.column_names})")
  return ds


def articles(document: str) -> list[str]:
  """The non-empty articles of a MultiNews `document`, whitespace-trimmed."""
  return [a.strip() for a in document.split(ARTICLE_SEPARATOR) if a.strip()]


def multinews_examples(ds, instruction: str = INSTRUCTION) -> list[ContextQuestion]:
  """One ContextQuestion per record with articles: its articles, blank-line separated."""
  examples = []
  for document in ds["document"]:
    parts = articles(document)
    if parts:
      examples.append(ContextQuestion("\n\n".join(parts), instruction))
  return examples


def jsonl_records(path: str | os.PathLike, fields: tuple[str, ...]) -> list[dict]:
  """The records of a JSONL file, read line by line: each non-blank line one JSON object with
  string values for `fields` (others kept as they are). A bad line is a one-line ValueError
  naming the file and the line number."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} not found: expected a JSONL file of records with string fields {', '.join(fields)}"
    )
  records = []
  with path.open("rb") as lines:
    for number, raw in enumerate(lines, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as error:
        raise ValueError(
          f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(
          f"{path}:{number}: not valid JSON ({error.msg} at column "
          f"{error.colno}); expected one JSON object per line"
        ) from None
      if not isinstance(record, dict) or not all(
        isinstance(record.get(field), str) for field in fields
      ):
        raise ValueError(
          f"{path}:{number}: a record needs string fields {', '.join(repr(f) for f in fields)}"
        )
      records.append(record)
  return records


def load_context_questions(path: str | os.PathLike) -> list[ContextQuestion]:
  """Records {"context": str, "question": str} from a JSONL file (other fields are ignored)."""
  return [
    ContextQuestion(r["context"], r["question"])
    for r in jsonl_records(path, ContextQuestion._fields)
  ]
