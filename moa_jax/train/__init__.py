"""Training of moa_jax's own reference model (tokenizer, data mixture, trainer, checkpoints).

The trained model ships in moa_jax/assets/reference_model (HF format; TRAINING.md there says how
it was made); `moa_jax.models.loading.reference_model_dir()` is its path.
"""
