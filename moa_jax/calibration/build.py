"""Calibration sets (docs/method.md, "Calibration"): long-document prompts answered by the dense
model.

Each record (a long context and a question or instruction) is wrapped in the model's chat
template, its context cut in the middle so that prompt + max_new_tokens fits a target length N;
the dense model answers greedily and its answer is the response: the loss reads response tokens
only. Samples are bucketed by target length and right padded to it.

A set is cached on disk (data.npz + meta.json) under a key hashed from everything that decides
its content: the model (config and a fingerprint of its parameters), the tokenizer (vocabulary,
special tokens, chat template), the source (local files by content), lengths, seed, sample count,
max new tokens, template, instruction and min_fill; it is rebuilt only when one of them changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.calibration import prompts, sources
from moa_jax.calibration.sources import ContextQuestion
from moa_jax.workdir import atomic_write, digest, file_digest

FORMAT_VERSION = 2  # 2: 'auto' templates fall back to the raw prompt (as evaluation does)
SOURCES = ("multinews", "jsonl")
PROMPT = "{context}\n\n{question}"
CUT_MARKER = "\n...\n"


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """What calibration set to build.

  source: 'multinews' (path: hub id, or a local .jsonl/.parquet file or folder in its schema) or
    'jsonl' (path: a JSONL file of {context, question}).
  lengths: target lengths N (prompt + answer <= N); samples_per_length: samples per length.
  template: a name of `moa_jax.calibration.prompts.TEMPLATE_NAMES` ('auto': the tokenizer's own
    chat template, or the raw prompt without one; evaluation uses the same rule).
  min_fill: a record joins length N only if its untruncated prompt has at least
    min_fill * (N - max_new_tokens) tokens.
  batch_size: prompts per generate call (does not change the result, so not in the cache key).
  """

  source: str = "multinews"
  path: str = sources.HUB_ID
  split: str = "train"
  lengths: tuple[int, ...] = (2048, 4096, 8192)
  samples_per_length: int = 8
  max_new_tokens: int = 128
  seed: int = 0
  template: str = "auto"
  instruction: str = sources.INSTRUCTION
  min_fill: float = 0.5
  batch_size: int = 4

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"unknown calibration source {self.source!r}; choose one of {SOURCES}")
    prompts.check_template(self.template)
    object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
    if not self.lengths or min(self.lengths) <= self.max_new_tokens:
      raise ValueError(
        f"calibration lengths {self.lengths} must exist and exceed max_new_tokens "
        f"({self.max_new_tokens})"
      )
    if self.samples_per_length < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
      raise ValueError("samples_per_length, max_new_tokens and batch_size must be >= 1")
    if not 0.0 <= self.min_fill <= 1.0:
      raise ValueError(f"min_fill must be in [0, 1], got {self.min_fill}")


@dataclasses.dataclass(frozen=True)
class CalibrationBucket:
  """Samples of one target length N, right padded.

  tokens: [S, N] int32 (pad id after each sample); loss_mask: [S, N] bool, True on response
  tokens; lengths: [S] int32 valid tokens per sample.
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  lengths: np.ndarray

  def __post_init__(self):
    s, n = self.tokens.shape
    if self.loss_mask.shape != (s, n) or self.lengths.shape != (s,):
      raise ValueError(
        f"bucket arrays disagree: tokens {self.tokens.shape}, loss_mask "
        f"{self.loss_mask.shape}, lengths {self.lengths.shape}"
      )

  @property
  def num_samples(self) -> int:
    return self.tokens.shape[0]

  @property
  def length(self) -> int:
    return self.tokens.shape[1]

  def positions(self) -> np.ndarray:
    """[S, N] int32: 0, 1, ... on each sample's tokens, -1 on its padding."""
    index = np.arange(self.length, dtype=np.int32)[None]
    return np.where(index < self.lengths[:, None], index, -1).astype(np.int32)


