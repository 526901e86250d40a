"""The optimizer: AdamW with linear warm-up + cosine decay and global-norm clipping, transformers' defaults.

Defaults follow transformers' ``TrainingArguments``: betas 0.9 / 0.999, eps 1e-8, weight decay 0.0,
``max_grad_norm`` 1.0; like its ``Trainer``, biases and norm weights (``*.bias``, ``*.scale``) are never decayed.
The schedule is ``get_cosine_schedule_with_warmup``'s: 0 → ``learning_rate`` linearly over ``warmup_steps``,
then a half cosine to 0 at ``total_steps`` (constant after warm-up when ``total_steps`` is None).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

NO_DECAY_LEAVES = ("bias", "scale")


class OptimizerError(ValueError):
    """An optimizer hyper-parameter out of range (named in the message)."""


def lr_schedule(learning_rate: float, warmup_steps: int = 0, total_steps: int | None = None) -> optax.Schedule:
    """Learning rate at optimizer step ``count`` (0-based): linear warm-up, then cosine decay to 0."""
    if not learning_rate > 0:
        raise OptimizerError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise OptimizerError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is None:
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                     optax.constant_schedule(learning_rate)], [warmup_steps])
    if total_steps < max(warmup_steps, 1):
        raise OptimizerError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps}) and >= 1")
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps, end_value=0.0)


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: every weight but biases and norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY_LEAVES, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale every update by ``min(1, max_norm / (global_norm + 1e-6))``: torch's ``clip_grad_norm_`` formula.

    One scalar multiply per leaf, so XLA fuses it into the optimizer's elementwise update; optax's
    ``clip_by_global_norm`` selects between the clipped and the raw leaf, which XLA:CPU materialises as a
    gradient-sized temporary (3.6 GB on the 0.5B architecture's float32 gradients)."""

    def update(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def check_decay_and_clipping(weight_decay: float, max_grad_norm: float | None) -> None:
    """:class:`OptimizerError` unless ``weight_decay`` is a finite number >= 0 and ``max_grad_norm`` is None or
    a number > 0 (a NaN decay would turn every decayed weight into NaN after the first step)."""
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
            math.isfinite(weight_decay) and weight_decay >= 0):
        raise OptimizerError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not max_grad_norm > 0):
        raise OptimizerError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")


def optimizer(learning_rate: float = 5e-5, *, warmup_steps: int = 0, total_steps: int | None = None,
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
              max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """:func:`clip_by_global_norm` ``(max_grad_norm)`` → AdamW (decoupled decay, masked by :func:`decay_mask`) with
    :func:`lr_schedule`. Equal step for step to ``torch.optim.AdamW`` after ``clip_grad_norm_``."""
    check_decay_and_clipping(weight_decay, max_grad_norm)
    schedule = lr_schedule(learning_rate, warmup_steps, total_steps)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm is None:
        return adamw
    return optax.chain(clip_by_global_norm(max_grad_norm), adamw)
