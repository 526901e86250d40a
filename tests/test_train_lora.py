"""LoRA fine-tuning: only adapters train, merged equals unmerged, target presets, LoRA dropout."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ov_jax import train
from ov_jax.model import LlavaOnevision
from ov_jax.nn.lora import adapter_count, merge_lora
from ov_jax.train import freeze as freezing
from ov_jax.train import lora
from train_helpers import mixed_batch


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return LlavaOnevision.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def data(model):
    inputs, labels = mixed_batch(model.config, np.random.default_rng(0), padding="left", rows=("video", "text"))
    return inputs, labels, train.make_batch(model.config, labels=labels, **inputs)


def _flat(tree):
    return {freezing.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_only_adapters_train_and_merged_equals_unmerged(model, data):
    inputs, _, batch = data
    params, spec = lora.add_lora(model.params, model.config, rank=4, alpha=8, targets="language_model,projector")
    tables = []
    step = train.make_train_step(model.config, train.optimizer(1e-2), lora=spec, compute_dtype="float32",
                                 log=tables.append)
    state = step.init(params)
    for _ in range(2):  # lora_b starts at 0, so lora_a first moves at step 2
        state, metrics = step(state, [batch])
    before, after = _flat(params), _flat(state.params)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    adapters = {k for k in before if k.endswith((".lora_a", ".lora_b"))}
    assert changed == adapters and len(adapters) == 2 * 9  # 7 decoder linears + 2 projector linears
    rows = {line.split()[0]: line.split()[1:3] for line in tables[0].splitlines()[1:]}
    lm = sum(v.size for k, v in before.items() if k.startswith("text.") and k in adapters)
    assert rows["LM"][0] == f"{lm:,}" and rows["vision"][0] == "0" and rows["newline"][0] == "0"
    assert int(rows["total"][0].replace(",", "")) == adapter_count(params)
    trained = jax.device_get(state.params)
    unmerged = LlavaOnevision(model.config, trained, lora=spec)(**inputs).logits
    merged = LlavaOnevision(model.config, merge_lora(trained))(**inputs).logits
    base = model(**inputs).logits
    valid = inputs["attention_mask"].astype(bool)
    assert np.abs(np.asarray(unmerged)[valid] - np.asarray(merged)[valid]).max() <= 1e-4
    assert np.abs(np.asarray(unmerged)[valid] - np.asarray(base)[valid]).max() > 1e-2  # training did something


def test_vision_tower_targets_and_errors(model):
    params, spec = lora.add_lora(model.params, model.config, rank=2, alpha=2, targets=["vision_tower"])
    assert set(params["vision"]["layers"]["fc1"]) >= {"lora_a", "lora_b", "lora_scale"}
    assert "lora_a" not in params["text"]["layers"]["q"] and "lora_a" not in params["projector"]["linear_1"]
    with pytest.raises(ValueError, match="match no weight"):
        lora.add_lora(model.params, model.config, rank=2, alpha=2, targets=r"text\.nothing")
    with pytest.raises(ValueError, match=r"LoRA targets '\.' match no weight \(a regex must match a whole weight path"):
        lora.add_lora(model.params, model.config, rank=2, alpha=2, targets=".")  # as the user typed it
    with pytest.raises(ValueError, match="empty"):
        lora.add_lora(model.params, model.config, rank=2, alpha=2, targets="")
    with pytest.raises(ValueError, match="lora_dropout needs LoRA"):
        train.make_train_step(model.config, train.optimizer(), lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        train.make_train_step(model.config, train.optimizer(), lora=spec, lora_dropout=1.0)


def test_lora_dropout_masks_adapter_inputs(model, data):
    """Rate 0 is the plain loss; rate 0.5 changes it, the same key gives the same value, another key another."""
    _, _, batch = data
    params, spec = lora.add_lora(model.params, model.config, rank=4, alpha=8)
    params = jax.tree_util.tree_map_with_path(  # adapters as after training: lora_b non-zero
        lambda p, x: x + 0.5 if freezing.path_name(p).endswith("lora_b") else x, params)
    stacked = train.stack_micro_batches([batch])
    mask = train.make_train_step(model.config, train.optimizer(), lora=spec, log=None).trainable_mask(params)
    sub = freezing.select(params, mask)

    @functools.partial(jax.jit, static_argnums=0)
    def loss(rate, key):
        return train.accumulated_grads(sub, params, stacked, config=model.config, compute_dtype=jnp.float32,
                                       dropout=rate, rng=key)[0]

    plain = float(jax.jit(lambda: train.accumulated_grads(sub, params, stacked, config=model.config,
                                                          compute_dtype=jnp.float32)[0])())
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert float(loss(0.0, k1)) == pytest.approx(plain, abs=1e-5)
    a, b, c = float(loss(0.5, k1)), float(loss(0.5, k1)), float(loss(0.5, k2))
    assert a == b and abs(a - plain) > 1e-3 and abs(a - c) > 1e-4


def test_embedding_adapters_take_no_dropout_as_peft(model, data):
    """PEFT's LoRA ``Embedding`` applies no dropout. The token embedding is a LoRA target once quantized (its
    table is then a weight dict): its adapter gets no dropout key, so with adapters there alone the loss under
    dropout is the plain loss, while the decoder's adapters do get keys."""
    from ov_jax.config import QuantConfig
    from ov_jax.nn.quant import quantize_params

    _, _, batch = data
    base, config = quantize_params(model.params, model.config, QuantConfig("int8", 128, False))
    params, _ = lora.add_lora(base, config, rank=4, alpha=8, targets=r"text\.(embed|layers\.q)")
    dropped = lora.with_dropout(params, 0.5, jax.random.PRNGKey(0))
    assert "lora_a" in dropped["text"]["embed"]
    assert not {"lora_dropout_key", "lora_dropout_rate"} & set(dropped["text"]["embed"])
    assert dropped["text"]["layers"]["q"]["lora_dropout_key"].shape == (config.text.num_hidden_layers, 2)

    params, spec = lora.add_lora(base, config, rank=4, alpha=8, targets=r"text\.embed")
    params = jax.tree_util.tree_map_with_path(  # adapters as after training: lora_b non-zero
        lambda p, x: x + 0.5 if freezing.path_name(p).endswith("lora_b") else x, params)
    stacked = train.stack_micro_batches([batch])
    sub = freezing.select(params, train.make_train_step(config, train.optimizer(), lora=spec,
                                                        log=None).trainable_mask(params))

    @functools.partial(jax.jit, static_argnums=0)
    def loss(rate, params, sub):
        return train.accumulated_grads(sub, params, stacked, config=config, compute_dtype=jnp.float32,
                                       dropout=rate, rng=jax.random.PRNGKey(3))[0]

    def untrained(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.zeros_like(x) if freezing.path_name(p).endswith("lora_b") else x, tree)

    plain = float(loss(0.0, params, sub))
    assert abs(plain - float(loss(0.0, untrained(params), untrained(sub)))) > 1e-3  # the adapter changes the loss
    assert float(loss(0.5, params, sub)) == plain


