"""Fine-tuning: loss and gradients in the params layout, a jitted sharded train step, freezing and LoRA."""

from ov_jax.train.batch import IGNORE_INDEX, Batch, BatchError, make_batch, stack_micro_batches, token_count
from ov_jax.train.freeze import PRESETS, FreezeError, trainable_table
from ov_jax.train.optim import OptimizerError, decay_mask, lr_schedule, optimizer
from ov_jax.train.step import TrainState, TrainStep, accumulated_grads, loss_and_grad, make_train_step

__all__ = [
    "IGNORE_INDEX", "Batch", "BatchError", "make_batch", "stack_micro_batches", "token_count", "PRESETS",
    "FreezeError", "trainable_table", "OptimizerError", "decay_mask", "lr_schedule", "optimizer", "TrainState",
    "TrainStep", "accumulated_grads", "loss_and_grad", "make_train_step",
]
