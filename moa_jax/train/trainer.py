"""The reference model's training loop: optax AdamW, bf16 compute, jit step, orbax checkpoints.

Progress p in [0, 1] drives the curriculum (phases of growing sequence length) and the learning
rate (linear warmup, cosine decay): p = step / steps for a fixed step count, or, when
steps = 0, p = training seconds / time_budget_s, so a run on a lent GPU ends cleanly inside
its wall-clock limit (the step count reached is recorded). The train state (step, seconds,
millions of tokens, params, optimizer state) is checkpointed every `ckpt_every` steps and
restored on restart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.attention.fused import FusedCausalAttention, default_implementation
from moa_jax.models.config import LlamaConfig
from moa_jax.models.llama import Llama
from moa_jax.train.checkpoint import Checkpointer
from moa_jax.train.data import Batch, Mixture, line_retrieval_probe, prefetch


@dataclasses.dataclass(frozen=True)
class Phase:
  """From progress `start` on, train on [batch_size, seq_len] batches."""

  start: float
  seq_len: int
  batch_size: int


def phase_at(phases: Sequence[Phase], progress: float) -> Phase:
  return [p for p in phases if p.start <= progress][-1]


def learning_rate(
  step: int, progress: float, *, peak: float, warmup_steps: int, final_ratio: float
) -> float:
  """Linear warmup over `warmup_steps`, then cosine from `peak` to `final_ratio * peak` at p=1."""
  cosine = final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
  return peak * cosine * min(1.0, (step + 1) / warmup_steps)


def optimizer(cfg: Any) -> optax.GradientTransformation:
  """Clipped AdamW direction without the learning rate (the step multiplies by lr)."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on norms
  return optax.chain(
    optax.clip_by_global_norm(cfg.clip_norm),
    optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8),
    optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
  )


def weighted_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Weighted next-token cross-entropy of logits [B, T, V] and answer-token accuracy."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
  w = batch["weights"]
  loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-6)
  answers = (w > 1).astype(jnp.float32)  # answer tokens carry answer_weight > 1
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  metrics = {
    "loss": loss,
    "text_loss": jnp.sum(ce * (w == 1)) / jnp.maximum(jnp.sum(w == 1), 1),
    "answer_acc": jnp.sum(correct * answers) / jnp.maximum(jnp.sum(answers), 1),
  }
  return loss, metrics


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, attention: Any):
  """jit step (state, batch, lr) -> (state, metrics); the state's buffers are donated."""

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["tokens"], batch["positions"], attention=attention)  # [B, T, V]
    return weighted_loss(logits, batch)

  def step(state, batch, lr):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return jax.jit(step, donate_argnums=0)


def make_probe(graphdef: nnx.GraphDef, attention: Any):
  """jit (params, tokens [B, T]) -> greedy next tokens [B, T] (teacher forcing)."""

  @jax.jit
  def probe(params, tokens):
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = model(tokens, positions, attention=attention)
    return jnp.argmax(logits, -1)

  return probe


def probe_accuracy(predictions: np.ndarray, spans: list[tuple[int, int, list[int]]]) -> float:
  """Share of prompts whose whole answer is the greedy continuation (see line_retrieval_probe)."""
  hits = [
    list(predictions[row, first - 1 : first - 1 + len(ans)]) == ans for row, first, ans in spans
  ]
  return float(np.mean(hits))


