"""Checkpoint conversion entry points (``python -m convert.convert_checkpoint``, ``ov-jax convert``)."""
