"""Prefill on top of a cache: chunks and turns give what one prefill of everything gives.

Kernel level: a chunk over a cache that holds earlier tokens (the Triton kernel in interpret
mode, and the reference) against `reference_attention` over the whole history, which knows
nothing of caches. Model level (tiny Llama, float32): prefill in chunks of 1, 7, 64 and 1000
tokens gives the logits of one prefill, and a second turn on turn 1's cache the greedy tokens
of prefilling both turns at once, for the dense and the MoA cache, with left padding; prompts
are longer than most heads' windows and chunks longer than some heads' rings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.attention import cache as cache_lib
from moa_jax.attention.chunk import chunk_gpu, chunk_reference
from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.attention.reference import reference_attention
from moa_jax.generate import Conversation, chunk_sizes, decode, generate, left_pad, prefill

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def history_case(seed, n, kv, windows, sink, prefix, chunk_real, t, dtype, h=16):
  """A cache holding each row's `prefix` tokens (left-padded when written) and a chunk of T
  slots with `chunk_real` real tokens per row that continue it. Returns the chunk's inputs,
  the cache and the reference output over the whole history."""
  rng = np.random.default_rng(seed)
  b, p = len(prefix), max(prefix)
  layout = cache_lib.make_layout(np.asarray(windows), kv, p + t + 5, sink=sink, slot_multiple=16)
  k, v = (jnp.asarray(rng.standard_normal((b, p + t, kv, h)), dtype) for _ in range(2))
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  old_pos, pos = np.full((b, p), -1, np.int32), np.full((b, t), -1, np.int32)
  for row in range(b):
    old_pos[row, p - prefix[row] :] = np.arange(prefix[row])
    pos[row, t - chunk_real[row] :] = prefix[row] + np.arange(chunk_real[row])
  cache = cache_lib.init_cache(layout, b, h, dtype)
  if p:
    cache = jax.jit(cache_lib.write)(cache, k[:, :p], v[:, :p], jnp.asarray(old_pos))
  f32 = lambda x: x.astype(jnp.float32)
  ref = jax.jit(functools.partial(reference_attention, sink=sink))(
    f32(q),
    f32(k),
    f32(v),
    jnp.asarray(pos),
    jnp.asarray(np.concatenate([old_pos, pos], 1)),
    windows=jnp.asarray(windows),
  )
  return (q, k[:, p:], v[:, p:], jnp.asarray(pos), cache), ref


CHUNK_CASES = [  # N, K, windows per query head, sink, cached per row, chunk tokens per row, T
  # G = 4; a row with an empty cache, a row whose chunk is all padding, a chunk holding the
  # sink's last positions (cached 2 < sink 4), a chunk longer than the windows 1, 5, 9, 12.
  (8, 2, [1, 9, 30, 70, 5, 5, 200, 12], 4, [0, 50, 2, 9], [70, 13, 0, 70], 70),
  (6, 2, [3, 40, 7, 1, 300, 20], 4, [120, 33, 2], [40, 40, 17], 40),  # G = 3
  (7, 1, [3, 40, 7, 1, 300, 20, 5], 8, [10, 90], [60, 5], 60),  # G = 7
  (4, 4, [3, 40, 7, 20], 0, [100, 3], [30, 30], 30),  # G = 1, no sink
]


@pytest.mark.parametrize(
  "case,dtype", [(case, jnp.float32) for case in CHUNK_CASES] + [(CHUNK_CASES[0], jnp.bfloat16)]
)
def test_chunk_attention_matches_the_whole_history(case, dtype):
  n, t = case[0], case[-1]
  args, ref = history_case(n + t, *case, dtype)
  pos = args[3]
  for out in (jax.jit(chunk_reference)(*args), chunk_gpu(*args, interpret=True)):
    assert out.shape == args[0].shape and out.dtype == dtype
    assert not jnp.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
    assert err < TOLERANCE[dtype], f"max abs error {err}"
    assert jnp.all(out[pos < 0] == 0), "padding rows must be zero"


def test_chunk_kernel_interior_blocks_and_ring_skipping():
  """16-key blocks: wide-window groups walk unmasked interior blocks; narrow-window tiles late
  in the chunk skip the cache's ring."""
  windows = [100, 90, 120, 100, 6, 6, 3, 5]
  args, ref = history_case(5, 8, 2, windows, 4, [80, 23], [96, 90], 96, jnp.float32)
  out = chunk_gpu(*args, block_rows=16, block_k=16, interpret=True)
  assert float(jnp.abs(out - ref).max()) < 2e-5


