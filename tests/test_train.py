"""moa_jax.train: tokenizer, data mixture, training-only attention, schedule, loop and resume."""

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.attention.fused import FusedCausalAttention
from moa_jax.attention.reference import reference_attention
from moa_jax.calibration import prompts
from moa_jax.train import data as train_data
from moa_jax.train import tokenizer as tok_lib
from moa_jax.train.trainer import Phase, learning_rate, phase_at, probe_accuracy, train

STDLIB_FILES = 12


@pytest.fixture(scope="module")
def corpus():
  """A few stdlib files' texts and a 512-token BPE trained on them plus task renders."""
  texts = tok_lib.read_sources(tok_lib.stdlib_sources()[:STDLIB_FILES])
  rng = np.random.default_rng(3)
  docs = [
    "".join(train_data.render_doc(rng, task, 6, extra_questions=1).segments)
    for task in train_data.TASK_NAMES
    for _ in range(4)
  ]
  tokenizer = tok_lib.train_tokenizer(texts + docs, vocab_size=512)
  natural = np.concatenate(
    [
      [tok_lib.BOS_ID] + e.ids + [tok_lib.EOS_ID]
      for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
  )
  return tokenizer, natural.astype(np.uint16)


def test_tokenizer_specials_digits_template_and_reload(corpus, tmp_path):
  tokenizer, _ = corpus
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
  ids = tokenizer.encode("x = 90417", add_special_tokens=False)
  assert [tokenizer.decode([i]) for i in ids[-5:]] == list("90417")
  messages = [
    {"role": "user", "content": "What is 3?"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "And 4?"},
  ]
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == (
    tok_lib.BOS
    + prompts.user_turn("What is 3?")
    + prompts.answer_turn("3", tok_lib.EOS)
    + prompts.user_turn("And 4?")
  )
  tokenizer.save_pretrained(tmp_path)
  from transformers import AutoTokenizer

  again = AutoTokenizer.from_pretrained(tmp_path)
  text = "def f(a):\n    return a * 271828  # e"
  assert again.encode(text) == tokenizer.encode(text)
  assert again.decode(again.encode(text)) == text


def test_stdlib_sources_exclude_site_packages():
  files = tok_lib.stdlib_sources()
  assert len(files) > 500 and all(f.suffix == ".py" for f in files)
  assert not any("site-packages" in f.parts or f.name.startswith("_sysconfigdata") for f in files)
  record = tok_lib.corpus_record(files[:3], tok_lib.read_sources(files[:3]))
  assert record["files"] == 3 and len(record["sha256"]) == 64


def test_mixture_batches_are_packed_weighted_and_deterministic(corpus):
  tokenizer, natural = corpus
  mix = train_data.Mixture(
    tokenizer,
    natural,
    {"lines": 0.8, "natural": 0.2},
    min_doc=256,
    answer_weight=3.0,
    full_row=0.7,
    seed=5,
  )
  batch = mix.batch(7, 4, 1024)
  again = mix.batch(7, 4, 1024)
  other = mix.batch(8, 4, 1024)
  for field in ("tokens", "positions", "targets", "weights"):
    assert np.array_equal(getattr(batch, field), getattr(again, field))
  assert not np.array_equal(batch.tokens, other.tokens)
  assert batch.tokens.shape == batch.targets.shape == batch.weights.shape == (4, 1024)
  assert np.array_equal(batch.tokens[:, 1:], batch.targets[:, :-1])
  assert np.array_equal(batch.positions, np.broadcast_to(np.arange(1024), (4, 1024)))
  assert set(np.unique(batch.weights)) <= {0.0, 1.0, 3.0}
  assert np.all(batch.weights[batch.targets == tok_lib.BOS_ID] == 0)
  assert (batch.weights == 3.0).sum() > 0
  # Every weighted answer is the value of the line its question asks about.
  checked = 0
  for row in range(4):
    text = tokenizer.decode(batch.tokens[row])
    values = dict(re.findall(r"line (\S+): REGISTER_CONTENT is <(\d+)>", text))
    for key, answer in re.findall(r"in line (\S+)\? I need the number\.\n ASSISTANT: (\d+)", text):
      assert values[key] == answer
      checked += 1
    answer_tokens = batch.targets[row][batch.weights[row] == 3.0]
    assert set(tokenizer.decode(answer_tokens, skip_special_tokens=True)) <= set("0123456789 ")
  assert checked >= 4


def test_fused_causal_attention_matches_reference():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 37, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 37, 2, 16)), jnp.float32) for _ in range(2))
  pos = jnp.broadcast_to(jnp.arange(37, dtype=jnp.int32), (2, 37))
  out, cache = FusedCausalAttention()(0, q, k, v, pos, None)
  ref = reference_attention(q, k, v, pos, pos)
  assert cache is None
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="no KV cache"):
    FusedCausalAttention()(0, q, k, v, pos, object())


def test_schedule_phases_and_probe_accuracy():
  phases = [Phase(0.0, 128, 8), Phase(0.5, 256, 4)]
  assert phase_at(phases, 0.0).seq_len == 128 and phase_at(phases, 0.7).seq_len == 256
  lrs = [learning_rate(s, s / 100, peak=1.0, warmup_steps=10, final_ratio=0.1) for s in range(100)]
  assert lrs[0] == pytest.approx(0.1, rel=1e-3) and max(lrs) <= 1.0
  assert lrs[9] == pytest.approx(1.0, rel=3e-2)
  assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
  assert learning_rate(99, 1.0, peak=1.0, warmup_steps=10, final_ratio=0.1) == pytest.approx(0.1)
  spans = [(0, 2, [8, 9]), (1, 2, [8, 9])]  # answer ids at positions 2, 3: predicted at 1, 2
  predictions = np.array([[5, 8, 9, 0, 0], [5, 8, 1, 0, 0]])
  assert probe_accuracy(predictions, spans) == 0.5


def _cfg(**changes):
  from configs import train_reference

  cfg = train_reference.get_config("tiny").train
  cfg.unlock()
  cfg.update(changes)
  return cfg


def _model_cfg(vocab):
  from configs import train_reference
  from moa_jax.models.config import LlamaConfig

  return LlamaConfig(
    vocab_size=vocab,
    bos_token_id=1,
    eos_token_ids=(2,),
    **train_reference.get_config("tiny").model.to_dict(),
  )


@pytest.mark.slow
def test_tiny_training_lowers_loss(corpus, tmp_path):
  tokenizer, natural = corpus
  _, state, log = train(_cfg(), _model_cfg(len(tokenizer)), tokenizer, natural, tmp_path)
  losses = [row["loss"] for row in log if "loss" in row]
  assert int(state["step"]) == 16 and len(losses) >= 4
  assert losses[-1] < losses[0] - 0.3
  assert np.isfinite(losses).all()


@pytest.mark.slow
def test_resume_from_checkpoint_is_identical(corpus, tmp_path):
  tokenizer, natural = corpus
  cfg = _cfg(steps=8, ckpt_every=4, phases=((0.0, 512, 2),), probe_lengths=(400,))
  model_cfg = _model_cfg(len(tokenizer))
  _, straight, _ = train(cfg, model_cfg, tokenizer, natural, tmp_path / "straight")
  _, first, _ = train(cfg, model_cfg, tokenizer, natural, tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")  # as if killed after step 4's save
  _, resumed, _ = train(cfg, model_cfg, tokenizer, natural, tmp_path / "resumed")
  assert int(resumed["step"]) == 8
  for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(first["opt_state"]), jax.tree.leaves(resumed["opt_state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
