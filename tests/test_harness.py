"""The evaluation harness on a tiny random Llama: plumbing, token-exact windows, shape buckets,
scoring on each method's cache, JSON, plots."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax import generate as generate_lib
from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.data import longbench as longbench_lib
from moa_jax.data.tasks import make_samples
from moa_jax.eval import ablation, harness, plots
from moa_jax.models import Llama, LlamaConfig
from moa_jax.plans.plan import Plan, uniform_plan
from moa_jax.plans.rules import kv_density

LONGBENCH_TINY = pathlib.Path(__file__).parent / "data" / "longbench_tiny"


class CharTokenizer:
  """One token per ASCII character; BOS = 1, EOS = 2 (control characters never in the text)."""

  eos_token_id = 2

  def encode(self, text, add_special_tokens=True):
    return ([1] if add_special_tokens else []) + [ord(c) for c in text]

  def decode(self, ids, skip_special_tokens=False):
    return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (0, 1, 2)))

  def get_vocab(self):
    return {chr(i): i for i in range(3, 128)}


@pytest.fixture(scope="module")
def model():
  return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(11))


@pytest.fixture(scope="module")
def moa_plan(model):
  """A hand-made heterogeneous plan: layer 0 local + growing, layer 1 one wide, one fixed."""
  return Plan(
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    alphas=np.array([[64.0, 0.0], [-32.0, 96.0]]),
    betas=np.array([[0.0, 0.25], [1.0, 0.0]]),
    sink=16,
    block=16,
  )


def random_tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 3, 128, jnp.int32)


def test_moa_attention_full_windows_equal_dense(model):
  tokens = random_tokens(0, (2, 40))
  positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
  forward = nnx.jit(lambda m, t, p, a: m(t, p, attention=a)[0], static_argnums=3)
  dense = forward(model, tokens, positions, DenseAttention())
  wide = forward(model, tokens, positions, MoAAttention(np.full((2, 4), 40), sink=4))
  narrow = forward(model, tokens, positions, MoAAttention(np.full((2, 4), 8), sink=4))
  np.testing.assert_allclose(wide, dense, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(narrow[:, 20:] - dense[:, 20:])).max() > 1e-3


def test_moa_decode_matches_prefill(model, moa_plan):
  """Prefill + decode steps on the compressed cache give the logits of one full forward with
  the plan's windows at the planned length 96 (token-exact rules)."""
  attention = MoAAttention(moa_plan.windows(96), sink=moa_plan.sink)
  tokens = random_tokens(1, (1, 90))
  positions = jnp.arange(90, dtype=jnp.int32)[None]
  forward = nnx.jit(lambda m, t, p, c: m(t, p, attention=attention, caches=c))
  full, _ = forward(model, tokens, positions, None)
  caches = attention.init_cache(model.config, 1, 96)
  _, caches = forward(model, tokens[:, :80], positions[:, :80], caches)
  for t in range(80, 90):
    step, caches = forward(model, tokens[:, t : t + 1], positions[:, t : t + 1], caches)
    np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_plan_factory(model, moa_plan):
  factory = harness.plan_factory(model.config, density=0.5, plans={"moa": moa_plan}, sink=16)
  assert isinstance(factory("dense", 500), DenseAttention)
  uniform = factory("uniform", 500)
  expected = uniform_plan(model.config, 0.5, 500, sink=16).windows(500)
  np.testing.assert_array_equal(uniform.layer_windows(500, 4), expected)
  assert kv_density(expected[:, ::2], 16, 500) == pytest.approx(0.5, abs=0.01)
  assert factory("uniform", 500) is uniform  # memoized: one compiled program per method
  np.testing.assert_array_equal(factory("moa", 500).layer_windows(500, 4), moa_plan.windows(500))
  with pytest.raises(ValueError, match="unknown method"):
    factory("h2o", 500)
  with pytest.raises(ValueError, match="reserved"):
    harness.plan_factory(model.config, plans={"dense": moa_plan})


def test_response_cross_entropy_matches_manual(model):
  prompts = [[1, 50, 60, 70, 80, 90], [1, 33, 44]]
  answers = [[65, 66, 67], [100, 101]]
  ce = harness.response_cross_entropy(model, prompts, answers)
  forward = nnx.jit(
    lambda m, t: jax.nn.log_softmax(m(t, jnp.arange(t.shape[1], dtype=jnp.int32)[None])[0][0], -1)
  )
  for p, a, value in zip(prompts, answers, ce):
    logp = forward(model, jnp.asarray([p + a], jnp.int32))
    manual = -np.mean([logp[len(p) - 1 + j, token] for j, token in enumerate(a)])
    assert value == pytest.approx(manual, rel=1e-5)
  with pytest.raises(ValueError, match="non-empty target"):
    harness.response_cross_entropy(model, prompts, [[65], []])


