"""LongBench (THUDM/LongBench) through `datasets`: loading, schema and prompts.

Records keep LongBench's schema: input, context, answers (list), length (words, or characters
for Chinese), dataset, language, all_classes (list or null), _id. With a hub reachable,
`load_longbench(subset)` reads `THUDM/LongBench`; offline, `load_longbench(subset,
data_dir=...)` reads `<data_dir>/<subset>.jsonl` (the layout of LongBench's data.zip; LongBench-E
subsets end in `_e`). The prompt templates are ours, with the intent of LongBench's per-dataset
ones. Scoring is `moa_jax.eval.longbench`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `datasets` is imported where data is loaded (the GPU image lacks it)
  import datasets

HUB_ID = "THUDM/LongBench"
FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")

_QA = (
  "Answer the question based on the given passages. Only give me the answer and do not"
  " output any other words.\n\n{context}\n\nQuestion: {input}\nAnswer:"
)
_QA_ZH = "阅读以下文字并用中文简短回答，只给出答案。\n\n{context}\n\n问题：{input}\n回答："
_SUMMARY = "Write a one-page summary of the report below.\n\n{context}\n\nSummary:"
_FEW_SHOT = "{context}\n{input}"
_CODE = "Complete the code below.\n{context}{input}Next line of code:\n"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """How one LongBench dataset is prompted.

  max_new_tokens: LongBench's generation budget; template: str.format template over a record's
  fields.
  """

  max_new_tokens: int
  template: str


DATASETS: dict[str, DatasetInfo] = {
  "narrativeqa": DatasetInfo(128, _QA),
  "qasper": DatasetInfo(128, _QA),
  "multifieldqa_en": DatasetInfo(64, _QA),
  "multifieldqa_zh": DatasetInfo(64, _QA_ZH),
  "hotpotqa": DatasetInfo(32, _QA),
  "2wikimqa": DatasetInfo(32, _QA),
  "musique": DatasetInfo(32, _QA),
  "dureader": DatasetInfo(128, _QA_ZH),
  "gov_report": DatasetInfo(512, _SUMMARY),
  "qmsum": DatasetInfo(
    512,
    "Answer the query about the meeting transcript below in one or"
    " more sentences.\n\n{context}\n\nQuery: {input}\nAnswer:",
  ),
  "multi_news": DatasetInfo(
    512, "Write a one-page summary of all the news below.\n\n{context}\n\nSummary:"
  ),
  "vcsum": DatasetInfo(512, "为下面的会议记录写一段总结。\n\n{context}\n\n总结："),
  "trec": DatasetInfo(
    64,
    "Determine the type of the question below. Here are some examples"
    " of questions.\n\n" + _FEW_SHOT,
  ),
  "triviaqa": DatasetInfo(
    32,
    "Answer the question based on the passage. Only give the answer."
    " Here are some examples.\n\n" + _FEW_SHOT,
  ),
  "samsum": DatasetInfo(
    128,
    "Summarize the dialogue into a few short sentences. Here are some examples.\n\n" + _FEW_SHOT,
  ),
  "lsht": DatasetInfo(64, "判断新闻的类别。下面是一些例子。\n\n" + _FEW_SHOT),
  "passage_count": DatasetInfo(
    32,
    "Below are several paragraphs, some of which may be"
    " duplicates. How many unique paragraphs are there after"
    " removing duplicates?\n\n{context}\n\nAnswer with a number"
    " only.\nThe final answer is: ",
  ),
  "passage_retrieval_en": DatasetInfo(
    32,
    "Here are paragraphs and an abstract. Which"
    " paragraph is the abstract from?\n\n{context}\n\n"
    'Abstract: {input}\n\nAnswer as "Paragraph k".\n'
    "The answer is: ",
  ),
  "passage_retrieval_zh": DatasetInfo(
    32,
    "以下是若干段落和一个摘要。摘要来自哪一段？"
    "\n\n{context}\n\n摘要：{input}\n\n请按“段落k”的格式回答。\n"
    "答案是：",
  ),
  "lcc": DatasetInfo(64, _CODE),
  "repobench-p": DatasetInfo(64, _CODE),
}


def dataset_info(name: str) -> DatasetInfo:
  """The DatasetInfo of a LongBench or LongBench-E (`<name>_e`) dataset."""
  base = name.removesuffix("_e")
  if base not in DATASETS:
    raise ValueError(f"unknown LongBench dataset {name!r}; choose one of {sorted(DATASETS)}")
  return DATASETS[base]


def load_longbench(
  subset: str, *, data_dir: str | os.PathLike | None = None, cache_dir: str | None = None
) -> datasets.Dataset:
  """A LongBench subset: `<data_dir>/<subset>.jsonl` if data_dir is given, else the hub's."""
  import datasets

  dataset_info(subset)
  if data_dir is not None:
    path = os.path.join(data_dir, f"{subset}.jsonl")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: data_dir must hold LongBench's <subset>.jsonl")
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
  else:
    try:
      ds = datasets.load_dataset(HUB_ID, subset, split="test", cache_dir=cache_dir)
    except Exception as error:  # no network, no such config, a datasets version without scripts
      raise FileNotFoundError(
        f"cannot load {HUB_ID}/{subset} from the hub ({error}); pass "
        "data_dir=<folder with LongBench's jsonl files>"
      ) from error
  missing = [f for f in FIELDS if f not in ds.column_names]
  if missing:
    raise ValueError(f"{subset}: records lack LongBench fields {missing}")
  return ds


def build_prompt(record: Mapping[str, Any]) -> str:
  """The task prompt of one record (its dataset's template filled with context and input)."""
  return dataset_info(record["dataset"]).template.format(
    context=record["context"], input=record["input"]
  )