def test_lm_head_dropout_draws_a_mask_per_loss_chunk():
    """The loss runs the lm_head over chunks of positions; each chunk draws its own dropout mask (two chunks
    with the same hidden states and targets give different losses), the first chunk the same as alone."""
    from ov_jax.modeling import lm_head

    rng = np.random.default_rng(0)
    h, v, r = 16, 32, 4
    head = {"kernel": rng.standard_normal((h, v)), "lora_a": rng.standard_normal((h, r)),
            "lora_b": rng.standard_normal((r, v)), "lora_scale": np.float32(2.0)}
    params = lora.with_dropout({"lm_head": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), head)}, 0.5,
                               jax.random.PRNGKey(1))
    half = rng.standard_normal((1, 4, h)).astype(np.float32)
    hidden = jnp.asarray(np.concatenate([half, half], axis=1))
    labels = jnp.asarray([[0, 5, 6, 7, -100, 5, 6, 7]])  # targets per chunk of 4: [5, 6, 7, -], [5, 6, 7, -]
    total, count = lm_head.causal_lm_loss(params, hidden, labels, chunk_size=4)
    first, first_count = lm_head.causal_lm_loss(params, hidden[:, :4], labels[:, :4], chunk_size=4)
    assert int(count) == 2 * int(first_count) == 6
    second = float(total) - float(first)
    assert abs(second - float(first)) > 1e-2 * abs(float(first)), (float(first), second)
    kept = {"lm_head": params["lm_head"] | {"lora_dropout_rate": jnp.float32(0)}}  # rate 0: nothing dropped
    plain, _ = lm_head.causal_lm_loss(kept, hidden, labels, chunk_size=4)
    plain_first, _ = lm_head.causal_lm_loss(kept, hidden[:, :4], labels[:, :4], chunk_size=4)
    assert float(plain) == pytest.approx(2 * float(plain_first), rel=1e-6)  # the two chunks are alike
