"""Profiling (MOA_SPEC.md sections 1-2): calibration data and attention influence E_bar."""

from moa_jax.profile.calibration import (CalibrationBucket, CalibrationConfig, CalibrationSet,
                                         build_calibration)
from moa_jax.profile.influence import block_influence_from_grads, block_influence_tiled
from moa_jax.profile.profiler import batch_influence, profile_model, response_loss

__all__ = [
    "CalibrationBucket", "CalibrationConfig", "CalibrationSet", "build_calibration",
    "block_influence_from_grads", "block_influence_tiled", "batch_influence", "profile_model",
    "response_loss",
]