@dataclasses.dataclass
class CalibrationSet:
  """Buckets by target length plus metadata (the cache key and its inputs, per-sample sources)."""

  buckets: dict[int, CalibrationBucket]
  metadata: dict[str, Any]

  def save(self, directory: str | os.PathLike) -> None:
    """Writes data.npz then meta.json, each atomically (meta.json marks a complete set)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for n, bucket in self.buckets.items():
      arrays[f"tokens_{n}"] = bucket.tokens
      arrays[f"loss_mask_{n}"] = bucket.loss_mask
      arrays[f"lengths_{n}"] = bucket.lengths
    atomic_write(directory / "data.npz", lambda f: np.savez(f, **arrays))
    meta = dict(self.metadata, lengths=sorted(self.buckets))
    atomic_write(directory / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))

  @classmethod
  def load(cls, directory: str | os.PathLike) -> CalibrationSet:
    directory = Path(directory)
    if not (directory / "meta.json").is_file() or not (directory / "data.npz").is_file():
      raise FileNotFoundError(
        f"{directory} holds no complete calibration set (data.npz, meta.json)"
      )
    metadata = json.loads((directory / "meta.json").read_text())
    with np.load(directory / "data.npz") as data:
      buckets = {
        n: CalibrationBucket(data[f"tokens_{n}"], data[f"loss_mask_{n}"], data[f"lengths_{n}"])
        for n in metadata["lengths"]
      }
    if not buckets or all(b.num_samples == 0 for b in buckets.values()):
      raise ValueError(f"{directory}: the calibration set is empty")
    return cls(buckets, metadata)


# ------------------------------------------------------------------------- identity / cache key


def params_fingerprint(model, values_per_leaf: int = 256) -> str:
  """Hash of every parameter's path, shape, dtype and first values (cheap even for 8B models)."""
  hasher = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  for path, leaf in leaves:
    hasher.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
    head = np.asarray(leaf.reshape(-1)[:values_per_leaf].astype(np.float32))
    hasher.update(head.tobytes())
  return hasher.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
  """Hash of the vocabulary and rules, special tokens and chat template (not the file path)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  rules = (
    backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
  )
  specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
  template = getattr(tokenizer, "chat_template", None) or ""
  return digest(type(tokenizer).__name__, rules, specials, str(template))


def source_fingerprint(config: CalibrationConfig) -> dict[str, Any]:
  """The source's identity: its spec, plus the content hash of every local file it reads."""
  path = Path(config.path)
  files = (
    [path]
    if path.is_file()
    else sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir()
    else []
  )
  return {
    "source": config.source,
    "path": config.path,
    "split": config.split,
    "files": [[str(p.relative_to(path.parent)), file_digest(p)] for p in files],
  }


def cache_key_inputs(model, tokenizer, config: CalibrationConfig, model_id: str = "") -> dict:
  """Everything a calibration set depends on (JSON-serializable)."""
  settings = dataclasses.asdict(config)
  settings.pop("batch_size")
  return {
    "format": FORMAT_VERSION,
    "model_id": model_id,
    "model_config": dataclasses.asdict(model.config),
    "params": params_fingerprint(model),
    "tokenizer": tokenizer_fingerprint(tokenizer),
    "source": source_fingerprint(config),
    "settings": settings,
  }


def cache_key(inputs: Mapping[str, Any]) -> str:
  """The key a calibration set is cached under: the digest of all its inputs."""
  return digest(inputs)


# ------------------------------------------------------------------------------------- prompts


def render_prompt(tokenizer, context: str, question: str, template: str) -> list[int]:
  """Token ids of one user turn (context + question) and the assistant's generation prompt."""
  return prompts.chat_prompt_ids(
    tokenizer, PROMPT.format(context=context, question=question), template
  )


