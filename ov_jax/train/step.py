"""Loss, gradients and the jitted train step.

Everything device-side is a pure function of plain pytrees: the loss of one micro-batch
(:func:`micro_batch_nll`), gradients accumulated over K micro-batches (:func:`accumulated_grads`), and the
optimizer update. :func:`make_train_step` wraps them into a :class:`TrainStep` that is jitted once per
batch shape, donates the :class:`TrainState` and keeps every array on the mesh the sharding rules
(`ov_jax.sharding`) give it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ov_jax import sharding
from ov_jax.config import OneVisionConfig
from ov_jax.modeling import llava
from ov_jax.nn.backends import resolve_attention
from ov_jax.nn.lora import is_adapter
from ov_jax.params import LoraSpec, check_tree
from ov_jax.train import freeze as freezing
from ov_jax.train import lora
from ov_jax.train.batch import Batch, make_batch, stack_micro_batches


@flax.struct.dataclass
class TrainState:
    """What a run saves and resumes: ``step`` (int32 scalar), ``params`` (the full float32 params tree),
    ``opt_state`` (the optimizer's state over the trainable leaves only) and ``rng`` (uint32 ``[2]``)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def micro_batch_nll(params: dict, batch: Batch, *, config: OneVisionConfig, compute_dtype: Any,
                    remat: str | None = None, attention: str = "xla") -> tuple[jax.Array, jax.Array]:
    """Sum of next-token negative log-likelihoods (float32) and the number of label tokens, for one batch.

    Labels are shifted inside (position ``t`` predicts ``labels[t + 1]``); ``-100`` is ignored. The loss is
    `ov_jax.modeling.llava.loss`: chunked over the vocabulary, never a full ``[B, T, V]`` logits tensor.
    ``attention``: a resolved backend name (`ov_jax.nn.backends.resolve_attention`).
    """
    return llava.loss(params, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                      batch["tower_inputs"], batch["tap_index"], batch["tap_weight"], batch["is_media"],
                      batch["labels"], config=config, dtype=compute_dtype, segment_ids=batch.get("segment_ids"),
                      remat=remat, attention=attention)


def accumulated_grads(trainable: dict, params: dict, batches: Batch, *, config: OneVisionConfig,
                      compute_dtype: Any, remat: str | None = None, dropout: float = 0.0,
                      rng: jax.Array | None = None, attention: str = "xla") -> tuple[jax.Array, dict, jax.Array]:
    """Mean loss and its gradient w.r.t. ``trainable`` over K stacked micro-batches (leading axis of ``batches``).

    ``trainable`` is a sub-tree of ``params`` (`ov_jax.train.freeze.select`); every other leaf enters under
    ``stop_gradient``. Gradients of the summed token losses are accumulated and divided by the total token
    count once, so K micro-batches give the gradient of one batch holding all their rows. ``dropout`` > 0:
    LoRA dropout with keys drawn from ``rng`` (a different mask per micro-batch, `ov_jax.train.lora`).
    ``attention``: a resolved backend name. Returns ``(loss, grads, tokens)``.
    """
    frozen = jax.lax.stop_gradient(params)

    def nll(sub, batch, key):
        full = freezing.merge(frozen, sub)
        if dropout:
            full = lora.with_dropout(full, dropout, key)
        return micro_batch_nll(full, batch, config=config, compute_dtype=compute_dtype, remat=remat,
                               attention=attention)

    grad_fn = jax.value_and_grad(nll, has_aux=True)
    k = batches["input_ids"].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(0) if rng is None else rng, k)
    if k == 1:
        (total, count), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], batches), keys[0])
    else:
        def body(carry, xs):
            g_sum, nll_sum, n_sum = carry
            (value, n), g = grad_fn(trainable, *xs)
            return (jax.tree.map(jnp.add, g_sum, g), nll_sum + value, n_sum + n), None

        zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, total, count), _ = jax.lax.scan(body, zeros, (batches, keys))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    return total / denom, jax.tree.map(lambda g: g / denom.astype(g.dtype), grads), count


@functools.lru_cache(maxsize=8)
def _jit_loss_and_grad(config: OneVisionConfig, compute_dtype: Any, attention: str) -> Callable:
    def fn(params, batch):
        loss, grads, _ = accumulated_grads(params, params, batch, config=config, compute_dtype=compute_dtype,
                                           attention=attention)
        return loss, grads

    return jax.jit(fn)


