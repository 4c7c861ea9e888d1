"""Write the reference model's calibration source: {context, question} JSONL from the task suite.

  python experiments/make_calibration_tasks.py
    # -> moa_jax/assets/calibration/reference_tasks.jsonl
  python experiments/make_calibration_tasks.py --tasks passkey niah vt uuid lines \
      --out moa_jax/assets/calibration/reference_tasks_with_lines.jsonl

Long-range-dependency tasks (passkey, multi-key needle, variable tracking, UUID key-value); by
default LongEval line retrieval, the evaluation task, is left out; the second file adds it (other
seeds than the evaluation's, so no evaluation prompt is reused). Each task's needles are spread
evenly over the context (depths 0.05 ... 0.95), so that the profile sees long-range dependencies
at every distance, the farthest included. Records are sized to
about 90% of each target length's prompt budget so that calibration fits them without cutting
the needle out; the dense model's own answers are generated later by the compress pipeline.
"""

import json

import numpy as np
from absl import app, flags

from moa_jax.data import tasks
from moa_jax.models.hf import load_tokenizer
from moa_jax.models.loading import reference_model_dir
from moa_jax.workdir import atomic_write_text

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["passkey", "niah", "vt", "uuid"], "task names")
flags.DEFINE_list("lengths", ["1024", "2048", "3072", "4096"], "target lengths (tokens)")
flags.DEFINE_integer("per_task", 4, "records per task and length")
flags.DEFINE_integer("seed", 2024, "sample seed (other than any evaluation's)")
flags.DEFINE_string("out", "moa_jax/assets/calibration/reference_tasks.jsonl", "JSONL to write")


def main(argv):
  del argv
  args = FLAGS
  tokenizer = load_tokenizer(reference_model_dir())
  records = []
  for length in map(int, args.lengths):
    for task in args.tasks:
      depths = np.linspace(0.05, 0.95, args.per_task).tolist()
      for sample in tasks.make_samples(
        task, tokenizer, int(0.9 * length), args.per_task, seed=args.seed, depths=depths
      ):
        context, _, question = sample.prompt.rstrip("\n").rpartition("\n\n")
        records.append(
          {
            "context": context,
            "question": question,
            "task": task,
            "target_length": length,
            "depth": round(sample.depth, 3),
            "answer": sample.answer,
          }
        )
  atomic_write_text(args.out, "".join(json.dumps(record) + "\n" for record in records))
  print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
  app.run(main)