def init_state(
  model_cfg: LlamaConfig, tx: optax.GradientTransformation, seed: int
) -> tuple[nnx.GraphDef, dict]:
  model = Llama(model_cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, {
    "step": jnp.int32(0),
    "seconds": jnp.float32(0.0),
    "mtokens": jnp.float32(0.0),
    "params": params,
    "opt_state": tx.init(params),
  }


def _device_batch(batch: Batch) -> dict[str, jax.Array]:
  return {
    "tokens": batch.tokens,
    "positions": batch.positions,
    "targets": batch.targets,
    "weights": batch.weights,
  }


def train(
  cfg: Any, model_cfg: LlamaConfig, tokenizer: Any, natural_tokens: np.ndarray, workdir: str | Path
) -> tuple[nnx.GraphDef, dict, list[dict]]:
  """Trains (or resumes) the reference model; returns graphdef, final state and the log rows.

  cfg fields: seed, phases [(start, seq_len, batch_size)], steps (0: time-based),
  time_budget_s, lr, warmup_steps, final_lr_ratio, b1, b2, weight_decay, clip_norm,
  log_every, ckpt_every, probe_every, probe_lengths, probe_num, mix, answer_weight, min_doc,
  full_row.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  phases = [Phase(*p) for p in cfg.phases]
  if phases[0].start != 0.0:
    raise ValueError(f"the first phase must start at progress 0, got {phases[0].start}")
  if cfg.steps <= 0 and cfg.time_budget_s <= 0:
    raise ValueError("set steps > 0, or steps = 0 with a positive time_budget_s")
  tx = optimizer(cfg)
  graphdef, state = init_state(model_cfg, tx, cfg.seed)
  ckpt = Checkpointer(workdir / "checkpoints", every=cfg.ckpt_every)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state = restored[1]
    print(f"resumed from step {restored[0]} ({float(state['seconds']):.0f} s trained)")
  attention = FusedCausalAttention(default_implementation(model_cfg.dtype))
  step_fn = make_train_step(graphdef, tx, attention)
  probe_fn = make_probe(graphdef, attention)
  mixture = Mixture(
    tokenizer,
    natural_tokens,
    dict(cfg.mix),
    answer_weight=cfg.answer_weight,
    min_doc=cfg.min_doc,
    full_row=cfg.full_row,
    seed=cfg.seed,
  )
  probe_tokens, probe_spans = line_retrieval_probe(
    tokenizer, max(p.seq_len for p in phases), cfg.probe_lengths, cfg.probe_num
  )

  def progress(step: int, seconds: float) -> float:
    return step / cfg.steps if cfg.steps > 0 else seconds / cfg.time_budget_s

  # Batches are built ahead on threads; the phase of step s is decided from the progress when
  # its batch is built (recorded in the log).
  start_step, seconds = int(state["step"]), float(state["seconds"])
  clock = {"seconds": seconds}

  def steps():
    s = start_step
    while progress(s, clock["seconds"]) < 1.0:
      yield s
      s += 1

  def make(s: int) -> tuple[Phase, Batch]:
    phase = phase_at(phases, progress(s, clock["seconds"]))
    return phase, mixture.batch(s, phase.batch_size, phase.seq_len)

  log, window, window_tokens = [], [], 0
  bar = tqdm(
    desc="train", unit="step", initial=start_step, total=cfg.steps if cfg.steps > 0 else None
  )
  last = time.perf_counter()
  for s, (phase, batch) in prefetch(make, steps()):
    lr = learning_rate(
      s,
      progress(s, clock["seconds"]),
      peak=cfg.lr,
      warmup_steps=cfg.warmup_steps,
      final_ratio=cfg.final_lr_ratio,
    )
    state, metrics = step_fn(state, _device_batch(batch), jnp.float32(lr))
    window.append(metrics)
    window_tokens += batch.tokens.size
    state["mtokens"] = state["mtokens"] + batch.tokens.size / 1e6
    if (s + 1) % cfg.log_every == 0 or s == start_step:
      metrics = {k: float(np.mean([jax.device_get(m[k]) for m in window])) for k in window[0]}
      window = []
      now = time.perf_counter()
      clock["seconds"] += now - last
      row = {
        "step": s + 1,
        "seconds": round(clock["seconds"], 1),
        "seq_len": phase.seq_len,
        "batch": phase.batch_size,
        "lr": lr,
        "tokens_per_s": round(window_tokens / (now - last)),
        **{k: round(v, 4) for k, v in metrics.items()},
      }
      last, window_tokens = now, 0
      if (s + 1) % (cfg.log_every * cfg.probe_every) == 0:
        row["probe_acc"] = probe_accuracy(
          np.asarray(probe_fn(state["params"], probe_tokens)), probe_spans
        )
      log.append(row)
      bar.set_postfix(loss=row["loss"], ans=row["answer_acc"], L=phase.seq_len)
      tqdm.write(json.dumps(row))
    else:
      now = time.perf_counter()
      clock["seconds"] += now - last
      last = now
    state["seconds"] = jnp.float32(clock["seconds"])
    ckpt.maybe_save(s + 1, state)
    bar.update(1)
  bar.close()
  final_step = int(state["step"])
  ckpt.maybe_save(final_step, state, force=True)
  ckpt.close()
  row = {
    "step": final_step,
    "seconds": round(float(state["seconds"]), 1),
    "mtokens": round(float(state["mtokens"]), 1),
    "probe_acc": probe_accuracy(np.asarray(probe_fn(state["params"], probe_tokens)), probe_spans),
  }
  log.append(row)
  tqdm.write(json.dumps(row))
  with open(workdir / "train_log.jsonl", "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in log)
  return graphdef, state, log


def export(
  graphdef: nnx.GraphDef,
  params: Any,
  model_cfg: LlamaConfig,
  tokenizer: Any,
  directory: str | Path,
  dtype: str = "bfloat16",
) -> Path:
  """Writes the model in HF format (config.json + model.safetensors, `dtype` weights) and the
  tokenizer files to `directory`."""
  from moa_jax.models import hf  # the HF checkpoint writer

  directory = Path(directory)
  cast = jax.tree.map(lambda x: x.astype(dtype), params)
  model = nnx.merge(graphdef, cast)
  hf.save_pretrained(model, model_cfg.replace(param_dtype=dtype, dtype=dtype), directory)
  tokenizer.save_pretrained(directory)
  return directory
