"""Processor outputs → the checked host-side (numpy) arrays of one batch, for the forward and for training.

`ov_jax.model.LlavaOnevision` (its calls) and `ov_jax.train.make_batch` both go through :func:`model_inputs`,
so the two accept and refuse exactly the same inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.media_plan import build_media_plan

IGNORE_INDEX = -100


class InputError(ValueError):
    """Model inputs that do not describe one consistent batch (the message names the input and its shape)."""


def integers(x: Any, name: str) -> np.ndarray:
    """``x`` as a numpy array of integers; any other dtype is an :class:`InputError` naming ``name``."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise InputError(f"{name} must hold integers, got dtype {a.dtype}")
    return a


def _per_token(x: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    a = integers(x, name)
    a = a[None] if a.ndim == 1 else a
    if a.shape != shape:
        raise InputError(f"{name} shape {a.shape} != input_ids shape {shape}")
    return a.astype(np.int32)


def model_inputs(config: OneVisionConfig, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                 batch_num_images=None, pixel_values_videos=None, position_ids=None, labels=None,
                 segment_ids=None) -> dict[str, np.ndarray]:
    """The arrays `ov_jax.modeling.llava.hidden_states` / ``loss`` take, checked against each other.

    ``input_ids [B, T]`` (or ``[T]``: one row); ``attention_mask [B, T]`` (default all ones) → bool;
    ``position_ids [B, T]`` (default ``arange(T)`` per row, as transformers' forward); the media arguments as
    the processor returns them, planned by `ov_jax.media_plan.build_media_plan` into ``tower_inputs`` float32
    ``[N, C, H, W]``, ``tap_index`` int32 ``[B, T, 4]``, ``tap_weight`` float32 ``[B, T, 4]``, ``is_media`` bool
    ``[B, T]``. When given, ``labels [B, T]`` (``-100`` = ignored, else in ``[0, vocab)``) and ``segment_ids
    [B, T]`` (packed rows) are checked and included. Token arrays come back int32. Raises :class:`InputError`
    for a non-integer array, a shape that differs from ``input_ids``' or a label outside the vocabulary, and
    `ov_jax.media_plan.MediaMismatchError` when placeholders and media disagree.
    """
    input_ids = integers(input_ids, "input_ids")
    input_ids = input_ids[None] if input_ids.ndim == 1 else input_ids
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    shape = b, t = input_ids.shape
    mask = np.ones(shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    mask = mask[None] if mask.ndim == 1 else mask
    if mask.shape != shape:
        raise InputError(f"attention_mask shape {mask.shape} != input_ids shape {shape}")
    positions = np.broadcast_to(np.arange(t), shape) if position_ids is None else position_ids
    plan = build_media_plan(input_ids, config, pixel_values, image_sizes, batch_num_images, pixel_values_videos)
    out = {"input_ids": input_ids.astype(np.int32), "attention_mask": mask,
           "position_ids": _per_token(positions, "position_ids", shape), "tower_inputs": plan.tower_inputs,
           "tap_index": plan.tap_index.astype(np.int32), "tap_weight": plan.tap_weight.astype(np.float32),
           "is_media": plan.is_media}
    if labels is not None:
        labels = _per_token(labels, "labels", shape)
        vocab = config.text.vocab_size
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            raise InputError(f"labels hold {int(bad.sum())} value(s) outside [0, {vocab}) and != {IGNORE_INDEX}, "
                             f"e.g. {int(labels[bad][0])}")
        out["labels"] = labels
    if segment_ids is not None:
        out["segment_ids"] = _per_token(segment_ids, "segment_ids", shape)
    return out
