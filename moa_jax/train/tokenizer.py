"""The reference model's tokenizer and its natural-text corpus (the Python standard library).

A byte-level BPE trained with the `tokenizers` library, with digits split one per token so that
numbers are copied digit by digit, wrapped as a transformers `PreTrainedTokenizerFast` with
`<pad>` = 0, `<s>` = 1, `</s>` = 2 and a Vicuna-style chat template, so that
`AutoTokenizer.from_pretrained(directory)` loads it.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moa_jax.calibration import prompts

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Machine-specific or generated modules that differ between installs of the same version.
_EXCLUDED_STDLIB = ("_sysconfigdata",)


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
  """Every *.py file of the running Python's standard library (site-packages excluded), sorted."""
  root = Path(root or sysconfig.get_paths()["stdlib"])
  if not root.is_dir():
    raise FileNotFoundError(f"no standard library at {root}: pass the directory holding os.py")
  files = [
    p
    for p in root.rglob("*.py")
    if "site-packages" not in p.relative_to(root).parts and not p.name.startswith(_EXCLUDED_STDLIB)
  ]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_sources(files: list[Path]) -> list[str]:
  """The files' text (UTF-8, undecodable bytes replaced), one string per file."""
  return [f.read_bytes().decode("utf-8", errors="replace") for f in files]


def corpus_record(files: list[Path], texts: list[str]) -> dict:
  """Provenance of the natural-text corpus: Python version, file count, bytes and a sha256."""
  digest = hashlib.sha256()
  for text in texts:
    digest.update(text.encode("utf-8"))
  return {
    "source": "Python standard library *.py (sysconfig.get_paths()['stdlib'], no site-packages, "
    "no _sysconfigdata*)",
    "python_version": platform.python_version(),
    "files": len(files),
    "bytes": sum(len(t.encode("utf-8")) for t in texts),
    "sha256": digest.hexdigest(),
  }


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
  """Trains a byte-level BPE of `vocab_size` tokens (specials included) on `texts`."""
  if vocab_size < 300:
    raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes plus specials; use >= 300")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[PAD, BOS, EOS],
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    max_token_length=16,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
  """A `tokenizers.Tokenizer` as a transformers fast tokenizer with our specials and template."""
  ids = (tok.token_to_id(PAD), tok.token_to_id(BOS), tok.token_to_id(EOS))
  if ids != (PAD_ID, BOS_ID, EOS_ID):
    raise ValueError(f"special token ids {ids} are not ({PAD_ID}, {BOS_ID}, {EOS_ID})")
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=BOS,
    eos_token=EOS,
    pad_token=PAD,
    chat_template=prompts.REFERENCE,
    padding_side="left",
    clean_up_tokenization_spaces=False,
    model_max_length=1 << 20,
  )
