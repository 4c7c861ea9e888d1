"""Train moa_jax's reference model: a small Llama on Python-stdlib source + synthetic tasks.

The full run (data prepared on this machine, then carried to one lent H100 with the
ml_collections wheel; moa_jax/assets/reference_model/TRAINING.md has the exact GPU call):

  python experiments/train_reference.py prepare --config=configs/train_reference.py
  python3 experiments/train_reference.py train --config=configs/train_reference.py \
      --workdir=/tmp/ref --export=/tmp/stage/reference_model
  python3 -m moa_jax eval --config=configs/eval.py:reference_model \
      --config.model.path=/tmp/stage/reference_model --workdir=/tmp/reference_eval

  Runtime: prepare ~1 min on 2 CPU cores; train 390 s of (time-based) training + ~40 s start
  and export on an H100; eval ~80 s. Result of the committed model: 2628 steps, 689M tokens,
  dense line retrieval 1.00 at 1k/2k/3k/4k tokens, 0.70 at 6k, 0.24 at 8k
  (benchmarks/reference_model.json).

The CPU variant for tests and CI (~20 s): --config=configs/train_reference.py:tiny
(a tiny Llama, 512-token tokenizer, 16 steps of 256- then 512-token rows; the loss falls).
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: None/'full' for the GPU run, 'tiny' for the CPU test variant."""
  variant = arg or "full"
  if variant not in ("full", "tiny"):
    raise ValueError(f"unknown train_reference variant {variant!r}; use 'full' or 'tiny'")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.data_dir = ".traindata"  # prepared tokenizer + natural-text tokens (git-ignored)
  c.vocab_size = 512 if tiny else 8192
  c.stdlib_files = 40 if tiny else 0  # 0: every stdlib *.py file
  c.tokenizer_task_docs = 20 if tiny else 400  # task renders per task added to BPE training text
  c.model = ml_collections.ConfigDict(
    dict(
      hidden_size=64 if tiny else 384,
      intermediate_size=160 if tiny else 1024,
      num_layers=2 if tiny else 6,
      num_heads=4 if tiny else 8,
      num_kv_heads=2 if tiny else 4,
      head_dim=16 if tiny else 64,
      rope_theta=500000.0,
      max_position_embeddings=8192,
      tie_word_embeddings=True,
      rms_norm_eps=1e-5,
      dtype="float32" if tiny else "bfloat16",
      param_dtype="float32",
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      seed=0,
      # (start progress, seq_len, batch_size): the curriculum, 256k tokens per step on the GPU.
      phases=((0.0, 256, 4), (0.5, 512, 2))
      if tiny
      else ((0.0, 1024, 256), (0.3, 2048, 128), (0.55, 4096, 64)),
      steps=16 if tiny else 0,  # 0: time-based progress (time_budget_s)
      time_budget_s=0.0 if tiny else 390.0,
      lr=3e-3 if tiny else 1.5e-3,
      warmup_steps=2 if tiny else 100,
      final_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      weight_decay=0.1,
      clip_norm=1.0,
      log_every=4 if tiny else 25,
      probe_every=2,
      ckpt_every=8 if tiny else 200,
      probe_lengths=(320, 480) if tiny else (1000, 2000, 3900),
      probe_num=2 if tiny else 16,
      mix=dict(natural=0.25, lines=0.5, passkey=0.05, niah=0.07, vt=0.06, uuid=0.07),
      answer_weight=4.0,
      min_doc=96 if tiny else 160,
      full_row=0.5,
    )
  )
  c.lock()
  return c
