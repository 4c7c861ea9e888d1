"""Compare attention methods (dense, uniform window, MoA plans) on one generation path.

Every method runs through `moa_jax.generate.generate` (prefill, then decoding on the method's
cache) and through one teacher-forced forward for the response cross-entropy. The attention of a
method comes from an `AttentionFactory(method, planned_length) -> Attention`, where the planned
length N = longest prompt of the batch + max_new_tokens fixes every elastic rule's window
(MOA_SPEC.md section 3). `plan_factory` is the default: DenseAttention for 'dense', and
MoA's attention on its static per-head cache (`moa_jax.attention.moa.MoAAttention`) for
'uniform' (StreamingLLM at the same KV density, `plans.plan.uniform_plan`) and every named plan.

Results are records, one per (method, task, length, depth decile): accuracy, sample count,
mean depth and prompt tokens, response cross-entropy and perplexity, and the predictions.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.attention.base import Attention
from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.data import longbench as longbench_lib
from moa_jax.calibration import prompts as prompts_lib
from moa_jax.data import tasks as tasks_lib
from moa_jax.eval import metrics
from moa_jax.generate import generate, left_pad
from moa_jax.plans.plan import Plan, uniform_plan
from moa_jax.plans.rules import DEFAULT_SINK

AttentionFactory = Callable[[str, int], Attention]  # (method, planned total length N) -> Attention
ACCURACY_THRESHOLD = 0.9  # effective context length: longest length with accuracy >= this


def plan_factory(config, *, density: float = 0.5, plans: Mapping[str, Plan] | None = None,
                 sink: int = DEFAULT_SINK, **moa_options) -> AttentionFactory:
  """Methods 'dense' (DenseAttention), 'uniform' (StreamingLLM windows at KV density `density`)
  and each named plan, the last two on MoA's static per-head cache (`MoAAttention`, options
  passed through). Memoized, so repeated batches reuse one compiled generate program."""
  plans = {name: plan.validate(config) for name, plan in (plans or {}).items()}
  for name in ("dense", "uniform"):
    if name in plans:
      raise ValueError(f"plan name {name!r} is reserved for the baseline; rename the plan")

  @functools.cache
  def factory(method: str, length: int) -> Attention:
    if method == "dense":
      return DenseAttention()
    if method == "uniform":
      return MoAAttention.from_plan(uniform_plan(config, density, length, sink=sink),
                                    **moa_options)
    if method in plans:
      return MoAAttention.from_plan(plans[method], **moa_options)
    raise ValueError(f"unknown method {method!r}; this factory knows "
                     f"{['dense', 'uniform', *sorted(plans)]}")

  return factory


# --- response cross-entropy --------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _next_token_nll(graphdef, state, tokens, positions, *, attention):
  """[B, T - 1] float32 -log p(tokens[:, 1:] | prefix), teacher-forced without a cache."""
  model = nnx.merge(graphdef, state)
  logits, _ = model(tokens[:, :-1], positions[:, :-1], attention=attention)  # [B, T-1, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def response_cross_entropy(model, prompts: Sequence[Sequence[int]],
                           answers: Sequence[Sequence[int]], *, attention: Attention | None = None,
                           pad_id: int = 0) -> np.ndarray:
  """float64 [B]: mean next-token cross-entropy (nats) of each answer given its prompt.

  One left-padded batch; `attention` (default dense) is used as in prefill, so for windowed
  methods it should be built for a planned length >= the longest prompt + answer.
  """
  if len(prompts) != len(answers) or any(not a for a in answers):
    raise ValueError("need one non-empty answer per prompt")
  tokens, positions = left_pad([list(p) + list(a) for p, a in zip(prompts, answers)], pad_id)
  graphdef, state = nnx.split(model)
  nll = np.asarray(_next_token_nll(graphdef, state, tokens, positions,
                                   attention=DenseAttention() if attention is None else attention))
  return np.array([nll[row, nll.shape[1] - len(a):].mean() for row, a in enumerate(answers)],
                  np.float64)


# --- synthetic tasks -----------------------------------------------------------------------------

def _decode(tokenizer, ids: Sequence[int], first_line: bool) -> str:
  text = tokenizer.decode(list(ids), skip_special_tokens=True)
  return text.strip().split("\n")[0] if first_line else text


def _batches(n: int, size: int) -> list[range]:
  return [range(i, min(i + size, n)) for i in range(0, n, size)]


def evaluate(model, tokenizer, *, methods: Sequence[str], attention_factory: AttentionFactory,
             tasks: Sequence[str] = ("lines",), lengths: Sequence[int] = (1024, 2048),
             depths: Sequence[float] = tasks_lib.DECILES, samples_per_depth: int = 1,
             seed: int = 0, max_new_tokens: int | None = None, batch_size: int = 8,
             first_line: bool = True, with_ce: bool = True, progress: bool = True,
             ) -> list[dict[str, Any]]:
  """Accuracy (and response CE) per method, task, length and depth decile.

  Every (task, length) uses the same seeded samples for every method: samples_per_depth at each
  of `depths`. Prompts go through the tokenizer's chat template if it has one
  (`calibration.prompts.chat_prompt_ids`); greedy decoding for max_new_tokens (default: twice the longest answer
  in tokens + 8); with first_line, only the first line of the decoded answer is scored.
  Returns records sorted by method, task, length, decile (see `save_results`).
  """
  eos = getattr(tokenizer, "eos_token_id", None)
  cells: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
  jobs = [(t, n) for t in tasks for n in lengths]
  bar = tqdm(total=len(jobs) * len(methods), desc="evaluate", disable=not progress)
  for task, length in jobs:
    samples = tasks_lib.make_samples(task, tokenizer, length, samples_per_depth * len(depths),
                                     seed=seed, depths=depths)
    prompts = [prompts_lib.chat_prompt_ids(tokenizer, s.prompt) for s in samples]
    answers = [prompts_lib.answer_ids(tokenizer, s.answer) for s in samples]
    new_tokens = max_new_tokens or 2 * max(len(a) for a in answers) + 8
    for method in methods:
      bar.set_postfix_str(f"{method} {task}@{length}")
      for batch in _batches(len(samples), batch_size):
        planned = max(len(prompts[i]) for i in batch) + new_tokens
        attention = attention_factory(method, planned)
        outputs = generate(model, [prompts[i] for i in batch], new_tokens, attention=attention,
                           eos_id=eos)
        ce = (response_cross_entropy(model, [prompts[i] for i in batch],
                                     [answers[i] for i in batch], attention=attention)
              if with_ce else [math.nan] * len(batch))
        for i, out, loss in zip(batch, outputs, ce):
          s = samples[i]
          prediction = _decode(tokenizer, out, first_line)
          cells.setdefault((method, task, length, s.decile), []).append(dict(
              score=metrics.score(s.metric, prediction, s.answer), depth=s.depth,
              tokens=len(prompts[i]), ce=float(loss), prediction=prediction, answer=s.answer))
      bar.update()
  bar.close()
  return [_record(key, rows) for key, rows in sorted(cells.items())]


def _record(key: tuple[str, str, int, int], rows: list[dict[str, Any]]) -> dict[str, Any]:
  method, task, length, decile = key
  ce = float(np.mean([r["ce"] for r in rows]))
  return dict(method=method, task=task, length=length, decile=decile, num_samples=len(rows),
              accuracy=float(np.mean([r["score"] for r in rows])),
              mean_depth=float(np.mean([r["depth"] for r in rows])),
              mean_tokens=float(np.mean([r["tokens"] for r in rows])),
              ce=None if math.isnan(ce) else ce,
              perplexity=None if math.isnan(ce) else math.exp(ce),
              predictions=[[r["prediction"], r["answer"]] for r in rows])


# --- summaries and files ---------------------------------------------------------------------

def accuracy_table(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
  """{method: {task: {length: accuracy over all depths (sample-weighted)}}}."""
  sums: dict[tuple[str, str, int], list[float]] = {}
  for r in records:
    total = sums.setdefault((r["method"], r["task"], r["length"]), [0.0, 0])
    total[0] += r["accuracy"] * r["num_samples"]
    total[1] += r["num_samples"]
  table: dict[str, dict[str, dict[int, float]]] = {}
  for (method, task, length), (score, count) in sorted(sums.items()):
    table.setdefault(method, {}).setdefault(task, {})[length] = score / count
  return table


def effective_context_length(records: Sequence[Mapping[str, Any]],
                             threshold: float = ACCURACY_THRESHOLD) -> dict[str, dict[str, int]]:
  """{method: {task: longest evaluated length with accuracy >= threshold (0 if none)}}."""
  return {method: {task: max([n for n, acc in by_length.items() if acc >= threshold], default=0)
                   for task, by_length in by_task.items()}
          for method, by_task in accuracy_table(records).items()}


def save_results(records: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                 meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Write {"meta", "summary": {accuracy, effective_context_length}, "records"} as JSON."""
  summary = {"accuracy": {m: {t: {str(n): a for n, a in by_n.items()} for t, by_n in by_t.items()}
                          for m, by_t in accuracy_table(records).items()},
             "effective_context_length": effective_context_length(records)}
  result = {"meta": dict(meta or {}), "summary": summary, "records": list(records)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  return result


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a results file written by `save_results`."""
  with open(path) as f:
    return json.load(f)["records"]


# --- LongBench -------------------------------------------------------------------------------

def truncate_middle(ids: Sequence[int], max_tokens: int) -> list[int]:
  """Keep the first and last max_tokens / 2 tokens (LongBench's truncation of long prompts)."""
  ids = list(ids)
  if len(ids) <= max_tokens:
    return ids
  half = max_tokens // 2
  return ids[:half] + ids[len(ids) - (max_tokens - half):]


def evaluate_longbench(model, tokenizer, records, *, methods: Sequence[str],
                       attention_factory: AttentionFactory, max_prompt_tokens: int,
                       batch_size: int = 4, progress: bool = True) -> list[dict[str, Any]]:
  """LongBench scores x 100 per method and length bucket on `records` (one dataset's records).

  Prompts longer than max_prompt_tokens are cut in the middle; each dataset's own
  max_new_tokens; one record per (method, dataset, bucket) with score and count.
  """
  records = list(records)
  if not records:
    raise ValueError("no LongBench records to evaluate")
  eos = getattr(tokenizer, "eos_token_id", None)
  prompts = [truncate_middle(prompts_lib.chat_prompt_ids(tokenizer, longbench_lib.build_prompt(r)),
                             max_prompt_tokens) for r in records]
  infos = [longbench_lib.dataset_info(r["dataset"]) for r in records]
  out = []
  for method in tqdm(methods, desc="longbench", disable=not progress):
    predictions: list[str] = []
    for batch in _batches(len(records), batch_size):
      new_tokens = max(infos[i].max_new_tokens for i in batch)
      attention = attention_factory(method, max(len(prompts[i]) for i in batch) + new_tokens)
      outputs = generate(model, [prompts[i] for i in batch], new_tokens, attention=attention,
                         eos_id=eos)
      predictions += [tokenizer.decode(o[:infos[i].max_new_tokens], skip_special_tokens=True)
                      for i, o in zip(batch, outputs)]
    by_dataset: dict[str, list[int]] = {}
    for i, r in enumerate(records):
      by_dataset.setdefault(r["dataset"], []).append(i)
    for dataset, rows in sorted(by_dataset.items()):
      scores = longbench_lib.evaluate_predictions([records[i] for i in rows],
                                                  [predictions[i] for i in rows])
      out += [dict(method=method, dataset=dataset, bucket=bucket, **value)
              for bucket, value in scores.items()]
  return out
