"""Prepare data for, train and export moa_jax's reference model (configs/train_reference.py).

  python experiments/train_reference.py prepare --config=configs/train_reference.py
      tokenizer (byte-level BPE on the Python stdlib + task renders) and the stdlib's tokens
      -> <data_dir>/{tokenizer/, natural.npy, record.json}; run on this machine so the
      data is fixed and recorded, then carried to the GPU.
  python3 experiments/train_reference.py train --config=configs/train_reference.py \
      --workdir=/tmp/ref --export=DIR
      trains (resuming from <workdir>/checkpoints), then writes the HF-format model, the
      tokenizer and TRAINING.md to DIR.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from moa_jax.train import data as train_data
from moa_jax.train import tokenizer as tok_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/train_reference.py", "configs/train_reference.py[:tiny]"
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/train_reference", "checkpoints and logs")
_EXPORT = flags.DEFINE_string("export", None, "write the HF-format model here after training")

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "tokenizers",
  "transformers",
  "numpy",
)


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def tokenizer_texts(cfg, texts: list[str]) -> list[str]:
  """Stdlib texts plus `tokenizer_task_docs` rendered documents of every task."""
  rng = np.random.default_rng(cfg.train.seed + 1000)
  docs = []
  for task in train_data.TASK_NAMES:
    for _ in range(cfg.tokenizer_task_docs):
      doc = train_data.render_doc(rng, task, int(rng.integers(4, 40)), extra_questions=2)
      docs.append("".join(doc.segments))
  return texts + docs


def prepare(cfg) -> None:
  out = Path(cfg.data_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = tok_lib.stdlib_sources()
  if cfg.stdlib_files:
    files = files[: cfg.stdlib_files]
  texts = tok_lib.read_sources(files)
  tokenizer = tok_lib.train_tokenizer(tokenizer_texts(cfg, texts), cfg.vocab_size)
  tokenizer.save_pretrained(out / "tokenizer")
  encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
  natural = np.concatenate(
    [np.asarray([tok_lib.BOS_ID] + e.ids + [tok_lib.EOS_ID], np.uint16) for e in encoded]
  )
  np.save(out / "natural.npy", natural)
  record = {
    "corpus": tok_lib.corpus_record(files, texts),
    "natural_tokens": int(natural.size),
    "natural_sha256": hashlib.sha256(natural.tobytes()).hexdigest(),
    "tokenizer": {
      "vocab_size": len(tokenizer),
      "task_docs_per_task": cfg.tokenizer_task_docs,
      "pre_tokenizer": "Digits(individual_digits=True) + ByteLevel",
    },
    "prepared_with": versions(),
  }
  (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
  print(json.dumps(record, indent=2))


def model_config(cfg, vocab_size: int):
  from moa_jax.models.config import LlamaConfig

  return LlamaConfig(
    vocab_size=vocab_size,
    bos_token_id=tok_lib.BOS_ID,
    eos_token_ids=(tok_lib.EOS_ID,),
    **cfg.model.to_dict(),
  )


def training_md(cfg, model_cfg, record: dict, log: list[dict], argv: list[str]) -> str:
  import jax

  from moa_jax.models.llama import count_params

  last = [r for r in log if "loss" in r][-1]
  attention = "cuDNN flash" if jax.default_backend() == "gpu" else "XLA"
  prepare_args = [a for a in argv if a.startswith(("--config=", "--config.data_dir"))]
  final = log[-1]
  steps = final["step"]
  phase_rows = "\n".join(f"| {p[0]:.2f} | {p[1]} | {p[2]} |" for p in cfg.train.phases)
  return f"""# moa_jax reference model

A {count_params(model_cfg) / 1e6:.1f}M-parameter Llama trained from scratch by moa_jax itself
(moa_jax/train, configs/train_reference.py): {model_cfg.num_layers} layers, hidden \
{model_cfg.hidden_size}, \
{model_cfg.num_heads} query / {model_cfg.num_kv_heads} KV heads of dim {model_cfg.head_dim}, \
SwiGLU {model_cfg.intermediate_size}, tied embeddings, RoPE theta {model_cfg.rope_theta:g}, \
vocab {model_cfg.vocab_size}; weights stored in bfloat16.

