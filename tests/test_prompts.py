"""Chat templating: one rule for calibration, evaluation and generation."""

import pytest
from transformers import AutoTokenizer

from moa_jax.calibration import prompts
from moa_jax.models.loading import reference_model_dir


@pytest.fixture(scope="module")
def reference_tokenizer():
  return AutoTokenizer.from_pretrained(reference_model_dir())


def test_auto_uses_the_tokenizers_own_template(reference_tokenizer):
  tok = reference_tokenizer
  ids = prompts.chat_prompt_ids(tok, "Tell me a number.")
  assert tok.decode(ids).replace(" ", "") == "<s>USER:Tellmeanumber.ASSISTANT:"
  assert ids.count(tok.bos_token_id) == 1
  assert ids == prompts.chat_prompt_ids(tok, "Tell me a number.", "reference")
  assert prompts.stop_ids(tok) == (tok.eos_token_id,)


def test_none_and_auto_without_template_give_the_raw_prompt(reference_tokenizer):
  tok = reference_tokenizer
  raw = prompts.chat_prompt_ids(tok, "Tell me a number.", "none")
  assert raw == list(tok.encode("Tell me a number."))
  own, tok.chat_template = tok.chat_template, None
  try:
    assert prompts.chat_prompt_ids(tok, "Tell me a number.") == raw
  finally:
    tok.chat_template = own


@pytest.mark.parametrize(
  "name, head, tail",
  [
    ("chatml", "<|im_start|>user\nHi?<|im_end|>", "<|im_start|>assistant\n"),
    (
      "llama3",
      "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>",
      "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    ("vicuna", "A chat between a curious user", " USER: Hi? ASSISTANT:"),
  ],
)
def test_built_in_templates_render(reference_tokenizer, name, head, tail):
  text = reference_tokenizer.apply_chat_template(
    [{"role": "user", "content": "Hi?"}],
    chat_template=prompts.CHAT_TEMPLATES[name],
    add_generation_prompt=True,
    tokenize=False,
  )
  assert head in text and text.endswith(tail)


def test_reference_turns_match_the_template(reference_tokenizer):
  tok = reference_tokenizer
  text = tok.apply_chat_template(
    [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], tokenize=False
  )
  assert text == tok.bos_token + prompts.user_turn("Q?") + prompts.answer_turn("A.", tok.eos_token)


def test_unknown_template_is_one_line():
  with pytest.raises(ValueError, match=r"unknown chat template 'alpaca'; choose one of"):
    prompts.check_template("alpaca")