def test_shape_buckets():
  buckets = harness.shape_buckets([1000, 1030, 980, 300, 260, 200, 64], multiple=64, fill=0.75)
  assert buckets == [(1088, [0, 1, 2]), (320, [3, 4]), (256, [5]), (64, [6])]
  for t, rows in buckets:
    assert t % 64 == 0
    assert all(0.75 * t <= [1000, 1030, 980, 300, 260, 200, 64][i] <= t for i in rows)


def test_scoring_on_the_moa_cache_equals_one_forward(model, moa_plan):
  """Teacher forcing through MoA's cache (prefill, then decode steps) gives the cross-entropy
  of one full forward with the plan's windows at the planned length T + new tokens."""
  prompts = [[1] + list(range(3, 102)), [1] + list(range(8, 127))]  # 100 and 120 tokens
  targets = [[5, 6, 7, 8, 9], [11, 12, 13]]
  factory = harness.plan_factory(model.config, plans={"moa": moa_plan}, sink=16)
  outputs, nll = harness.run_prompts(
    model, prompts, "moa", factory, batch_size=2, new_tokens=6, targets=targets, eos_ids=()
  )
  assert [len(o) for o in outputs] == [6, 6]
  planned = 128 + 6  # both prompts pad to 128 (one bucket), then 6 new tokens
  fixed = MoAAttention(moa_plan.windows(planned), sink=moa_plan.sink)
  forward = nnx.jit(lambda m, t, p: jax.nn.log_softmax(m(t, p, attention=fixed)[0], -1))
  tokens, positions = generate_lib.left_pad(
    [p + t[:-1] for p, t in zip(prompts, targets)], multiple=1
  )
  logp = forward(model, jnp.asarray(tokens), jnp.asarray(positions))
  for row, t in enumerate(targets):
    start = tokens.shape[1] - len(t)
    manual = [-float(logp[row, start + j, token]) for j, token in enumerate(t)]
    np.testing.assert_allclose(nll[row], manual, rtol=2e-4, atol=2e-4)
  _, dense = harness.run_prompts(model, prompts, "dense", factory, batch_size=2, targets=targets)
  assert not np.allclose(np.concatenate(dense), np.concatenate(nll), atol=1e-3)


def count_compiles(run) -> int:
  """XLA backend compilations while `run()` runs."""
  events = []
  listener = lambda event, seconds, **kwargs: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    run()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return events.count("/jax/core/compile/backend_compile_duration")


def test_a_cell_compiles_once_per_shape_bucket(model, moa_plan):
  """Five prompts in batches of two (the last with a filler row) compile no more programs than
  one batch of five: one program per shape bucket, not per batch; a repeat compiles nothing."""
  tok = CharTokenizer()
  inputs = harness.synthetic_inputs(
    tok, "passkey", 300, depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed=3, max_new_tokens=6
  )
  assert len(harness.shape_buckets([len(p) for p in inputs.prompts])) == 1
  cell = lambda factory, size: harness.evaluate_cell(
    model, tok, inputs, "moa", factory, batch_size=size
  )
  fresh = lambda: harness.plan_factory(model.config, plans={"moa": moa_plan}, sink=16)
  one_batch = count_compiles(lambda: cell(fresh(), 5))
  factory, out = fresh(), {}
  three_batches = count_compiles(lambda: out.setdefault("records", cell(factory, 2)))
  assert 0 < three_batches <= one_batch
  assert sum(r["num_samples"] for r in out["records"]) == 5  # filler rows are not scored
  assert count_compiles(lambda: out.setdefault("again", cell(factory, 2))) == 0
  assert out["again"] == out["records"]


