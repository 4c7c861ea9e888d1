"""The Flax NNX Llama: config, presets, RoPE scalings, the attention plug, the dense KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.attention.dense import DenseAttention, write_cache
from moa_jax.models import PRESETS, Llama, LlamaConfig, count_params
from moa_jax.models.llama import apply_rope, rope_inv_freq

# Published parameter counts (Llama-2-7B/13B shapes for the Vicuna v1.5 models).
PUBLISHED_PARAMS = {
  "vicuna-7b-v1.5-16k": 6_738_415_616,
  "vicuna-13b-v1.5-16k": 13_015_864_320,
  "llama-3-8b": 8_030_261_248,
  "llama-3-70b": 70_553_706_496,
  "llama-3.1-8b": 8_030_261_248,
  "llama-3.2-1b": 1_235_814_400,
  "llama-3.2-3b": 3_212_749_824,
  "smollm2-135m": 134_515_008,  # elements in the SmolLM2-135M-Instruct GGUF (tied embeddings)
}


def jitted(model, attention=DenseAttention()):
  """model(tokens, positions, caches) compiled once per shape (eager NNX is slow on CPU)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, positions, caches):
    return nnx.merge(graphdef, state)(tokens, positions, attention=attention, caches=caches)

  return lambda tokens, positions, caches=None: forward(state, tokens, positions, caches)


def random_tokens(key, shape, vocab):
  return jax.random.randint(jax.random.key(key), shape, 3, vocab, jnp.int32)


def left_padded_positions(lengths, t):
  """[B, T] positions for left-padded rows of the given real lengths (-1 on padding)."""
  lengths = np.asarray(lengths)[:, None]
  return jnp.asarray(
    np.where(np.arange(t) >= t - lengths, np.arange(t) - (t - lengths), -1), jnp.int32
  )


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published(name):
  assert count_params(LlamaConfig.preset(name)) == PUBLISHED_PARAMS[name]


def test_every_preset_is_named_and_round_trips_through_hf_dict():
  assert set(PRESETS) == set(PUBLISHED_PARAMS) | {"tiny"}
  for name in PRESETS:
    config = LlamaConfig.preset(name)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
    assert hash(config) == hash(LlamaConfig.from_hf_dict(config.to_hf_dict()))
  with pytest.raises(ValueError, match="unknown model preset 'llama-9b'; choose one of: vicuna"):
    LlamaConfig.preset("llama-9b")


def test_from_hf_dict_reads_both_transformers_layouts():
  legacy = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "rope_theta": 5e5,
    "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "linear", "factor": 4.0},
    "eos_token_id": [5, 6],
  }
  v5 = {
    **legacy,
    "rope_scaling": None,
    "torch_dtype": None,
    "rope_theta": None,
    "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
  }
  for hf in (legacy, v5):
    config = LlamaConfig.from_hf_dict(hf, dtype="float32")
    assert config.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    assert (config.rope_theta, config.num_kv_heads, config.head_dim) == (5e5, 4, 8)
    assert (config.param_dtype, config.dtype, config.eos_token_ids) == (
      "bfloat16",
      "float32",
      (5, 6),
    )
  default_rope = {**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
  assert LlamaConfig.from_hf_dict(default_rope).rope_scaling is None


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(num_kv_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported RoPE scaling 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "missing low_freq_factor"),
    (dict(head_dim=15), "head_dim must be even"),
  ],
)
def test_config_rejects_bad_values(changes, message):
  with pytest.raises(ValueError, match=message):
    LlamaConfig.tiny(**changes)


def test_linear_rope_scaling_divides_positions():
  base = LlamaConfig.tiny(rope_scaling=None)
  linear = base.replace(rope_scaling={"type": "linear", "factor": 4.0})
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, base.head_dim))
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 5)) * 4, jnp.int32)
  np.testing.assert_allclose(
    apply_rope(x, pos, rope_inv_freq(linear)),
    apply_rope(x, pos // 4, rope_inv_freq(base)),
    atol=2e-5,
  )


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
  base = LlamaConfig.tiny(rope_scaling=None, head_dim=64, rope_theta=5e5)
  scaled = base.replace(
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    }
  )
  f0, f1 = rope_inv_freq(base), rope_inv_freq(scaled)
  wavelen = 2 * np.pi / f0
  high, low = wavelen < 64 / 4, wavelen > 64
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_array_equal(f1[high], f0[high])
  np.testing.assert_allclose(f1[low], f0[low] / 8, rtol=1e-6)
  medium = ~high & ~low
  assert np.all((f1[medium] < f0[medium]) & (f1[medium] > f0[medium] / 8))


