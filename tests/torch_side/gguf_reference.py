"""transformers' own GGUF load of a real model as the reference for tests/test_gguf_parity.py.

Runs in the Python 3.11 side environment (torch CPU + transformers + gguf + accelerate), never
imported by moa_jax. Usage: python gguf_reference.py REQUEST.json OUTPUT.npz

The request names `gguf` (a .gguf file), `converted` (the HF directory moa_jax's convert wrote
from it), `prompts` (token id lists), `max_new_tokens` and `texts`. Recorded: for the model
transformers dequantizes from the GGUF file, each prompt's float32 logits [T, V] and its greedy
continuation (eos ignored) with each step's top-2 tokens and logit margin; for the converted
directory (loaded strictly), each prompt's logits; the token ids of every text under the
tokenizer transformers rebuilds from the GGUF file and under the converted directory's tokenizer,
and both tokenizers' special token ids.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM


def logits_of(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


def greedy(model, ids, new_tokens):
  """(tokens, top-2 [new, 2], margin [new]) of a greedy continuation that never stops early."""
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = model.generate(
      torch.tensor([ids], dtype=torch.long),
      max_new_tokens=new_tokens,
      do_sample=False,
      pad_token_id=0,
      return_dict_in_generate=True,
      output_logits=True,
    )
  logits = torch.stack(out.logits, dim=1)[0].float()  # [new, V]
  top2 = logits.topk(2, dim=-1)
  return (
    out.sequences[0, len(ids) :].numpy(),
    top2.indices.numpy(),
    (top2.values[:, 0] - top2.values[:, 1]).numpy(),
  )


def special_ids(tokenizer):
  return np.asarray(
    [
      -1 if i is None else i
      for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ]
  )


def main(request_file, output_file):
  request = json.loads(Path(request_file).read_text())
  torch.set_num_threads(2)
  gguf = Path(request["gguf"])
  out = {}
  model = AutoModelForCausalLM.from_pretrained(
    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  for i, ids in enumerate(request["prompts"]):
    out[f"gguf/logits/{i}"] = logits_of(model, ids)
    out[f"gguf/generated/{i}"], out[f"gguf/top2/{i}"], out[f"gguf/margin/{i}"] = greedy(
      model, ids, request["max_new_tokens"]
    )
  del model
  converted, info = LlamaForCausalLM.from_pretrained(
    request["converted"], dtype=torch.float32, attn_implementation="eager", output_loading_info=True
  )
  if problems := {key: value for key, value in info.items() if value}:
    sys.exit(f"transformers could not load {request['converted']} cleanly: {problems}")
  for i, ids in enumerate(request["prompts"]):
    out[f"converted/logits/{i}"] = logits_of(converted.eval(), ids)
  tokenizers = {
    "gguf": AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name),
    "converted": AutoTokenizer.from_pretrained(request["converted"]),
  }
  for name, tokenizer in tokenizers.items():
    out[f"{name}/special"] = special_ids(tokenizer)
    for j, text in enumerate(request["texts"]):
      out[f"{name}/ids/{j}"] = np.asarray(tokenizer(text)["input_ids"])
  np.savez(output_file, **out)


if __name__ == "__main__":
  main(*sys.argv[1:])
