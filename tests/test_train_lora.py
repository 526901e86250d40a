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