@pytest.mark.slow
def test_evaluate_records_json_plots_and_determinism(model, moa_plan, tmp_path):
  factory = harness.plan_factory(model.config, density=0.5, plans={"moa": moa_plan}, sink=16)
  kwargs = dict(
    methods=("dense", "uniform", "moa"),
    attention_factory=factory,
    tasks=("passkey",),
    lengths=(400,),
    depths=(0.25, 0.75),
    samples_per_depth=2,
    seed=4,
    max_new_tokens=6,
    batch_size=4,
    progress=False,
  )
  records = harness.evaluate(model, CharTokenizer(), **kwargs)
  cells = {
    m: {
      (r["task"], r["length"], r["decile"], r["num_samples"]) for r in records if r["method"] == m
    }
    for m in ("dense", "uniform", "moa")
  }
  assert cells["dense"] == cells["uniform"] == cells["moa"]
  assert {(t, n, d) for t, n, d, _ in cells["dense"]} == {
    ("passkey", 400, s.decile)
    for s in make_samples("passkey", CharTokenizer(), 400, 4, seed=4, depths=(0.25, 0.75))
  }
  for r in records:
    assert r["num_samples"] == 2 and 0.0 <= r["accuracy"] <= 1.0
    assert abs(r["mean_tokens"] - r["length"]) <= 0.05 * r["length"] + 1  # + BOS
    assert r["ce"] > 0 and r["perplexity"] == pytest.approx(math.exp(r["ce"]))
    assert len(r["predictions"]) == 2
  by_method = {m: [r["ce"] for r in records if r["method"] == m] for m in ("dense", "uniform")}
  assert by_method["dense"] != by_method["uniform"]  # the windows change the model's output

  result = harness.save_results(records, tmp_path / "results.json", meta={"command": "pytest"})
  assert harness.load_results(tmp_path / "results.json") == json.loads(json.dumps(records))
  assert set(result["summary"]["accuracy"]) == {"dense", "uniform", "moa"}
  assert set(result["summary"]["effective_context_length"]["dense"]) == {"passkey"}
  for path in plots.plot_all(records, tmp_path / "plots"):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
    "accuracy_vs_length.png",
    "heatmap_passkey.png",
  ]

  again = harness.evaluate(model, CharTokenizer(), **kwargs)
  assert again == records


def test_accuracy_table_and_effective_context_length():
  def rec(method, length, decile, accuracy, n=2):
    return dict(
      method=method, task="lines", length=length, decile=decile, accuracy=accuracy, num_samples=n
    )

  records = [
    rec("dense", 1024, 0, 1.0),
    rec("dense", 1024, 9, 1.0),
    rec("dense", 2048, 0, 1.0),
    rec("dense", 2048, 9, 0.8, n=6),  # (2 + 4.8) / 8
    rec("dense", 4096, 0, 0.9),
    rec("dense", 4096, 9, 0.9),
    rec("uniform", 1024, 0, 0.5),
    rec("uniform", 2048, 0, 0.0),
  ]
  table = harness.accuracy_table(records)
  assert table["dense"]["lines"] == {1024: 1.0, 2048: pytest.approx(0.85), 4096: 0.9}
  assert harness.effective_context_length(records) == {
    "dense": {"lines": 4096},
    "uniform": {"lines": 0},
  }


def test_truncate_middle_and_longbench(model, tmp_path):
  assert harness.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
  assert harness.truncate_middle(list(range(10)), 5) == [0, 1, 7, 8, 9]
  assert harness.truncate_middle([1, 2], 5) == [1, 2]
  records = list(
    longbench_lib.load_longbench("hotpotqa", data_dir=LONGBENCH_TINY, cache_dir=str(tmp_path))
  )
  inputs = harness.longbench_inputs(CharTokenizer(), records, 160)
  assert inputs.task == "longbench/hotpotqa" and inputs.new_tokens == 32
  assert max(len(p) for p in inputs.prompts) <= 160 + 2  # cut in the text, re-encoded
  factory = harness.plan_factory(model.config, density=0.5, sink=16)
  (record,) = harness.evaluate_cell(
    model, CharTokenizer(), inputs, "uniform", factory, batch_size=4
  )
  assert record["num_samples"] == 3 and 0 <= record["score"] <= 100
  assert record["accuracy"] == pytest.approx(record["score"] / 100)
  assert {b: v["count"] for b, v in record["buckets"].items()} == {"0-4k": 1, "4-8k": 1, "8k+": 1}


def test_group_cut_factory_and_far_influence_share(model):
  factory = ablation.group_cut_factory(model.config, window=32, sink=16)
  assert isinstance(factory("dense", 200), DenseAttention)
  windows = factory(ablation.cut_method(1, 0), 200).layer_windows(200, 4)  # [L, N]
  expected = np.full((2, 4), 200)
  expected[1, :2] = 32  # KV group 0 of layer 1 = query heads 0 and 1
  np.testing.assert_array_equal(windows, expected)
  with pytest.raises(ValueError, match="unknown method"):
    factory("cut_2_0", 200)
  e_bar = np.zeros((2, 4, 4, 4))  # [L, N, query blocks, key blocks]; window 32 = 2 blocks of 16
  e_bar[1, 0, 3, 1] = 3.0  # far (3 - 1 >= 2), not the sink block
  e_bar[1, 3, 3, 0] = 5.0  # the sink block: not counted
  e_bar[0, 2, 2, 1] = 9.0  # near (2 - 1 < 2): not counted
  e_bar[0, 2, 3, 1] = 1.0  # far, layer 0 group 1
  share = ablation.far_influence_share(e_bar, 32, 16, group_size=2)
  np.testing.assert_allclose(share, [[0.0, 0.25], [0.75, 0.0]])