def loss_and_grad(model, labels, **inputs) -> tuple[jax.Array, dict]:
    """Mean next-token loss of ``model`` (a `ov_jax.model.LlavaOnevision`) on the processor's ``inputs``
    and its gradient w.r.t. every weight, as a tree shaped like ``model.params``.

    ``labels [B, T]`` follow transformers: ``-100`` is ignored and the shift happens inside. The loss is
    float32; compute runs in ``model.dtype`` with the model's attention backend (``model.attention``). Errors:
    see `ov_jax.train.batch.make_batch`.
    """
    batch = make_batch(model.config, labels=labels, **inputs)
    stacked = {k: v[None] for k, v in batch.items()}
    return _jit_loss_and_grad(model.config, model.dtype, model.attention)(model.params, stacked)


class TrainStep:
    """A jitted, donating train step; build it with :func:`make_train_step`.

    ``init(params, seed)`` → :class:`TrainState` (params placed on the mesh, optimizer state over the
    trainable leaves, the trainable table logged); ``step(state, micro_batches)`` → ``(state, metrics)`` where
    ``micro_batches`` is a list of ``grad_accum`` batches from `ov_jax.train.make_batch` (or one batch already
    stacked with `stack_micro_batches`) and ``metrics`` holds float32 scalars ``loss`` (token-weighted mean),
    ``grad_norm`` (global norm before clipping) and the int32 ``tokens`` count. The state passed in is
    donated: use the returned one.
    """

    def __init__(self, config: OneVisionConfig, optimizer: optax.GradientTransformation, *, mesh=None,
                 freeze=None, lora: LoraSpec | None = None, lora_dropout: float = 0.0, grad_accum: int = 1,
                 compute_dtype: Any = jnp.bfloat16, remat: str | None = None, attention: str = "auto",
                 log: Callable[[str], Any] | None = print):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if lora_dropout and lora is None:
            raise ValueError("lora_dropout needs LoRA adapters (lora=...)")
        from ov_jax.model import resolve_dtype

        self.config = config
        self.optimizer = optimizer
        self.mesh = None if mesh is None else sharding.make_mesh(mesh)
        self.freeze = freeze
        self.grad_accum = grad_accum
        self.compute_dtype = resolve_dtype(compute_dtype)
        platform = jax.default_backend() if self.mesh is None else self.mesh.devices.flat[0].platform
        self.attention = resolve_attention(attention, platform, self.compute_dtype)
        self.lora = lora
        self.lora_dropout = float(lora_dropout)
        self.remat = remat
        self.log = log
        self._jitted = None

    # --- which leaves train -----------------------------------------------------------------------------------

    def trainable_mask(self, params: dict) -> Any:
        """Tree of bools over ``params``: True where the leaf trains. With LoRA only the adapters train (base
        weights and ``lora_scale`` frozen); ``freeze`` patterns then freeze further leaves."""
        frozen = freezing.matching(params, self.freeze)
        if self.lora is None:
            return jax.tree.map(lambda f: not f, frozen)
        return jax.tree_util.tree_map_with_path(
            lambda p, f: is_adapter(freezing.path_name(p)) and not f, frozen)

    # --- state ------------------------------------------------------------------------------------------------

    def init(self, params: dict, seed: int = 0) -> TrainState:
        """A fresh state at step 0 holding a float32 copy of ``params`` (the master weights; steps donate the
        state, so the caller's arrays are never consumed)."""
        check_tree(params, self.config, self.lora)
        mask = self.trainable_mask(params)
        if self.log is not None:
            self.log(freezing.trainable_table(params, mask))
        if not any(jax.tree.leaves(mask)):
            raise freezing.FreezeError("every parameter is frozen: nothing would train")
        params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), params)
        rng = jax.random.PRNGKey(seed)
        if self.mesh is None:
            opt_state = jax.jit(self.optimizer.init)(freezing.select(params, mask))
            return TrainState(jnp.zeros((), jnp.int32), params, opt_state, rng)
        shardings = sharding.param_shardings(self.config, self.mesh, lora=self.lora)
        params = jax.tree.map(jax.device_put, params, shardings)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        sub = freezing.select(params, mask)
        abstract = jax.eval_shape(self.optimizer.init, sub)
        opt_shardings = optax.tree_map_params(self.optimizer, lambda _, s: s, abstract,
                                              freezing.select(shardings, mask),
                                              transform_non_params=lambda _: replicated)
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(sub)
        put = functools.partial(jax.device_put, device=replicated)
        return TrainState(put(jnp.zeros((), jnp.int32)), params, opt_state, put(rng))

    # --- the step ---------------------------------------------------------------------------------------------

    def _update(self, state: TrainState, batches: Batch) -> tuple[TrainState, dict]:
        mask = self.trainable_mask(state.params)
        trainable = freezing.select(state.params, mask)
        rng, dropout_rng = jax.random.split(state.rng)
        loss, grads, tokens = accumulated_grads(trainable, state.params, batches, config=self.config,
                                                compute_dtype=self.compute_dtype, remat=self.remat,
                                                dropout=self.lora_dropout, rng=dropout_rng,
                                                attention=self.attention)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
        params = freezing.merge(state.params, optax.apply_updates(trainable, updates))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    def _batch_shardings(self, batches: Batch) -> Any:
        kinds = {"tower_inputs": (None, "tiles", None, None, None)}

        def one(key, x):
            axes = kinds.get(key, (None, "batch", "length") + (None,) * (x.ndim - 3))
            return sharding.activation_sharding(self.mesh, axes, x.shape)

        return {k: one(k, v) for k, v in batches.items()}

    def __call__(self, state: TrainState, micro_batches: Sequence[Batch] | Batch) -> tuple[TrainState, dict]:
        batches = (micro_batches if isinstance(micro_batches, dict) else stack_micro_batches(micro_batches))
        k = batches["input_ids"].shape[0]
        if k != self.grad_accum:
            raise ValueError(f"got {k} micro-batches for grad_accum={self.grad_accum}")
        if self.mesh is not None:
            batches = {k: sharding.put_global(v, s) for (k, v), s in
                       zip(batches.items(), self._batch_shardings(batches).values())}
        if self._jitted is None:
            out_state = jax.tree.map(lambda x: x.sharding, state) if self.mesh is not None else None
            out = None if out_state is None else (out_state, None)
            self._jitted = jax.jit(self._update, donate_argnums=0, out_shardings=out)
        return self._jitted(state, batches)


