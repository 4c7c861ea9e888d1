"""Tests of moa_jax/plans/plan.py: windows, densities, our JSON, the official JSON, validation."""

import dataclasses
import json

import matplotlib.image
import numpy as np
import pytest

from moa_jax.plans import plan as plan_lib
from moa_jax.plans import plots
from moa_jax.plans import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class Shape:
  """Any object with these three attributes describes a model to the Plan."""

  num_layers: int
  num_heads: int
  num_kv_heads: int


GQA = Shape(3, 8, 2)


def _random_plan(rng, shape=GQA, grouping="kv_group", sink=8, block=8) -> plan_lib.Plan:
  width = shape.num_kv_heads if grouping == "kv_group" else shape.num_heads
  alphas = rng.choice([-64.0, 0.0, 16.0, 40.0], size=(shape.num_layers, width))
  betas = rng.choice([0.125, 0.25, 0.5, 1.0], size=(shape.num_layers, width))
  return plan_lib.Plan(
    shape.num_layers,
    shape.num_heads,
    shape.num_kv_heads,
    alphas,
    betas,
    sink=sink,
    block=block,
    grouping=grouping,
  )


def _brute_windows(plan, n):
  """[L, H] windows from ElasticRule.window, head by head (GQA: head h is in group h // G)."""
  group = plan.num_heads // plan.num_kv_heads
  out = np.zeros((plan.num_layers, plan.num_heads), np.int64)
  for l, row in enumerate(plan.rules()):
    for h in range(plan.num_heads):
      rule = row[h // group] if plan.grouping == "kv_group" else row[h]
      out[l, h] = rule.window(n, plan.block)
  return out


@pytest.mark.parametrize("grouping", ["kv_group", "query_head"])
def test_windows_and_densities_match_brute_force(grouping):
  rng = np.random.default_rng(0)
  plan = _random_plan(rng, grouping=grouping)
  pos = np.arange(100)
  for n in (37, 100):
    windows = _brute_windows(plan, n)
    np.testing.assert_array_equal(plan.windows(n), windows)
    cache = windows.reshape(3, 2, 4).max(-1)
    np.testing.assert_array_equal(plan.cache_windows(n), cache)
    masks = rules_lib.attend_mask(
      pos[:n, None], pos[None, :n], plan.sink, windows[..., None, None]
    )  # [L, H, n, n]
    assert plan.attention_density(n) == pytest.approx(masks.mean((0, 1)).sum() / (n * (n + 1) / 2))
    group_masks = rules_lib.attend_mask(
      pos[:n, None], pos[None, :n], plan.sink, cache[..., None, None]
    )  # [L, K, n, n]
    assert plan.kv_density(n) == pytest.approx(group_masks[..., n - 1, :].mean((0, 1)).sum() / n)
  measured = plan.with_densities([100, 37])
  assert list(measured.kv_densities) == [37, 100]
  assert measured.attention_densities[37] == plan.attention_density(37)


def test_query_head_cache_is_group_max():
  alphas = np.array([[0.0, 0.0, 64.0, 0.0]])
  betas = np.array([[0.25, 0.5, 0.0, 0.125]])
  plan = plan_lib.Plan(1, 4, 2, alphas, betas, sink=4, block=4, grouping="query_head")
  np.testing.assert_array_equal(plan.windows(256), [[64, 128, 64, 32]])
  np.testing.assert_array_equal(plan.cache_windows(256), [[128, 64]])
  assert plan.kv_density(256) == pytest.approx((132 + 68) / 2 / 256)


@pytest.mark.parametrize("grouping", ["kv_group", "query_head"])
def test_json_round_trip(tmp_path, grouping):
  rng = np.random.default_rng(1)
  plan = dataclasses.replace(
    _random_plan(rng, grouping=grouping, sink=64).with_densities([64, 128]),
    objectives={64: 0.25, 128: 1.5},
    provenance={
      "config": {"budget": 0.5, "lengths": [64, 128]},
      "seed": 3,
      "calibration": "multinews-1a2b",
    },
  )
  path = tmp_path / "sub" / "plan.json"
  plan.save(path)
  back = plan_lib.Plan.load(path)
  for field in dataclasses.fields(plan_lib.Plan):
    mine, theirs = getattr(plan, field.name), getattr(back, field.name)
    if isinstance(mine, np.ndarray):
      np.testing.assert_array_equal(theirs, mine)
    else:
      assert theirs == mine, field.name
  assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary file left
  data = json.loads(plan.to_json())
  data["version"] = 99
  with pytest.raises(ValueError, match="version"):
    plan_lib.Plan.from_json(json.dumps(data))
  with pytest.raises(ValueError, match="official"):
    plan_lib.Plan.from_json(plan.to_official_json())
  del data["model"]
  data["version"] = plan_lib.FORMAT_VERSION
  with pytest.raises(ValueError, match="model"):
    plan_lib.Plan.from_json(json.dumps(data))


def test_official_round_trip_and_gqa_consistency():
  rng = np.random.default_rng(2)
  grouped = _random_plan(rng, sink=64)
  official = json.loads(grouped.to_official_json())
  assert np.shape(official["alphas"]) == (3, 8)  # MHA layout: one entry per query head
  back = plan_lib.Plan.from_official_json(grouped.to_official_json(), GQA)
  assert back.grouping == "kv_group"
  np.testing.assert_array_equal(back.alphas, grouped.alphas)
  np.testing.assert_array_equal(back.betas, grouped.betas)

  per_head = _random_plan(rng, grouping="query_head", sink=64)
  assert not np.all(per_head.alphas.reshape(3, 2, 4) == per_head.alphas.reshape(3, 2, 4)[..., :1])
  back = plan_lib.Plan.from_official_json(per_head.to_official_json(), GQA)
  assert back.grouping == "query_head"
  np.testing.assert_array_equal(back.windows(4096), per_head.windows(4096))
  with pytest.raises(ValueError, match="different rules"):
    plan_lib.Plan.from_official_json(per_head.to_official_json(), GQA, grouping="kv_group")

  grouped_rows = {"alphas": grouped.alphas.tolist(), "betas": grouped.betas.tolist()}
  with pytest.raises(ValueError, match="8 entries"):  # per-group rows for a GQA model
    plan_lib.Plan.from_official_json(json.dumps(grouped_rows), GQA)
  with pytest.raises(ValueError, match="4 layers"):
    plan_lib.Plan.from_official_json(grouped.to_official_json(), Shape(4, 8, 2))
  with pytest.raises(ValueError, match="sink 64"):
    _random_plan(rng, sink=8).to_official_json()


def test_bad_plans_are_rejected():
  rng = np.random.default_rng(3)
  plan = _random_plan(rng)
  assert plan.validate(GQA) is plan
  with pytest.raises(ValueError, match="model has"):
    plan.validate(Shape(3, 8, 8))
  with pytest.raises(ValueError, match="lacks num_layers"):
    plan.validate(object())
  fields = dict(num_layers=3, num_heads=8, num_kv_heads=2, sink=8, block=8)
  good = rng.uniform(1.0, 10.0, size=(3, 2))
  with pytest.raises(ValueError, match="NaN"):
    plan_lib.Plan(alphas=np.where(good > 5, np.nan, good), betas=good, **fields)
  with pytest.raises(ValueError, match="non-positive span"):
    plan_lib.Plan(alphas=-good, betas=np.zeros((3, 2)), **fields)
  with pytest.raises(ValueError, match="negative beta"):
    plan_lib.Plan(alphas=good, betas=-good, **fields)
  with pytest.raises(ValueError, match=r"expected \(3, 8\)"):
    plan_lib.Plan(alphas=good, betas=good, grouping="query_head", **fields)
  with pytest.raises(ValueError, match="grouping"):
    plan_lib.Plan(alphas=good, betas=good, grouping="per_head", **fields)
  with pytest.raises(ValueError, match="rectangular"):
    plan_lib.Plan(alphas=[[1.0, 2.0], [1.0]], betas=good, **fields)


def test_baselines():
  shape = Shape(2, 4, 4)
  dense = plan_lib.dense_plan(shape)
  assert dense.kv_density(5000) == 1.0 and dense.attention_density(300) == 1.0
  for n, density in ((4096, 0.5), (1000, 0.3)):
    uniform = plan_lib.uniform_plan(shape, density, n)
    assert np.all(uniform.alphas == 0)
    assert density - 1 / n < uniform.kv_density(n) <= density
  with pytest.raises(ValueError, match="density in"):
    plan_lib.uniform_plan(shape, 0.05, 2048)
  with pytest.raises(ValueError, match="beyond the sink"):
    plan_lib.uniform_plan(shape, 1.0, 64)


def test_plots_write_pngs(tmp_path):
  rng = np.random.default_rng(4)
  plan = _random_plan(rng, grouping="query_head")
  plots.plot_spans(plan, 100, tmp_path / "spans.png")
  plans = [
    dataclasses.replace(plan, objectives={64: float(a), 128: float(b), 256: float(c)})
    for a, b, c in rng.exponential(size=(5, 3))
  ]
  plots.plot_pareto_front(plans, tmp_path / "front.png", chosen=plans[2])
  plots.plot_pareto_front(plans[:1], tmp_path / "single.png")
  for name in ("spans.png", "front.png", "single.png"):
    image = matplotlib.image.imread(tmp_path / name)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a real, non-blank PNG
  with pytest.raises(ValueError, match="at least one"):
    plots.plot_pareto_front([], tmp_path / "empty.png")
  with pytest.raises(ValueError, match="no objective"):
    plots.plot_pareto_front([plan], tmp_path / "none.png")
