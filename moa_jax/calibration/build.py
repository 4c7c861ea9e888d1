"""Calibration data (MOA_SPEC.md section 1): long-document prompts answered by the dense model.

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

from moa_jax.data import multinews
from moa_jax.data.multinews import ContextQuestion

FORMAT_VERSION = 1
SOURCES = ("multinews", "jsonl")
PROMPT = "{context}\n\n{question}"
CUT_MARKER = "\n...\n"

# Built-in chat templates (Jinja, as transformers renders them) for tokenizers without one.
CHAT_TEMPLATES = {
    # Vicuna v1.1: system line, then " USER: ... ASSISTANT: ...</s>".
    "vicuna": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "A chat between a curious user and an artificial intelligence assistant. The assistant"
        " gives helpful, detailed, and polite answers to the user's questions."
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %} USER: {{ message['content'] }}"
        "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ message['content'] }}"
        "{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"),
    # Llama-3 instruct: header tokens around each role, <|eot_id|> after each turn.
    "llama3": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"),
}
TEMPLATE_NAMES = ("auto", *CHAT_TEMPLATES)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """What calibration set to build.

  source: 'multinews' (path: hub id, or a local .jsonl/.parquet file or folder in its schema) or
    'jsonl' (path: a JSONL file of {context, question}).
  lengths: target lengths N (prompt + answer <= N); samples_per_length: samples per length.
  template: 'auto' (the tokenizer's chat template; without one 'llama3' if its vocabulary has
    Llama-3's header tokens, else 'vicuna'), or 'vicuna' / 'llama3' (ours).
  min_fill: a record joins length N only if its untruncated prompt has at least
    min_fill * (N - max_new_tokens) tokens.
  batch_size: prompts per generate call (does not change the result, so not in the cache key).
  """

  source: str = "multinews"
  path: str = multinews.HUB_ID
  split: str = "train"
  lengths: tuple[int, ...] = (2048, 4096, 8192)
  samples_per_length: int = 8
  max_new_tokens: int = 128
  seed: int = 0
  template: str = "auto"
  instruction: str = multinews.INSTRUCTION
  min_fill: float = 0.5
  batch_size: int = 4

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"unknown calibration source {self.source!r}; choose one of {SOURCES}")
    if self.template not in TEMPLATE_NAMES:
      raise ValueError(f"unknown chat template {self.template!r}; choose one of {TEMPLATE_NAMES}")
    object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
    if not self.lengths or min(self.lengths) <= self.max_new_tokens:
      raise ValueError(f"calibration lengths {self.lengths} must exist and exceed max_new_tokens "
                       f"({self.max_new_tokens})")
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
      raise ValueError(f"bucket arrays disagree: tokens {self.tokens.shape}, loss_mask "
                       f"{self.loss_mask.shape}, lengths {self.lengths.shape}")

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
    _atomic_write(directory / "data.npz", lambda f: np.savez(f, **arrays))
    meta = dict(self.metadata, lengths=sorted(self.buckets))
    _atomic_write(directory / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))

  @classmethod
  def load(cls, directory: str | os.PathLike) -> CalibrationSet:
    directory = Path(directory)
    if not (directory / "meta.json").is_file() or not (directory / "data.npz").is_file():
      raise FileNotFoundError(
          f"{directory} holds no complete calibration set (data.npz, meta.json)")
    metadata = json.loads((directory / "meta.json").read_text())
    with np.load(directory / "data.npz") as data:
      buckets = {n: CalibrationBucket(data[f"tokens_{n}"], data[f"loss_mask_{n}"],
                                      data[f"lengths_{n}"]) for n in metadata["lengths"]}
    if not buckets or all(b.num_samples == 0 for b in buckets.values()):
      raise ValueError(f"{directory}: the calibration set is empty")
    return cls(buckets, metadata)


def _atomic_write(path: Path, write) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


# ------------------------------------------------------------------------- identity / cache key

def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def params_fingerprint(model, values_per_leaf: int = 256) -> str:
  """Hash of every parameter's path, shape, dtype and first values (cheap even for 8B models)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  for path, leaf in leaves:
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
    head = np.asarray(leaf.reshape(-1)[:values_per_leaf].astype(np.float32))
    digest.update(head.tobytes())
  return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
  """Hash of the vocabulary and rules, special tokens and chat template (not the file path)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  rules = backend.to_str() if backend is not None else json.dumps(
      sorted(tokenizer.get_vocab().items()))
  specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
  template = getattr(tokenizer, "chat_template", None) or ""
  return _sha256("\0".join([type(tokenizer).__name__, rules, specials, str(template)]).encode())


def _file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def source_fingerprint(config: CalibrationConfig) -> dict[str, Any]:
  """The source's identity: its spec, plus the content hash of every local file it reads."""
  path = Path(config.path)
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) \
      if path.is_dir() else []
  return {"source": config.source, "path": config.path, "split": config.split,
          "files": [[str(p.relative_to(path.parent)), _file_sha256(p)] for p in files]}


def cache_key_inputs(model, tokenizer, config: CalibrationConfig, model_id: str = "") -> dict:
  """Everything a calibration set depends on (JSON-serializable)."""
  settings = dataclasses.asdict(config)
  settings.pop("batch_size")
  return {"format": FORMAT_VERSION, "model_id": model_id,
          "model_config": dataclasses.asdict(model.config), "params": params_fingerprint(model),
          "tokenizer": tokenizer_fingerprint(tokenizer), "source": source_fingerprint(config),
          "settings": settings}


def cache_key(inputs: Mapping[str, Any]) -> str:
  return _sha256(json.dumps(inputs, sort_keys=True, default=str).encode())


