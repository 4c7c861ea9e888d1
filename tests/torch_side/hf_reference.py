"""HF transformers' PyTorch LlamaForCausalLM as the reference for tests/test_parity_hf.py.

Runs in the Python 3.11 side environment (torch CPU + transformers), never imported by moa_jax.
Usage: python hf_reference.py REQUEST.json OUTPUT.npz

The request names (1) `families`: directories holding a tiny HF config.json; for each, a seeded
random float32 LlamaForCausalLM is built, save_pretrained() into that directory, and its logits
for `logit_tokens` (one [B, T] batch per length) and greedy `generate` of `max_new_tokens` for
the left-padded `prompts` are recorded (with each step's top-2 tokens and their logit
margin); (2) `saved_by_jax`: directories written by moa_jax's
save_pretrained, loaded strictly with from_pretrained, with logits for `jax_tokens` recorded.
"""

import json
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def left_pad(prompts, pad_id):
  t = max(map(len, prompts))
  ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), t), dtype=torch.long)
  for row, prompt in enumerate(prompts):
    ids[row, t - len(prompt) :] = torch.tensor(prompt)
    mask[row, t - len(prompt) :] = 1
  return ids, mask


def logits_of(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def main(request_file, output_file):
  request = json.loads(open(request_file).read())
  torch.set_num_threads(2)
  out = {}
  for name, family in request["families"].items():
    config = LlamaConfig.from_pretrained(family["dir"])
    torch.manual_seed(family["seed"])
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    model.save_pretrained(family["dir"])
    for length, tokens in request["logit_tokens"].items():
      out[f"{name}/logits/{length}"] = logits_of(model, tokens)
    ids, mask = left_pad(request["prompts"], pad_id=0)
    model.generation_config.eos_token_id = None  # always max_new_tokens, as moa_jax eos_id=()
    with torch.no_grad():
      generated = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=request["max_new_tokens"],
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
      )
    out[f"{name}/generated"] = generated.sequences[:, ids.shape[1] :].numpy()
    step_logits = torch.stack(generated.logits, dim=1).float()  # [B, new tokens, V]
    top2 = step_logits.topk(2, dim=-1)
    out[f"{name}/top2"] = top2.indices.numpy()  # [B, new tokens, 2]
    out[f"{name}/margin"] = (top2.values[..., 0] - top2.values[..., 1]).numpy()
  for name, directory in request["saved_by_jax"].items():
    model, info = LlamaForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {key: value for key, value in info.items() if value}
    if problems:
      sys.exit(f"transformers could not load {directory} cleanly: {problems}")
    out[f"{name}/logits"] = logits_of(model.eval(), request["jax_tokens"])
  np.savez(output_file, **out)


if __name__ == "__main__":
  main(*sys.argv[1:])
