"""Profiling (docs/method.md, "Profile"): attention influence E_bar from jax.grad of the loss."""

from moa_jax.profile.influence import block_influence_from_grads, block_influence_tiled
from moa_jax.profile.profiler import batch_influence, profile_model, response_loss

__all__ = [
  "block_influence_from_grads",
  "block_influence_tiled",
  "batch_influence",
  "profile_model",
  "response_loss",
]