def test_attention_plug_gets_roped_gqa_inputs_per_layer(tiny_model, tiny_config):
  calls = []

  @dataclasses.dataclass(frozen=True)
  class Recording(DenseAttention):
    def __call__(self, layer, q, k, v, q_pos, cache):
      calls.append((layer, q.shape, k.shape, v.shape))
      return super().__call__(layer, q, k, v, q_pos, cache)

  tokens = random_tokens(1, (2, 6), tiny_config.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
  logits, caches = jitted(tiny_model, Recording())(tokens, positions)  # records while tracing
  assert logits.shape == (2, 6, tiny_config.vocab_size) and logits.dtype == jnp.float32
  assert caches is None
  n, k, h = tiny_config.num_heads, tiny_config.num_kv_heads, tiny_config.head_dim
  assert calls == [
    (i, (2, 6, n, h), (2, 6, k, h), (2, 6, k, h)) for i in range(tiny_config.num_layers)
  ]


def test_left_padding_does_not_change_real_token_logits(tiny_model, tiny_config):
  model = jitted(tiny_model)
  tokens = random_tokens(2, (3, 9), tiny_config.vocab_size)
  lengths = [9, 4, 6]
  padded, _ = model(tokens, left_padded_positions(lengths, 9))
  for row, n in enumerate(lengths):
    alone, _ = model(tokens[row : row + 1, 9 - n :], jnp.arange(n, dtype=jnp.int32)[None])
    np.testing.assert_allclose(padded[row, 9 - n :], alone[0], rtol=1e-5, atol=1e-5)


def test_cached_prefill_and_decode_match_full_forward(tiny_model, tiny_config):
  t, prefill = 11, 5
  tokens = random_tokens(3, (3, t), tiny_config.vocab_size)
  positions = left_padded_positions([5, 3, 4], prefill)
  positions = jnp.concatenate(
    [positions, positions[:, -1:] + jnp.arange(1, t - prefill + 1, dtype=jnp.int32)], axis=1
  )
  model = jitted(tiny_model)
  full, _ = model(tokens, positions)
  caches = DenseAttention().init_cache(tiny_config, 3, t, jnp.float32)
  step_logits, caches = model(tokens[:, :prefill], positions[:, :prefill], caches)
  steps = [step_logits]
  for i in range(prefill, t):
    step_logits, caches = model(tokens[:, i : i + 1], positions[:, i : i + 1], caches)
    steps.append(step_logits)
  real = positions >= 0
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1)[real], full[real], rtol=1e-5, atol=1e-5)
  assert int(caches[0].index) == t
  cache = caches[0]
  with pytest.raises(ValueError, match="KV cache overflow: writing 1 tokens at slot 11 of 11"):
    write_cache(cache, cache.k[:, :1], cache.v[:, :1], positions[:, :1])


def with_dtypes(model, config):
  """A copy of `model` under `config` with its parameters cast to config.param_dtype."""
  graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda p: p.astype(config.param_dtype), nnx.state(model))
  return nnx.merge(graphdef, params)


def test_param_dtype_and_compute_dtype_are_separate(tiny_model, tiny_config):
  tokens = random_tokens(4, (2, 8), tiny_config.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  reference, _ = jitted(tiny_model)(tokens, positions)
  bf16_params = with_dtypes(tiny_model, tiny_config.replace(param_dtype="bfloat16"))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16_params))} == {jnp.dtype(jnp.bfloat16)}
  bf16_all = with_dtypes(tiny_model, tiny_config.replace(param_dtype="bfloat16", dtype="bfloat16"))
  errors = []
  for model in (bf16_params, bf16_all):
    logits, _ = jitted(model)(tokens, positions)
    assert logits.dtype == jnp.float32
    errors.append(float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference)))
  # Rounding weights to bf16 costs a little; computing in bf16 costs more; neither is exact.
  assert 0 < errors[0] < errors[1] < 0.05, errors


def test_tied_embeddings_have_no_lm_head(tiny_config):
  model = Llama(tiny_config.replace(tie_word_embeddings=True), rngs=nnx.Rngs(0))
  assert model.lm_head is None
  assert (
    count_params(tiny_config) - count_params(tiny_config.replace(tie_word_embeddings=True))
    == tiny_config.vocab_size * tiny_config.hidden_size
  )
  tokens = random_tokens(5, (1, 4), tiny_config.vocab_size)
  positions = jnp.arange(4, dtype=jnp.int32)[None]
  logits, _ = jitted(model)(tokens, positions)
  hidden, _ = jax.jit(lambda t, p: model.hidden_states(t, p))(tokens, positions)  # [1, 4, D]
  embedding = model.model.embed_tokens.weight[...]  # [V, D]: the tied input embedding
  np.testing.assert_allclose(model.output_embedding(), embedding)
  np.testing.assert_allclose(logits[0], hidden[0] @ embedding.T, rtol=1e-5, atol=1e-5)
