"""HF checkpoint I/O: round trips (single file, sharded, bf16), strict mapping, one-line errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from moa_jax.models import Llama
from moa_jax.models.hf import load_pretrained, load_tokenizer, save_pretrained

GPT2_CONFIG = {
  "architectures": ["GPT2LMHeadModel"],
  "model_type": "gpt2",
  "n_embd": 64,
  "n_head": 4,
  "n_layer": 2,
  "n_positions": 128,
  "vocab_size": 256,
}
QWEN2_CONFIG = {
  "architectures": ["Qwen2ForCausalLM"],
  "model_type": "qwen2",
  "hidden_size": 64,
  "intermediate_size": 160,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 256,
  "rope_theta": 1e6,
}


def params_of(model):
  return {
    ".".join(map(str, path)): np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def assert_same_params(a, b):
  pa, pb = params_of(a), params_of(b)
  assert pa.keys() == pb.keys()
  for name in pa:
    assert pa[name].dtype == pb[name].dtype, name
    np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
  return tiny_checkpoint


def broken_copy(checkpoint, tmp_path):
  copy = tmp_path / "ckpt"
  shutil.copytree(checkpoint, copy)
  return copy


def test_load_save_load_is_identical(checkpoint, tiny_model, tiny_config, tmp_path):
  model, config = load_pretrained(checkpoint)
  assert config == tiny_config
  assert_same_params(model, tiny_model)
  save_pretrained(model, config, tmp_path / "again")
  again, config_again = load_pretrained(tmp_path / "again")
  assert config_again == config
  assert_same_params(again, model)


def test_sharded_save_round_trips_and_replaces_stale_files(tiny_model, tiny_config, tmp_path):
  directory = save_pretrained(tiny_model, tiny_config, tmp_path, max_shard_bytes=60_000)
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(p.nbytes for p in params_of(tiny_model).values())
  assert_same_params(load_pretrained(directory)[0], tiny_model)
  save_pretrained(tiny_model, tiny_config, directory)  # single file now: old shards must go
  assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
  assert_same_params(load_pretrained(directory)[0], tiny_model)


def test_bf16_checkpoint_loads_as_bf16(tiny_model, tiny_config, tmp_path):
  config = tiny_config.replace(param_dtype="bfloat16", dtype="bfloat16")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  bf16 = nnx.merge(
    graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), nnx.state(tiny_model, nnx.Param))
  )
  save_pretrained(bf16, config, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
  loaded, loaded_config = load_pretrained(tmp_path)
  assert (loaded_config.param_dtype, loaded_config.dtype) == ("bfloat16", "bfloat16")
  assert_same_params(loaded, bf16)
  as_f32, f32_config = load_pretrained(tmp_path, param_dtype="float32")
  assert f32_config.param_dtype == f32_config.dtype == "float32"
  assert {p.dtype for p in params_of(as_f32).values()} == {np.dtype(np.float32)}


def rewrite_weights(directory, edit):
  tensors = load_file(directory / "model.safetensors")
  edit(tensors)
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


BAD_CHECKPOINTS = {
  "missing config": (
    lambda d: (d / "config.json").unlink(),
    FileNotFoundError,
    "config.json not found",
  ),
  "missing weights": (
    lambda d: (d / "model.safetensors").unlink(),
    FileNotFoundError,
    "no weights in .*: expected model.safetensors",
  ),
  "only .bin weights": (
    lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
    FileNotFoundError,
    "holds only PyTorch .bin weights",
  ),
  "missing shard": (
    lambda d: (d / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    ),
    FileNotFoundError,
    "shard model-00002-of-00002.safetensors named by",
  ),
  "wrong shape": (
    lambda d: rewrite_weights(
      d,
      lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": np.ones((16, 64), np.float32)}),
    ),
    ValueError,
    r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape "
    r"\(16, 64\), but config.json implies \(32, 64\)",
  ),
  "missing tensor": (
    lambda d: rewrite_weights(d, lambda t: t.pop("model.norm.weight")),
    ValueError,
    "parameter 'model.norm.weight' is missing",
  ),
  "extra tensor": (
    lambda d: rewrite_weights(
      d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.ones((160, 64), np.float32)})
    ),
    ValueError,
    "tensor 'model.layers.2.mlp.up_proj.weight' matches no parameter",
  ),
  "integer tensor": (
    lambda d: rewrite_weights(
      d, lambda t: t.update({"model.norm.weight": np.arange(64, dtype=np.int32)})
    ),
    ValueError,
    "'model.norm.weight' .* has dtype I32",
  ),
  "GPT-2 config": (
    lambda d: (d / "config.json").write_text(json.dumps(GPT2_CONFIG)),
    ValueError,
    r"unsupported architecture \(model_type='gpt2', "
    r"architectures=\['GPT2LMHeadModel'\]\)",
  ),
  "Qwen2 config": (
    lambda d: (d / "config.json").write_text(json.dumps(QWEN2_CONFIG)),
    ValueError,
    r"unsupported architecture \(model_type='qwen2'",
  ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_gives_one_line_error(case, checkpoint, tmp_path):
  damage, error, message = BAD_CHECKPOINTS[case]
  directory = broken_copy(checkpoint, tmp_path)
  damage(directory)
  with pytest.raises(error, match=message) as info:
    load_pretrained(directory)
  assert "\n" not in str(info.value)


def test_missing_directory_and_unreachable_hub_id(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere does not exist"):
    load_pretrained(tmp_path / "nowhere")
  # Offline this fails to connect, online the repository does not exist: one line either way.
  with pytest.raises(
    FileNotFoundError,
    match="'moa-jax-tests/no-such-model' is not a local directory and could not be downloaded",
  ) as info:
    load_pretrained("moa-jax-tests/no-such-model")
  assert "\n" not in str(info.value)


def test_load_tokenizer_from_checkpoint_directory(checkpoint, tmp_path):
  tokenizer = load_tokenizer(checkpoint)
  ids = tokenizer("sparse attention for long contexts", add_special_tokens=False)["input_ids"]
  assert ids == [3, 4, 5, 6, 7]
  assert tokenizer.decode(ids) == "sparse attention for long contexts"
  assert tokenizer.eos_token_id == 2
  directory = broken_copy(checkpoint, tmp_path)
  for file in directory.glob("tokenizer*"):
    file.unlink()
  with pytest.raises(FileNotFoundError, match="no tokenizer in .*: expected one of tokenizer.json"):
    load_tokenizer(directory)
