"""Chat templating: the one place where a user turn becomes the token ids a model is fed.

Calibration, evaluation, generation and the reference model's training data all render prompts
here, so a model sees the same format when it is profiled and when it is evaluated.

Templates: 'auto' is the tokenizer's own chat template, or the raw text with the tokenizer's
special tokens (BOS) when it has none; 'none' is always the raw text; 'vicuna', 'llama3',
'chatml' and 'reference' are built in (Jinja, rendered by transformers' apply_chat_template).
"""

from __future__ import annotations

from typing import Any

# "<s>USER: {question} ASSISTANT: {answer}</s>USER: ..." (the reference model's format: Vicuna
# v1.1 without a system prompt). `user_turn` / `answer_turn` write the same text by hand for the
# reference model's training documents.
REFERENCE = (
  "{{ bos_token }}"
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}USER: {{ message['content'] }} ASSISTANT:"
  "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
  "{% else %}{{ raise_exception('roles are user and assistant') }}{% endif %}"
  "{% endfor %}"
)

CHAT_TEMPLATES = {
  # Vicuna v1.1: system line, then " USER: ... ASSISTANT: ...</s>".
  "vicuna": (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "A chat between a curious user and an artificial intelligence assistant. The assistant"
    " gives helpful, detailed, and polite answers to the user's questions."
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ message['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
  ),
  # Llama-3 instruct: header tokens around each role, <|eot_id|> after each turn.
  "llama3": (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
  ),
  # ChatML (SmolLM2, Qwen): <|im_start|>role\n...<|im_end|>\n.
  "chatml": (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
  ),
  "reference": REFERENCE,
}
TEMPLATE_NAMES = ("auto", "none", *CHAT_TEMPLATES)
# Tokens that end an assistant turn in the built-in templates, besides the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


def check_template(template: str) -> str:
  """`template` if it is a known name, else a one-line ValueError listing the valid ones."""
  if template not in TEMPLATE_NAMES:
    raise ValueError(f"unknown chat template {template!r}; choose one of {TEMPLATE_NAMES}")
  return template


def resolve_template(tokenizer: Any, template: str = "auto") -> tuple[str, str | None]:
  """(name, Jinja string) of the template to use; the string is None for the raw text."""
  check_template(template)
  if template == "auto":
    own = getattr(tokenizer, "chat_template", None)
    return ("tokenizer", own) if own else ("none", None)
  if template == "none":
    return "none", None
  return template, CHAT_TEMPLATES[template]


def chat_prompt_ids(tokenizer: Any, user_text: str, template: str = "auto") -> list[int]:
  """Token ids of one user turn and the assistant's generation prompt (or the raw text)."""
  _, jinja = resolve_template(tokenizer, template)
  if jinja is None:
    return list(tokenizer.encode(user_text))
  text = tokenizer.apply_chat_template(
    [{"role": "user", "content": user_text}],
    chat_template=jinja,
    add_generation_prompt=True,
    tokenize=False,
  )
  return list(tokenizer.encode(text, add_special_tokens=False))


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
  """Token ids of an answer continuing a prompt (no special tokens added)."""
  return list(tokenizer.encode(answer, add_special_tokens=False))


def stop_ids(tokenizer: Any, eos_token_ids: tuple[int, ...] = ()) -> tuple[int, ...]:
  """Every id that ends an answer: the model's and tokenizer's EOS and end-of-turn tokens."""
  ids = set(eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(tokenizer.eos_token_id)
  vocab = tokenizer.get_vocab()
  ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
  return tuple(sorted(ids))


def user_turn(content: str) -> str:
  """One user turn of the reference template, ready for the answer (after BOS)."""
  return f"USER: {content} ASSISTANT:"


def answer_turn(answer: str, eos: str) -> str:
  """The assistant's answer in the reference template."""
  return f" {answer}{eos}"
