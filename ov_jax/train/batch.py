"""Host-side (numpy) training batches: processor outputs + labels → the arrays the jitted train step takes.

A :data:`Batch` is a plain dict of numpy arrays for ``B`` rows of ``T`` tokens:

  input_ids     int32 [B, T]      attention_mask bool [B, T]     position_ids int32 [B, T]
  labels        int32 [B, T]      (-100 = ignored; shifted inside the loss, as transformers does)
  tower_inputs  float32 [N, C, H, W]   tiles and frames for the vision tower (the media plan's order)
  tap_index     int32 [B, T, 4]   tap_weight float32 [B, T, 4]   is_media bool [B, T]
  segment_ids   int32 [B, T]      optional: packed rows (1, 2, ... per sample, 0 = padding)

The media plan is built exactly as ``LlavaOnevision.__call__`` builds it (`ov_jax.media_plan`).
:func:`stack_micro_batches` pads K such batches to one shape and stacks them on a leading micro-batch axis.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.media_plan import build_media_plan

IGNORE_INDEX = -100
Batch = dict[str, np.ndarray]
TOKEN_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels", "tap_index", "tap_weight", "is_media")


class BatchError(ValueError):
    """Training inputs that do not describe one consistent batch (named field and shapes in the message)."""


def _integers(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise BatchError(f"{name} must hold integers, got dtype {a.dtype}")
    return a


def make_batch(config: OneVisionConfig, *, labels, input_ids, attention_mask=None, pixel_values=None,
               image_sizes=None, batch_num_images=None, pixel_values_videos=None, position_ids=None,
               segment_ids=None, **unused) -> Batch:
    """One (micro-)batch from the processor's outputs and ``labels [B, T]``.

    ``unused`` takes processor outputs the model does not read (e.g. ``assistant_masks``). Positions default
    to ``arange(T)`` per row, as transformers' forward does; ``segment_ids`` mark packed rows.
    Raises :class:`BatchError` on mismatched shapes or labels outside ``[0, vocab)`` ∪ {-100}, and
    `ov_jax.media_plan.MediaMismatchError` when placeholders and media disagree.
    """
    input_ids = _integers(input_ids, "input_ids")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    labels = _integers(labels, "labels")
    labels = labels[None] if labels.ndim == 1 else labels
    if labels.shape != (b, t):
        raise BatchError(f"labels shape {labels.shape} != input_ids shape {(b, t)}")
    vocab = config.text.vocab_size
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise BatchError(f"labels hold {int(bad.sum())} value(s) outside [0, {vocab}) and != {IGNORE_INDEX}, "
                         f"e.g. {int(labels[bad][0])}")
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != (b, t):
        raise BatchError(f"attention_mask shape {mask.shape} != input_ids shape {(b, t)}")
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(t), (b, t))
    position_ids = _integers(position_ids, "position_ids")
    if position_ids.shape != (b, t):
        raise BatchError(f"position_ids shape {position_ids.shape} != input_ids shape {(b, t)}")
    plan = build_media_plan(input_ids, config, pixel_values, image_sizes, batch_num_images, pixel_values_videos)
    extra = {}
    if segment_ids is not None:
        segment_ids = _integers(segment_ids, "segment_ids")
        if segment_ids.shape != (b, t):
            raise BatchError(f"segment_ids shape {segment_ids.shape} != input_ids shape {(b, t)}")
        extra["segment_ids"] = segment_ids.astype(np.int32)
    return extra | {
        "input_ids": input_ids.astype(np.int32), "attention_mask": mask,
        "position_ids": np.asarray(position_ids, np.int32), "labels": labels.astype(np.int32),
        "tower_inputs": plan.tower_inputs, "tap_index": plan.tap_index.astype(np.int32),
        "tap_weight": plan.tap_weight.astype(np.float32), "is_media": plan.is_media,
    }


def token_count(batch: Batch) -> int:
    """Tokens that carry a loss: labels after the shift that are not ignored."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def _pad_to(x: np.ndarray, shape: Sequence[int], value: Any = 0) -> np.ndarray:
    if x.shape == tuple(shape):
        return x
    out = np.full(shape, value, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def stack_micro_batches(batches: Sequence[Batch]) -> Batch:
    """K micro-batches → one batch with a leading ``[K, ...]`` axis on every field.

    Rows must agree in count; shorter sequences are right-padded (mask 0, labels -100, no media) and
    shorter tower inputs padded with zero tiles no tap reads, so the loss and gradients are unchanged.
    """
    if not batches:
        raise BatchError("no micro-batches given")
    rows = {b["input_ids"].shape[0] for b in batches}
    if len(rows) != 1:
        raise BatchError(f"micro-batches must have the same number of rows, got {sorted(rows)}")
    t = max(b["input_ids"].shape[1] for b in batches)
    n = max(b["tower_inputs"].shape[0] for b in batches)
    fill = {"labels": IGNORE_INDEX}
    keys = {tuple(sorted(b)) for b in batches}
    if len(keys) != 1:
        raise BatchError("micro-batches hold different fields (e.g. segment_ids in some only)")
    out = {}
    for key in TOKEN_FIELDS + (("segment_ids",) if "segment_ids" in batches[0] else ()):
        out[key] = np.stack([_pad_to(b[key], (b[key].shape[0], t) + b[key].shape[2:], fill.get(key, 0))
                             for b in batches])
    out["tower_inputs"] = np.stack([_pad_to(b["tower_inputs"], (n,) + b["tower_inputs"].shape[1:])
                                    for b in batches])
    return out
