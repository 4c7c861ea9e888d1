"""Compare attention methods (dense, uniform window, MoA plans) cell by cell, each on its own cache.

A cell is one (method, task, length). Its inputs (`CellInputs`: prompts, targets, how many
tokens to generate) are built once per (task, length) and shared by every method:
  * synthetic tasks (`moa_jax.data.tasks`): greedy answers scored by the task's metric, and the
    response cross-entropy of the expected answer; one record per needle-depth decile;
  * LongBench datasets (`longbench/<dataset>`): prompts cut in the middle to the cell's length,
    scored by LongBench's own metric (`moa_jax.eval.longbench`); one record with its buckets;
  * long natural text (`longtext`, `moa_jax.data.longtext`): the cross-entropy of the last
    tokens of each document given the rest of the cell's window; one record.
Every method prefills each batch once on its own cache (`moa_jax.generate.Conversation`), scores
the targets teacher-forced through that cache and decodes its answers greedily on it
(`run_prompts`).

Shapes are bucketed so that a cell compiles its programs once: the prompts of a cell are
grouped into buckets of one padded length T (a multiple of 64; every prompt of a bucket at least
3/4 of T), each bucket runs in batches of exactly `batch_size` rows (filler rows repeat a real
one and are dropped), and the attention comes from `AttentionFactory(method, N)` at the bucket's
planned total length N = T + new (or scored) tokens, which fixes every elastic rule's window
(docs/method.md). `plan_factory` is the default factory: DenseAttention for 'dense', and MoA's
attention on its static per-head cache (`MoAAttention`) for 'uniform' (StreamingLLM at the same
KV density, `plans.plan.uniform_plan`) and every named plan.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax import generate as generate_lib
from moa_jax.attention.base import Attention
from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.calibration import prompts as prompts_lib
from moa_jax.data import longbench as longbench_lib
from moa_jax.data import longtext as longtext_lib
from moa_jax.data import tasks as tasks_lib
from moa_jax.eval import metrics
from moa_jax.plans.plan import Plan, uniform_plan
from moa_jax.plans.rules import DEFAULT_SINK
from moa_jax.workdir import atomic_write_text

AttentionFactory = Callable[[str, int], Attention]  # (method, planned total length N) -> Attention
ACCURACY_THRESHOLD = 0.9  # effective context length: longest length with accuracy >= this
LONGBENCH_PREFIX = "longbench/"
LONGTEXT = "longtext"
PAD_MULTIPLE = 64  # padded prompt lengths are multiples of this
BUCKET_FILL = 0.75  # every prompt of a shape bucket is at least this share of its padded length


def plan_factory(
  config,
  *,
  density: float = 0.5,
  plans: Mapping[str, Plan] | None = None,
  sink: int = DEFAULT_SINK,
  **moa_options,
) -> AttentionFactory:
  """Methods 'dense' (DenseAttention), 'uniform' (StreamingLLM windows at KV density `density`)
  and each named plan, the last two on MoA's static per-head cache (`MoAAttention`, options
  passed through). Memoized, so every batch of a shape bucket reuses one compiled program."""
  plans = {name: plan.validate(config) for name, plan in (plans or {}).items()}
  for name in ("dense", "uniform"):
    if name in plans:
      raise ValueError(f"plan name {name!r} is reserved for the baseline; rename the plan")

  @functools.cache
  def factory(method: str, length: int) -> Attention:
    if method == "dense":
      return DenseAttention()
    if method == "uniform":
      return MoAAttention.from_plan(uniform_plan(config, density, length, sink=sink), **moa_options)
    if method in plans:
      return MoAAttention.from_plan(plans[method], **moa_options)
    raise ValueError(
      f"unknown method {method!r}; this factory knows {['dense', 'uniform', *sorted(plans)]}"
    )

  return factory


# --- shape buckets and batches -------------------------------------------------------------------


def shape_buckets(
  lengths: Sequence[int], multiple: int = PAD_MULTIPLE, fill: float = BUCKET_FILL
) -> list[tuple[int, list[int]]]:
  """Group rows by length: [(padded length T, row indices)], T a multiple of `multiple`, every
  row of a bucket at least fill * T long; longest bucket first."""
  buckets: list[tuple[int, list[int]]] = []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    if not buckets or lengths[i] < fill * buckets[-1][0]:
      buckets.append((-(-lengths[i] // multiple) * multiple, []))
    buckets[-1][1].append(i)
  return [(t, sorted(rows)) for t, rows in buckets]


def _full_batches(rows: Sequence[int], size: int) -> Iterator[tuple[list[int], int]]:
  """(batch of exactly `size` rows, number of real rows): the last batch repeats its first row."""
  for start in range(0, len(rows), size):
    batch = list(rows[start : start + size])
    yield batch + [batch[0]] * (size - len(batch)), len(batch)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _forced_decode_jit(graphdef, state, logits, caches, lengths, targets, *, attention):
  """[B, M] float32 -log p(targets[:, j] | prompt, targets[:, :j]): logits [B, V] after the
  prompt (prefilled into `caches`, each row's next position in lengths [B]), then the targets
  [B, M] fed one per decode step (on a copy: the caches passed in stay as they were)."""
  model = nnx.merge(graphdef, state)

  def nll(logits, target):  # [B, V], [B] -> [B]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]

  def step(caches, j):
    out, caches = model(
      targets[:, j, None], (lengths + j)[:, None], attention=attention, caches=caches
    )
    return caches, nll(out[:, 0], targets[:, j + 1])

  _, rest = jax.lax.scan(step, caches, jnp.arange(targets.shape[1] - 1))  # [M - 1, B]
  return jnp.concatenate([nll(logits, targets[:, 0])[:, None], rest.T], axis=1)


def run_prompts(
  model,
  prompts: Sequence[Sequence[int]],
  method: str,
  attention_factory: AttentionFactory,
  *,
  batch_size: int,
  new_tokens: int = 0,
  targets: Sequence[Sequence[int]] | None = None,
  eos_ids: Sequence[int] | None = None,
  prefill_chunk: int | None = None,
  pad_id: int = 0,
) -> tuple[list[list[int]], list[np.ndarray]]:
  """Greedy answers and teacher-forced target cross-entropies, from one prefill per batch on
  the method's own cache.

  Prompts run in shape buckets (`shape_buckets`, padded length T) of full batches, on the
  attention at the planned total length N = T + max(new_tokens, longest target) (the cache
  size). Per batch: `generate.Conversation.append` prefills the prompts; the targets are fed
  one per decode step (`_forced_decode_jit`, on a copy of the prefilled cache); then `reply`
  decodes new_tokens greedily (eos_ids: None = the model's; () = never stop).
  Returns, per prompt, the new tokens up to and including the first eos ([] when new_tokens
  is 0) and the float64 [len(target)] cross-entropies in nats (empty without targets).
  """
  if targets is not None and (len(targets) != len(prompts) or not all(targets)):
    raise ValueError("need one non-empty target per prompt")
  m = max(map(len, targets)) if targets is not None else 0
  if new_tokens < 1 and m == 0:
    raise ValueError("run_prompts needs new_tokens >= 1 or targets")
  graphdef, state = nnx.split(model)
  outputs: list[list[int]] = [[] for _ in prompts]
  scores: list[np.ndarray] = [np.zeros(0) for _ in prompts]
  for t, rows in shape_buckets([len(p) for p in prompts]):
    planned = t + max(new_tokens, m)
    attention = attention_factory(method, planned)
    for batch, real in _full_batches(rows, batch_size):
      conversation = generate_lib.Conversation(
        model,
        len(batch),
        planned,
        attention=attention,
        prefill_chunk=prefill_chunk,
        pad_id=pad_id,
        pad_multiple=t,
      )
      logits = conversation.append([prompts[i] for i in batch])
      if targets is not None:
        padded = np.full((len(batch), m), pad_id, np.int32)
        for row, i in enumerate(batch):
          padded[row, : len(targets[i])] = targets[i]
        nll = np.asarray(
          _forced_decode_jit(
            graphdef,
            state,
            logits,
            conversation.caches,
            jnp.asarray(conversation.lengths),
            padded,
            attention=attention,
          ),
          np.float64,
        )
        for row, i in enumerate(batch[:real]):
          scores[i] = nll[row, : len(targets[i])]
      if new_tokens:
        replies = conversation.reply(new_tokens, eos_id=None if eos_ids is None else tuple(eos_ids))
        for i, reply in zip(batch[:real], replies):
          outputs[i] = reply
  return outputs, scores


def response_cross_entropy(
  model,
  prompts: Sequence[Sequence[int]],
  answers: Sequence[Sequence[int]],
  *,
  attention: Attention | None = None,
  pad_id: int = 0,
) -> np.ndarray:
  """float64 [B]: mean next-token cross-entropy (nats) of each answer given its prompt, on the
  cache of `attention` (default dense; one attention for every bucket)."""
  attention = DenseAttention() if attention is None else attention
  _, nll = run_prompts(
    model,
    prompts,
    "",
    lambda method, n: attention,
    targets=answers,
    batch_size=len(prompts),
    pad_id=pad_id,
  )
  return np.array([row.mean() for row in nll], np.float64)


# --- cells -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CellInputs:
  """What every method of one (task, length) cell is fed.

  prompts: token ids; targets: the expected answer's ids (cross-entropy), the scored
  continuation (longtext) or none (LongBench); new_tokens: tokens to generate (0: score the
  targets only); items: per prompt a tasks.Sample, a LongBench record or a document name.
  """

  task: str
  length: int
  prompts: list[list[int]]
  targets: list[list[int]]
  new_tokens: int
  items: list[Any]


def task_kind(task: str) -> str:
  """'synthetic', 'longbench' or 'longtext' for a task name; ValueError for an unknown one."""
  if task in tasks_lib.TASKS:
    return "synthetic"
  if task == LONGTEXT:
    return "longtext"
  if task.startswith(LONGBENCH_PREFIX):
    longbench_lib.dataset_info(task.removeprefix(LONGBENCH_PREFIX))
    return "longbench"
  raise ValueError(
    f"unknown task {task!r}; choose one of {sorted(tasks_lib.TASKS)}, "
    f"'{LONGTEXT}' or '{LONGBENCH_PREFIX}<dataset>'"
  )


def synthetic_inputs(
  tokenizer,
  task: str,
  length: int,
  *,
  depths: Sequence[float] = tasks_lib.DECILES,
  samples_per_depth: int = 1,
  seed: int = 0,
  max_new_tokens: int | None = None,
  template: str = "auto",
) -> CellInputs:
  """samples_per_depth seeded samples at each depth; new tokens default to twice the longest
  answer + 8."""
  samples = tasks_lib.make_samples(
    task, tokenizer, length, samples_per_depth * len(depths), seed=seed, depths=depths
  )
  answers = [prompts_lib.answer_ids(tokenizer, s.answer) for s in samples]
  return CellInputs(
    task,
    length,
    [prompts_lib.chat_prompt_ids(tokenizer, s.prompt, template) for s in samples],
    answers,
    max_new_tokens or 2 * max(len(a) for a in answers) + 8,
    samples,
  )


def truncate_middle(ids: Sequence[int], max_tokens: int) -> list[int]:
  """Keep the first and last max_tokens / 2 tokens (LongBench's truncation of long prompts)."""
  ids = list(ids)
  if len(ids) <= max_tokens:
    return ids
  half = max_tokens // 2
  return ids[:half] + ids[len(ids) - (max_tokens - half) :]


def longbench_inputs(
  tokenizer,
  records: Sequence[Mapping[str, Any]],
  length: int,
  *,
  task: str | None = None,
  template: str = "auto",
) -> CellInputs:
  """One LongBench dataset's records (task default 'longbench/<their dataset>'); a prompt over
  `length` tokens keeps its first and last halves (cut in the task text, before the chat
  template, as LongBench does)."""
  if not records:
    raise ValueError("no LongBench records to evaluate")
  task = task or f"{LONGBENCH_PREFIX}{records[0]['dataset']}"
  dataset = task.removeprefix(LONGBENCH_PREFIX)
  overhead = len(prompts_lib.chat_prompt_ids(tokenizer, "", template))
  prompts = []
  for record in records:
    text_ids = tokenizer.encode(longbench_lib.build_prompt(record), add_special_tokens=False)
    kept = truncate_middle(text_ids, max(length - overhead, 2))
    if len(kept) < len(text_ids):
      half = len(kept) // 2
      text = tokenizer.decode(kept[:half], skip_special_tokens=True) + tokenizer.decode(
        kept[half:], skip_special_tokens=True
      )
    else:
      text = longbench_lib.build_prompt(record)
    prompts.append(prompts_lib.chat_prompt_ids(tokenizer, text, template))
  return CellInputs(
    task, length, prompts, [], longbench_lib.dataset_info(dataset).max_new_tokens, list(records)
  )


def longtext_inputs(
  tokenizer, documents: Sequence[longtext_lib.Document], length: int, *, target_tokens: int
) -> CellInputs:
  """Each document's last `length` tokens: context, then `target_tokens` scored tokens."""
  windows = [longtext_lib.scored_window(tokenizer, d, length, target_tokens) for d in documents]
  return CellInputs(
    LONGTEXT,
    length,
    [c for c, _ in windows],
    [t for _, t in windows],
    0,
    [d.name for d in documents],
  )


def _decode(tokenizer, ids: Sequence[int], first_line: bool) -> str:
  text = tokenizer.decode(list(ids), skip_special_tokens=True)
  return text.strip().split("\n")[0] if first_line else text


def evaluate_cell(
  model,
  tokenizer,
  inputs: CellInputs,
  method: str,
  attention_factory: AttentionFactory,
  *,
  batch_size: int = 8,
  with_ce: bool = True,
  first_line: bool = True,
  prefill_chunk: int | None = None,
) -> list[dict[str, Any]]:
  """The records of one (method, task, length) cell (see the module docstring); prefill_chunk
  bounds the tokens of one prefill call (None: the whole prompt at once)."""
  kind = task_kind(inputs.task)
  options = dict(batch_size=batch_size, prefill_chunk=prefill_chunk)
  base = dict(method=method, task=inputs.task, length=inputs.length)
  mean_tokens = float(np.mean([len(p) for p in inputs.prompts]))
  if kind == "longtext":
    _, nll = run_prompts(
      model, inputs.prompts, method, attention_factory, targets=inputs.targets, **options
    )
    ce = float(np.mean([row.mean() for row in nll]))
    return [
      dict(
        base,
        decile=None,
        num_samples=len(nll),
        accuracy=None,
        mean_tokens=mean_tokens + len(inputs.targets[0]),
        target_tokens=len(inputs.targets[0]),
        ce=ce,
        perplexity=math.exp(ce),
        documents=list(inputs.items),
        document_ce=[float(row.mean()) for row in nll],
      )
    ]
  eos = prompts_lib.stop_ids(tokenizer, tuple(model.config.eos_token_ids))
  scored = kind == "synthetic" and with_ce
  outputs, nll = run_prompts(
    model,
    inputs.prompts,
    method,
    attention_factory,
    new_tokens=inputs.new_tokens,
    targets=inputs.targets if scored else None,
    eos_ids=eos,
    **options,
  )
  if kind == "longbench":
    from moa_jax.eval import longbench as scoring  # rouge, fuzzywuzzy, jieba: not on GPU images

    predictions = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    scores = scoring.evaluate_predictions(inputs.items, predictions)
    return [
      dict(
        base,
        decile=None,
        num_samples=len(outputs),
        accuracy=scores["all"]["score"] / 100,
        score=scores["all"]["score"],
        buckets={k: v for k, v in scores.items() if k != "all"},
        mean_tokens=mean_tokens,
        ce=None,
        perplexity=None,
        predictions=[[p, list(r["answers"])] for p, r in zip(predictions, inputs.items)],
      )
    ]
  ces = [float(row.mean()) for row in nll] if scored else [math.nan] * len(outputs)
  by_decile: dict[int, list[dict[str, Any]]] = {}
  for sample, prompt, out, ce in zip(inputs.items, inputs.prompts, outputs, ces):
    prediction = _decode(tokenizer, out, first_line)
    by_decile.setdefault(sample.decile, []).append(
      dict(
        score=metrics.score(sample.metric, prediction, sample.answer),
        depth=sample.depth,
        tokens=len(prompt),
        ce=ce,
        prediction=prediction,
        answer=sample.answer,
      )
    )
  return [_record(base, decile, rows) for decile, rows in sorted(by_decile.items())]


def _record(base: Mapping[str, Any], decile: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
  ce = float(np.mean([r["ce"] for r in rows]))
  return dict(
    base,
    decile=decile,
    num_samples=len(rows),
    accuracy=float(np.mean([r["score"] for r in rows])),
    mean_depth=float(np.mean([r["depth"] for r in rows])),
    mean_tokens=float(np.mean([r["tokens"] for r in rows])),
    ce=None if math.isnan(ce) else ce,
    perplexity=None if math.isnan(ce) else math.exp(ce),
    predictions=[[r["prediction"], r["answer"]] for r in rows],
  )


def evaluate(
  model,
  tokenizer,
  *,
  methods: Sequence[str],
  attention_factory: AttentionFactory,
  tasks: Sequence[str] = ("lines",),
  lengths: Sequence[int] = (1024, 2048),
  depths: Sequence[float] = tasks_lib.DECILES,
  samples_per_depth: int = 1,
  seed: int = 0,
  max_new_tokens: int | None = None,
  batch_size: int = 8,
  first_line: bool = True,
  with_ce: bool = True,
  template: str = "auto",
  prefill_chunk: int | None = None,
  progress: bool = True,
) -> list[dict[str, Any]]:
  """Accuracy (and response CE) per method, synthetic task, length and depth decile.

  Every (task, length) uses the same seeded samples for every method (`synthetic_inputs`);
  with first_line, only the first line of the decoded answer is scored. Returns records sorted
  by method, task, length, decile (see `save_results`).
  """
  records = []
  bar = tqdm(total=len(tasks) * len(lengths) * len(methods), desc="evaluate", disable=not progress)
  for task in tasks:
    for length in lengths:
      inputs = synthetic_inputs(
        tokenizer,
        task,
        length,
        depths=depths,
        samples_per_depth=samples_per_depth,
        seed=seed,
        max_new_tokens=max_new_tokens,
        template=template,
      )
      for method in methods:
        bar.set_postfix_str(f"{method} {task}@{length}")
        records += evaluate_cell(
          model,
          tokenizer,
          inputs,
          method,
          attention_factory,
          batch_size=batch_size,
          with_ce=with_ce,
          first_line=first_line,
          prefill_chunk=prefill_chunk,
        )
        bar.update()
  bar.close()
  return sorted(records, key=lambda r: (r["method"], r["task"], r["length"], r["decile"]))


# --- summaries and files ---------------------------------------------------------------------


def _table(records, field: str) -> dict[str, dict[str, dict[int, float]]]:
  """{method: {task: {length: sample-weighted mean of `field`}}} over records that have it."""
  sums: dict[tuple[str, str, int], list[float]] = {}
  for r in records:
    if r.get(field) is not None:
      total = sums.setdefault((r["method"], r["task"], r["length"]), [0.0, 0])
      total[0] += r[field] * r["num_samples"]
      total[1] += r["num_samples"]
  table: dict[str, dict[str, dict[int, float]]] = {}
  for (method, task, length), (value, count) in sorted(sums.items()):
    table.setdefault(method, {}).setdefault(task, {})[length] = value / count
  return table


def accuracy_table(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
  """{method: {task: {length: accuracy over all depths (sample-weighted)}}}; LongBench scores
  count as accuracy / 100, longtext (no accuracy) is left out."""
  return _table(records, "accuracy")


def perplexity_table(
  records: Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, dict[int, float]]]:
  """{method: {task: {length: exp(mean cross-entropy)}}} for the records with a cross-entropy."""
  return {
    m: {t: {n: math.exp(ce) for n, ce in by_n.items()} for t, by_n in by_t.items()}
    for m, by_t in _table(records, "ce").items()
  }


def effective_context_length(
  records: Sequence[Mapping[str, Any]], threshold: float = ACCURACY_THRESHOLD
) -> dict[str, dict[str, int]]:
  """{method: {synthetic task: longest evaluated length with accuracy >= threshold (0 if none)}}."""
  synthetic = [r for r in records if r["task"] in tasks_lib.TASKS]
  return {
    method: {
      task: max([n for n, acc in by_length.items() if acc >= threshold], default=0)
      for task, by_length in by_task.items()
    }
    for method, by_task in accuracy_table(synthetic).items()
  }


def _str_keys(table):
  return {
    m: {t: {str(n): v for n, v in by_n.items()} for t, by_n in by_t.items()}
    for m, by_t in table.items()
  }


def save_results(
  records: Sequence[Mapping[str, Any]],
  path: str | os.PathLike,
  meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Write {"meta", "summary": {accuracy, perplexity, effective_context_length}, "records"}."""
  summary = {
    "accuracy": _str_keys(accuracy_table(records)),
    "perplexity": _str_keys(perplexity_table(records)),
    "effective_context_length": effective_context_length(records),
  }
  result = {"meta": dict(meta or {}), "summary": summary, "records": list(records)}
  atomic_write_text(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
  return result


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a results file written by `save_results`."""
  with open(path) as f:
    return json.load(f)["records"]