# ------------------------------------------------------------------------------------- prompts

def resolve_template(tokenizer, template: str = "auto") -> tuple[str, str | None]:
  """(name, Jinja string or None for the tokenizer's own) of the chat template to use."""
  if template not in TEMPLATE_NAMES:
    raise ValueError(f"unknown chat template {template!r}; choose one of {TEMPLATE_NAMES}")
  if template != "auto":
    return template, CHAT_TEMPLATES[template]
  if getattr(tokenizer, "chat_template", None):
    return "tokenizer", None
  name = "llama3" if "<|start_header_id|>" in tokenizer.get_vocab() else "vicuna"
  return name, CHAT_TEMPLATES[name]


def render_prompt(tokenizer, context: str, question: str, chat_template: str | None) -> list[int]:
  """Token ids of one user turn (context + question) and the assistant's generation prompt."""
  messages = [{"role": "user", "content": PROMPT.format(context=context, question=question)}]
  text = tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                       add_generation_prompt=True, tokenize=False)
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer, example: ContextQuestion, budget: int, chat_template: str | None,
               ) -> tuple[list[int] | None, int]:
  """The prompt cut to at most `budget` tokens (middle of the context dropped) and its full length.

  Returns (None, full length) when even an empty context does not fit.
  """
  ids = render_prompt(tokenizer, example.context, example.question, chat_template)
  full = len(ids)
  if full <= budget:
    return ids, full
  context_ids = tokenizer(example.context, add_special_tokens=False)["input_ids"]
  keep = len(context_ids) - (full - budget)
  for _ in range(16):
    if keep <= 0:
      return None, full
    head, tail = context_ids[:keep - keep // 2], context_ids[len(context_ids) - keep // 2:]
    context = tokenizer.decode(head) + CUT_MARKER + (tokenizer.decode(tail) if tail else "")
    ids = render_prompt(tokenizer, context, example.question, chat_template)
    if len(ids) <= budget:
      return ids, full
    keep -= len(ids) - budget
  return None, full


def load_examples(config: CalibrationConfig, cache_dir: str | None = None) -> list[ContextQuestion]:
  """The source's records as (context, question) pairs; an empty source is an error."""
  if config.source == "multinews":
    ds = multinews.load_multinews(config.path, config.split, cache_dir=cache_dir)
    examples = multinews.multinews_examples(ds, config.instruction)
  else:
    examples = multinews.load_context_questions(config.path)
  if not examples:
    raise ValueError(f"calibration source {config.source}:{config.path!r} has no records: the "
                     "calibration set would be empty")
  return examples


def _stop_ids(model, tokenizer) -> tuple[int, ...]:
  ids = set(model.config.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(tokenizer.eos_token_id)
  eot = tokenizer.get_vocab().get("<|eot_id|>")
  if eot is not None:
    ids.add(eot)
  return tuple(sorted(ids))


def _select_prompts(tokenizer, examples: Sequence[ContextQuestion], config: CalibrationConfig,
                    chat_template: str | None) -> dict[int, list[tuple[int, list[int]]]]:
  """Per length: up to samples_per_length (record index, prompt ids), records in seeded order."""
  selected = {}
  for n in config.lengths:
    budget = n - config.max_new_tokens
    order = np.random.default_rng([config.seed, n]).permutation(len(examples))
    chosen, longest = [], 0
    for index in order:
      ids, full = fit_prompt(tokenizer, examples[index], budget, chat_template)
      longest = max(longest, full)
      if ids is not None and full >= config.min_fill * budget:
        chosen.append((int(index), ids))
        if len(chosen) == config.samples_per_length:
          break
    if not chosen:
      raise ValueError(f"no calibration record fills length {n}: prompts need >= "
                       f"{config.min_fill * budget:.0f} tokens, the longest has {longest}; lower "
                       "min_fill or the length, or add longer documents")
    selected[n] = chosen
  return selected


def build_calibration(model, tokenizer, config: CalibrationConfig, *,
                      cache_dir: str | os.PathLike | None = None, model_id: str = "",
                      datasets_cache_dir: str | None = None, progress: bool = True,
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
  template_name, chat_template = resolve_template(tokenizer, config.template)
  selected = _select_prompts(tokenizer, examples, config, chat_template)
  stop_ids = _stop_ids(model, tokenizer)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  buckets, records = {}, {}
  bar = tqdm(total=sum(map(len, selected.values())), desc="calibration answers", unit="sample",
             disable=not progress)
  for n, chosen in selected.items():
    chosen = sorted(chosen, key=lambda item: len(item[1]))  # similar lengths share a batch
    tokens = np.full((len(chosen), n), pad_id, np.int32)
    loss_mask = np.zeros((len(chosen), n), bool)
    lengths = np.zeros((len(chosen),), np.int32)
    for start in range(0, len(chosen), config.batch_size):
      batch = chosen[start:start + config.batch_size]
      answers = generate(model, [ids for _, ids in batch], config.max_new_tokens,
                         eos_id=stop_ids, pad_id=pad_id)
      for row, ((_, prompt), answer) in enumerate(zip(batch, answers), start):
        sample = prompt + answer
        tokens[row, :len(sample)] = sample
        loss_mask[row, len(prompt):len(sample)] = True
        lengths[row] = len(sample)
      bar.update(len(batch))
    buckets[n] = CalibrationBucket(tokens, loss_mask, lengths)
    records[str(n)] = [index for index, _ in chosen]
  bar.close()
  metadata = {"key": key, "inputs": inputs, "template": template_name, "records": records,
              "model_id": model_id}
  calibration = CalibrationSet(buckets, metadata)
  if directory is not None:
    calibration.save(directory)
  return calibration