## Data (nothing downloaded)
- Natural text: {record["corpus"]["source"]}; Python {record["corpus"]["python_version"]}, \
{record["corpus"]["files"]} files, {record["corpus"]["bytes"]} bytes, sha256 \
`{record["corpus"]["sha256"]}`, {record["natural_tokens"]} tokens (sha256 \
`{record["natural_sha256"]}`).
- Synthetic tasks rendered fresh at every step by moa_jax.data.tasks: LongEval line retrieval \
(plus extra question/answer turns about other lines of the same record), passkey, multi-key \
NIAH, variable tracking, UUID key-value; chat-formatted (`<s>USER: ... ASSISTANT: answer</s>`). \
Mix {dict(sorted(cfg.train.mix.items()))}; answer tokens weigh {cfg.train.answer_weight} in the \
loss.
- Tokenizer: byte-level BPE ({record["tokenizer"]["pre_tokenizer"]}), \
{record["tokenizer"]["vocab_size"]} tokens, trained on the same stdlib text plus \
{record["tokenizer"]["task_docs_per_task"]} rendered documents per task; `<pad>`=0, `<s>`=1, \
`</s>`=2; Vicuna-style chat template.
- Prepared with {record["prepared_with"]}.

## Training
Curriculum over progress p (documents packed into full rows):

| from p | seq_len | rows per batch |
|---|---|---|
{phase_rows}

AdamW (b1 {cfg.train.b1}, b2 {cfg.train.b2}, weight decay {cfg.train.weight_decay}, clip \
{cfg.train.clip_norm}), peak lr {cfg.train.lr} after {cfg.train.warmup_steps} warmup steps, cosine \
to {cfg.train.final_lr_ratio}x; {model_cfg.dtype} compute, {attention} attention (training only). \
Progress is \
{"step-based" if cfg.train.steps else f"time-based (a {cfg.train.time_budget_s:.0f} s budget)"}: \
{steps} steps, {final["mtokens"]:.0f}M tokens, {final["seconds"]} s. Last logged: loss \
{last["loss"]}, text loss {last["text_loss"]}, answer-token accuracy {last["answer_acc"]}; \
held-out line-retrieval probe (teacher-forced exact answers at {list(cfg.train.probe_lengths)} \
tokens): {final["probe_acc"]:.3f}.

Trained on {jax.devices()[0].device_kind} with {versions()}.

## Reproduce
    python experiments/train_reference.py prepare {" ".join(prepare_args)}
    python3 experiments/train_reference.py {" ".join(argv)}

Evaluation: python -m moa_jax eval --config=configs/eval.py:reference_model
  --config.model.path=DIR -> benchmarks/reference_model.json.
"""


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ("prepare", "train"):
    raise app.UsageError("usage: train_reference.py {prepare|train} --config=... [flags]")
  cfg = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
  if argv[1] == "prepare":
    prepare(cfg)
    return
  from transformers import AutoTokenizer

  from moa_jax.train.trainer import export, train

  data_dir = Path(cfg.data_dir)
  if not (data_dir / "natural.npy").exists():
    raise FileNotFoundError(f"{data_dir}/natural.npy missing: run `prepare` first")
  tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
  natural = np.load(data_dir / "natural.npy")
  record = json.loads((data_dir / "record.json").read_text())
  model_cfg = model_config(cfg, len(tokenizer))
  graphdef, state, log = train(cfg.train, model_cfg, tokenizer, natural, _WORKDIR.value)
  if _EXPORT.value:
    directory = export(graphdef, state["params"], model_cfg, tokenizer, _EXPORT.value)
    (directory / "TRAINING.md").write_text(training_md(cfg, model_cfg, record, log, sys.argv[1:]))
    print(f"exported to {directory}")


if __name__ == "__main__":
  app.run(main)
