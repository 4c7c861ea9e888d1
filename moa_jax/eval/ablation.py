"""Which KV groups does a task need, and does the profile see them?

A group cut: one (layer, KV group) attends only its sink and a short window while every other
group stays dense (`group_cut_factory`, methods named `cut_method(layer, group)`), evaluated with
the harness like any method. Its counterpart in the profile: the group's share of the profiled
influence E_bar outside that window (`far_influence_share`).
"""

from __future__ import annotations

import functools

import numpy as np

from moa_jax.attention.dense import DenseAttention
from moa_jax.attention.moa import MoAAttention
from moa_jax.eval.harness import AttentionFactory
from moa_jax.plans.rules import DEFAULT_SINK, expand_to_query_heads


def cut_method(layer: int, group: int) -> str:
  """The method name of cutting KV group `group` of layer `layer`."""
  return f"cut_{layer}_{group}"


def group_cut_factory(config, window: int, sink: int = DEFAULT_SINK) -> AttentionFactory:
  """Methods 'dense' and cut_method(l, g) for every layer l and KV group g of the model
  `config`: group (l, g) attends sink + `window` tokens, every other group the planned length N
  (dense). Memoized like `harness.plan_factory`."""
  names = {
    cut_method(l, g): (l, g) for l in range(config.num_layers) for g in range(config.num_kv_heads)
  }

  @functools.cache
  def factory(method: str, length: int):
    if method == "dense":
      return DenseAttention()
    if method not in names:
      raise ValueError(
        f"unknown method {method!r}; this factory knows 'dense' and "
        f"{cut_method(0, 0)} .. {cut_method(config.num_layers - 1, config.num_kv_heads - 1)}"
      )
    windows = np.full((config.num_layers, config.num_kv_heads), length)  # [L, K]
    windows[names[method]] = window
    return MoAAttention(expand_to_query_heads(windows, config.num_heads), sink=sink)

  return factory


def far_influence_share(e_bar: np.ndarray, window: int, block: int, group_size: int) -> np.ndarray:
  """float [L, K]: each KV group's share of the influence outside a `window`-token window.

  e_bar: [L, N, nb, nb] profiled influence per query head and (query block, key block). Counted:
  non-sink key blocks c > 0 with r - c >= window / block, summed over the group's query heads,
  divided by that sum over every head.
  """
  nb = e_bar.shape[-1]
  r, c = np.tril_indices(nb)
  far = (r - c >= window // block) & (c > 0)
  share = e_bar[..., r[far], c[far]].sum(-1)  # [L, N]
  layers, heads = share.shape
  return share.reshape(layers, heads // group_size, group_size).sum(-1) / share.sum()