def make_train_step(config: OneVisionConfig, optimizer: optax.GradientTransformation, *, mesh=None, freeze=None,
                    lora: LoraSpec | None = None, lora_dropout: float = 0.0, grad_accum: int = 1,
                    compute_dtype: Any = jnp.bfloat16, remat: str | None = None, attention: str = "auto",
                    log: Callable[[str], Any] | None = print) -> TrainStep:
    """A :class:`TrainStep` for ``config``.

    ``optimizer``: an optax transformation (`ov_jax.train.optimizer` builds AdamW + schedule + clipping);
    ``mesh``: a mesh or mesh spec (`ov_jax.sharding.make_mesh`) — params and optimizer moments sharded by
    the logical rules (FSDP over ``fsdp``, Megatron over ``tensor``), batch rows over ``data``/``fsdp``;
    ``freeze``: presets (``vision_tower``, ``projector``, ``language_model``, ``image_newline``) or regexes
    over params paths, a comma-separated string or a list — frozen leaves get no gradient and no optimizer
    state; ``lora``: the `ov_jax.params.LoraSpec` of the adapters the params carry (`ov_jax.train.lora.add_lora`)
    — then only the adapters train; ``lora_dropout``: dropout rate on the adapters' inputs (a fresh mask per
    step and micro-batch from the state's RNG); ``grad_accum``: micro-batches per step (token-weighted, equal
    to one batch of all their rows); ``compute_dtype``: activation / matmul dtype (params stay float32
    masters); ``remat``: a remat policy name for both layer scans (`ov_jax.modeling.layers.REMAT_POLICIES`;
    None keeps every activation); ``attention``: the attention backend, a name as
    ``LlavaOnevision.from_pretrained(attention=...)`` takes (``"auto"``, ``"xla"``, ``"cpu"``, ``"cudnn"``,
    ``"splash"``; `ov_jax.nn.backends`), resolved for the mesh's platform and ``compute_dtype`` (the resolved
    name is ``TrainStep.attention``; an unknown one, or one this platform / dtype cannot run, is an
    `ov_jax.nn.backends.AttentionBackendError` naming it); ``log``: where the trainable-parameter table goes
    (None: nowhere).
    """
    return TrainStep(config, optimizer, mesh=mesh, freeze=freeze, lora=lora, lora_dropout=lora_dropout,
                     grad_accum=grad_accum, compute_dtype=compute_dtype, remat=remat, attention=attention, log=log)
