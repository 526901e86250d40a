"""Host-side (numpy) training batches: processor outputs + labels → the arrays the jitted train step takes.

A :data:`Batch` is a plain dict of numpy arrays for ``B`` rows of ``T`` tokens:

  input_ids     int32 [B, T]      attention_mask bool [B, T]     position_ids int32 [B, T]
  labels        int32 [B, T]      (-100 = ignored; shifted inside the loss, as transformers does)
  tower_inputs  float32 [N, C, H, W]   tiles and frames for the vision tower (the media plan's order)
  tap_index     int32 [B, T, 4]   tap_weight float32 [B, T, 4]   is_media bool [B, T]
  segment_ids   int32 [B, T]      optional: packed rows (1, 2, ... per sample, 0 = padding)

The arrays are checked and the media planned exactly as ``LlavaOnevision.__call__`` does
(`ov_jax.inputs.model_inputs`).
:func:`stack_micro_batches` pads K such batches to one shape and stacks them on a leading micro-batch axis.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.inputs import IGNORE_INDEX, InputError, model_inputs

Batch = dict[str, np.ndarray]
TOKEN_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels", "tap_index", "tap_weight", "is_media")


class BatchError(InputError):
    """Micro-batches that cannot be stacked into one step's batch (the message says why)."""


def make_batch(config: OneVisionConfig, *, labels, input_ids, attention_mask=None, pixel_values=None,
               image_sizes=None, batch_num_images=None, pixel_values_videos=None, position_ids=None,
               segment_ids=None, **unused) -> Batch:
    """One (micro-)batch from the processor's outputs and ``labels [B, T]``.

    ``unused`` takes processor outputs the model does not read (e.g. ``assistant_masks``). Positions default
    to ``arange(T)`` per row, as transformers' forward does; ``segment_ids`` mark packed rows. The checks are
    the model's own (`ov_jax.inputs.model_inputs`): `ov_jax.inputs.InputError` (a ``ValueError``) on
    non-integer ids, mismatched shapes or labels outside ``[0, vocab)`` ∪ {-100}, and
    `ov_jax.media_plan.MediaMismatchError` when placeholders and media disagree.
    """
    return model_inputs(config, input_ids, attention_mask, pixel_values, image_sizes, batch_num_images,
                        pixel_values_videos, position_ids, labels=labels, segment_ids=segment_ids)


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