def test_chunk_sizes():
  assert chunk_sizes(150, None) == [150] and chunk_sizes(150, 1000) == [150]
  assert chunk_sizes(150, 64) == [22, 64, 64] and chunk_sizes(128, 64) == [64, 64]
  assert chunk_sizes(3, 1) == [1, 1, 1]
  with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
    chunk_sizes(10, 0)


# ------------------------------------------------------------------------- model level

SINK = 4
WINDOWS = np.array([[5, 40], [12, 3]])  # [L, K] per KV group, tiny model (2 layers, 2 groups)
PROMPT_LENGTHS = (128, 97, 20)
MAX_LENGTH = 400


@functools.cache
def tiny():
  from moa_jax.models import Llama, LlamaConfig

  config = LlamaConfig.tiny()
  return Llama(config, rngs=nnx.Rngs(3)), config


def prompts(lengths=PROMPT_LENGTHS, seed=7):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 256, n).tolist() for n in lengths]


ATTENTIONS = {
  "dense": DenseAttention(),
  "moa": MoAAttention(WINDOWS, sink=SINK, impl="reference", slot_multiple=16),
}


@functools.cache
def cached_forward(attention):
  """A jitted model call on caches (one compile per shape and attention for the whole file)."""
  graphdef, _ = nnx.split(tiny()[0])
  return jax.jit(
    lambda state, t, p, c: nnx.merge(graphdef, state)(t, p, attention=attention, caches=c)
  )


def chunked_logits(attention, tokens, positions, chunk):
  """Logits [B, T, V] of feeding tokens into a fresh cache in calls of `chunk_sizes`."""
  model, config = tiny()
  state = nnx.state(model)
  forward = cached_forward(attention)
  caches = attention.init_cache(config, tokens.shape[0], MAX_LENGTH)
  logits, start = [], 0
  for size in chunk_sizes(tokens.shape[1], chunk):
    out, caches = forward(
      state, tokens[:, start : start + size], positions[:, start : start + size], caches
    )
    logits.append(np.asarray(out))
    start += size
  return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_prefill_in_chunks_gives_the_logits_of_one_prefill(name):
  attention = ATTENTIONS[name]
  tokens, positions = left_pad(prompts())
  whole = chunked_logits(attention, tokens, positions, None)
  real = positions >= 0
  for chunk in (1, 7, 64, 1000):
    got = chunked_logits(attention, tokens, positions, chunk)
    np.testing.assert_allclose(
      got[real], whole[real], atol=1e-5, rtol=0, err_msg=f"chunks of {chunk}"
    )
  # The library's prefill (a loop of chunks inside one jit) returns the last token's logits.
  model, config = tiny()
  caches = attention.init_cache(config, len(tokens), MAX_LENGTH)
  last, _ = prefill(model, tokens, positions, caches, attention=attention, chunk=64)
  np.testing.assert_allclose(np.asarray(last), whole[:, -1], atol=1e-5, rtol=0)