def fit_prompt(
  tokenizer,
  example: ContextQuestion,
  budget: int,
  template: str,
) -> tuple[list[int] | None, int]:
  """The prompt cut to at most `budget` tokens (middle of the context dropped) and its full length.

  Returns (None, full length) when even an empty context does not fit.
  """
  ids = render_prompt(tokenizer, example.context, example.question, template)
  full = len(ids)
  if full <= budget:
    return ids, full
  context_ids = tokenizer(example.context, add_special_tokens=False)["input_ids"]
  keep = len(context_ids) - (full - budget)
  for _ in range(16):
    if keep <= 0:
      return None, full
    head, tail = context_ids[: keep - keep // 2], context_ids[len(context_ids) - keep // 2 :]
    context = tokenizer.decode(head) + CUT_MARKER + (tokenizer.decode(tail) if tail else "")
    ids = render_prompt(tokenizer, context, example.question, template)
    if len(ids) <= budget:
      return ids, full
    keep -= len(ids) - budget
  return None, full


def load_examples(config: CalibrationConfig, cache_dir: str | None = None) -> list[ContextQuestion]:
  """The source's records as (context, question) pairs; an empty source is an error."""
  if config.source == "multinews":
    ds = sources.load_multinews(config.path, config.split, cache_dir=cache_dir)
    examples = sources.multinews_examples(ds, config.instruction)
  else:
    examples = sources.load_context_questions(config.path)
  if not examples:
    raise ValueError(
      f"calibration source {config.source}:{config.path!r} has no records: the "
      "calibration set would be empty"
    )
  return examples


def _select_prompts(
  tokenizer,
  examples: Sequence[ContextQuestion],
  config: CalibrationConfig,
) -> dict[int, list[tuple[int, list[int]]]]:
  """Per length: up to samples_per_length (record index, prompt ids), records in seeded order."""
  selected = {}
  for n in config.lengths:
    budget = n - config.max_new_tokens
    order = np.random.default_rng([config.seed, n]).permutation(len(examples))
    chosen, longest = [], 0
    for index in order:
      ids, full = fit_prompt(tokenizer, examples[index], budget, config.template)
      longest = max(longest, full)
      if ids is not None and full >= config.min_fill * budget:
        chosen.append((int(index), ids))
        if len(chosen) == config.samples_per_length:
          break
    if not chosen:
      raise ValueError(
        f"no calibration record fills length {n}: prompts need >= "
        f"{config.min_fill * budget:.0f} tokens, the longest has {longest}; lower "
        "min_fill or the length, or add longer documents"
      )
    selected[n] = chosen
  return selected


def build_calibration(
  model,
  tokenizer,
  config: CalibrationConfig,
  *,
  cache_dir: str | os.PathLike | None = None,
  model_id: str = "",
  datasets_cache_dir: str | None = None,
  progress: bool = True,
) -> CalibrationSet:
  """The calibration set of `config` for this model and tokenizer, from cache_dir when current.

  Args:
    model: the dense moa_jax Llama that answers; tokenizer: a transformers tokenizer.
    cache_dir: where sets live (`<cache_dir>/calibration-<key>`); None: build without caching.
    model_id: the model's name or path, recorded with the set (part of the key).
  """
  from moa_jax.generate import generate  # the model package is only needed when building

  inputs = cache_key_inputs(model, tokenizer, config, model_id)
  key = cache_key(inputs)
  directory = None if cache_dir is None else Path(cache_dir) / f"calibration-{key[:16]}"
  if directory is not None and (directory / "meta.json").is_file():
    cached = CalibrationSet.load(directory)
    if cached.metadata.get("key") == key:
      return cached

  examples = load_examples(config, datasets_cache_dir)
  template_name, _ = prompts.resolve_template(tokenizer, config.template)
  selected = _select_prompts(tokenizer, examples, config)
  stop_ids = prompts.stop_ids(tokenizer, model.config.eos_token_ids)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  buckets, records = {}, {}
  bar = tqdm(
    total=sum(map(len, selected.values())),
    desc="calibration answers",
    unit="sample",
    disable=not progress,
  )
  for n, chosen in selected.items():
    chosen = sorted(chosen, key=lambda item: len(item[1]))  # similar lengths share a batch
    tokens = np.full((len(chosen), n), pad_id, np.int32)
    loss_mask = np.zeros((len(chosen), n), bool)
    lengths = np.zeros((len(chosen),), np.int32)
    for start in range(0, len(chosen), config.batch_size):
      batch = chosen[start : start + config.batch_size]
      answers = generate(
        model, [ids for _, ids in batch], config.max_new_tokens, eos_id=stop_ids, pad_id=pad_id
      )
      for row, ((_, prompt), answer) in enumerate(zip(batch, answers), start):
        sample = prompt + answer
        tokens[row, : len(sample)] = sample
        loss_mask[row, len(prompt) : len(sample)] = True
        lengths[row] = len(sample)
      bar.update(len(batch))
    buckets[n] = CalibrationBucket(tokens, loss_mask, lengths)
    records[str(n)] = [index for index, _ in chosen]
  bar.close()
  metadata = {
    "key": key,
    "inputs": inputs,
    "template": template_name,
    "records": records,
    "model_id": model_id,
  }
  calibration = CalibrationSet(buckets, metadata)
  if directory is not None:
    calibration.save(directory)
  return calibration