def test_moa_kernels_prefill_in_chunks_like_the_reference():
  """The Triton path (interpret mode): the first chunk on the empty cache takes the sparse
  prefill kernel, the later ones the chunk kernel."""
  attention = MoAAttention(WINDOWS, sink=SINK, impl="triton", interpret=True, slot_multiple=16)
  tokens, positions = left_pad(prompts((64, 40, 9)))
  got = chunked_logits(attention, tokens, positions, 32)
  want = chunked_logits(ATTENTIONS["moa"], tokens, positions, None)
  np.testing.assert_allclose(got[positions >= 0], want[positions >= 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_second_turn_on_the_cache_matches_prefilling_both_turns(name):
  attention = ATTENTIONS[name]
  model, _ = tiny()
  turn1, turn2 = prompts((60, 23, 9), seed=1), prompts((11, 70, 30), seed=2)
  chat = Conversation(model, 3, MAX_LENGTH, attention=attention)
  chat.append(turn1)
  reply1 = chat.reply(6, eos_id=())
  chat.append(turn2)
  reply2 = chat.reply(6, eos_id=())
  whole = [a + r + b for a, r, b in zip(turn1, reply1, turn2)]
  assert reply2 == generate(model, whole, 6, attention=attention, eos_id=(), max_length=MAX_LENGTH)
  # Continuing a reply decodes on: a reply of 6 and another of 6 are one reply of 12.
  chat = Conversation(model, 3, MAX_LENGTH, attention=attention)
  chat.append(whole)
  both = [a + b for a, b in zip(chat.reply(6, eos_id=()), chat.reply(6, eos_id=()))]
  assert both == generate(model, whole, 12, attention=attention, eos_id=(), max_length=MAX_LENGTH)


def test_finished_rows_write_nothing_more():
  """A row that emitted eos stops feeding the cache: its next turn continues at its eos."""
  model, _ = tiny()
  turn = prompts((60, 23, 9), seed=1)
  free = generate(model, turn, 6, eos_id=(), max_length=MAX_LENGTH)
  eos = free[1][2]
  chat = Conversation(model, 3, MAX_LENGTH)
  chat.append(turn)
  stopped = chat.reply(6, eos_id=eos)
  assert stopped[1] == free[1][: free[1].index(eos) + 1]
  held = chat.lengths.copy()
  assert held[1] == 23 + len(stopped[1]) - 1  # the eos itself is fed with the next turn
  chat.append([[5], [6], [7]])
  assert chat.lengths.tolist() == (held + 2).tolist()


def test_fused_dense_prefill_in_chunks_matches_the_reference():
  """DenseAttention('xla') (jax.nn.dot_product_attention, the cuDNN path's code on the CPU):
  a chunk on the cache merges two calls by log-sum-exp; rows without padding."""
  model, _ = tiny()
  tokens, positions = left_pad(prompts((64, 64, 64)))
  want = chunked_logits(DenseAttention(), tokens, positions, None)
  for chunk in (1, 32):
    got = chunked_logits(DenseAttention("xla"), tokens, positions, chunk)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"chunks of {chunk}")
  with pytest.raises(ValueError, match="needs rows without padding"):
    generate(model, prompts((9, 5)), 2, attention=DenseAttention("xla"))
  with pytest.raises(ValueError, match="unknown dense attention impl"):
    DenseAttention("flash")


def test_conversation_errors():
  model, _ = tiny()
  chat = Conversation(model, 2, 100)
  with pytest.raises(ValueError, match="append a turn before the first reply"):
    chat.reply(3)
  with pytest.raises(ValueError, match="one turn per row"):
    chat.append([[1, 2]])
  with pytest.raises(ValueError, match="needs 128 cache slots, more than max_length=100"):
    chat.append([[1] * 65, [2]])
  moa = ATTENTIONS["moa"]
  with pytest.raises(ValueError, match="decode needs caches that hold a prompt"):
    decode(
      model, jnp.zeros((2, 256)), np.zeros(2), moa.init_cache(tiny()[1], 2, 100), 2, attention=moa
    )


@pytest.mark.parametrize("dtype,n,kv", [(jnp.bfloat16, 32, 8), (jnp.float32, 6, 2)])
def test_chunk_kernel_lowers_to_a_valid_triton_module(dtype, n, kv, monkeypatch):
  """Lowered for an sm_90 GPU on the CPU, every group's Triton module passes MLIR's verifier
  (interpret mode cannot catch this: a loop bound of another integer type than its start
  failed only in Triton's compiler on the H200)."""
  from jax._src.pallas.triton import gpu_info
  from jax._src.pallas.triton import pallas_call_registration as registration

  modules = []
  lower = registration.lowering.lower_jaxpr_to_triton_module
  monkeypatch.setattr(
    registration.gpu_info_lib,
    "get_gpu_info",
    lambda: gpu_info.GpuInfo(gpu_version=None, arch_name="sm_90", compute_capability=90),
  )
  monkeypatch.setattr(
    registration.lowering,
    "lower_jaxpr_to_triton_module",
    lambda *a, **k: modules.append(lower(*a, **k)) or modules[-1],
  )
  b, t, h = 1, 256, 16 if dtype == jnp.float32 else 128
  windows = np.repeat(np.array([300, 60] * (kv // 2)), n // kv)
  layout = cache_lib.make_layout(windows, kv, 1000, sink=64, slot_multiple=64)
  shape = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  cache = jax.eval_shape(lambda: cache_lib.init_cache(layout, b, h, dtype))
  jax.jit(chunk_gpu).trace(
    shape(b, t, n, h),
    shape(b, t, kv, h),
    shape(b, t, kv, h),
    jax.ShapeDtypeStruct((b, t), jnp.int32),
    cache,
  ).lower(lowering_platforms=("cuda",))
  assert len(modules) == len(layout.groups)
  for module in modules:
    assert module.module.operation.verify()
