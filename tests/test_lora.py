"""LoRA weight leaves: declared in the spec table, applied by the one linear helper, merged exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ov_jax import sharding as sh
from ov_jax.config import OneVisionConfig, TextConfig, VisionConfig
from ov_jax.engine import steps
from ov_jax.geometry import image_token_count
from ov_jax.inputs import model_inputs
from ov_jax.media_plan import build_media_plan
from ov_jax.model import HIDDEN_INPUTS, LlavaOnevision
from ov_jax.modeling import llava
from ov_jax.nn.lora import LM_LINEARS, adapter_count, add_lora, is_adapter, merge_lora
from ov_jax.params import LoraSpec, check_tree, logical_axes, param_specs, random_params

TILE = 56
CONFIG = OneVisionConfig(
    vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        image_size=TILE),
    text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    image_grid_pinpoints=tuple((TILE * a, TILE * b) for a in range(1, 4) for b in range(1, 4)),
    image_token_id=250, video_token_id=251, tie_word_embeddings=False,
).validate()
# every weight kind: decoder linears, the untied lm_head, the projector, the tower's attention, MLP and patch embedding
EVERYWHERE = LM_LINEARS + r"|text\.lm_head|projector\.linear_[12]|vision\.layers\.(q|o|fc1)|vision\.patch_embed"


def _trained(params):
    """Adapters as after some training: lora_b no longer zero."""
    rng = np.random.default_rng(5)

    def move(path, x):
        name = jax.tree_util.keystr(path)
        return x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) if "lora_b" in name else x

    return jax.tree_util.tree_map_with_path(move, params)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    sizes = np.array([[TILE, TILE]])
    tokens = image_token_count(TILE, TILE, CONFIG.image_grid_pinpoints, tile=TILE, side=4, max_n=CONFIG.anyres_max)
    n = tokens + 8
    ids = rng.integers(1, 240, (2, n))
    ids[0, 3:3 + tokens] = CONFIG.image_token_id
    mask = np.ones((2, n), bool)
    mask[1, :5] = False
    pixels = rng.standard_normal((1, 2, 3, TILE, TILE)).astype(np.float32)
    plan = build_media_plan(ids[:1], CONFIG, pixels, sizes, None, None)
    assert plan.num_tower_inputs == 2
    return dict(input_ids=ids[:1], pixel_values=pixels, image_sizes=sizes), (ids[1:], mask[1:])


def test_specs_declare_adapters_on_the_kernel_axes():
    spec = LoraSpec(4, 8.0, EVERYWHERE)
    specs = param_specs(CONFIG, spec)
    q, o = specs["text"]["layers"]["q"], specs["text"]["layers"]["o"]
    assert q["lora_a"].shape == (2, 64, 4) and q["lora_a"].axes == ("layers", "embed", None)
    assert q["lora_b"].shape == (2, 4, 8, 8) and q["lora_b"].axes == ("layers", None, "heads", "head_dim")
    assert o["lora_a"].shape == (2, 8, 8, 4) and o["lora_a"].axes == ("layers", "heads", "head_dim", None)
    assert o["lora_b"].axes == ("layers", None, "embed") and o["lora_scale"].shape == (2,)
    patch = specs["vision"]["patch_embed"]
    assert patch["lora_a"].shape == (14, 14, 3, 4) and patch["lora_scale"].shape == ()
    assert "lora_a" not in specs["text"]["layers"]["input_norm"] and "lora_a" not in param_specs(CONFIG)["text"]["layers"]["q"]
    assert logical_axes(CONFIG, spec)["projector"]["linear_2"]["lora_b"] == (None, "embed")
    with pytest.raises(ValueError, match="match no weight"):
        param_specs(CONFIG, LoraSpec(4, 8.0, r"text\.layers\.qq"))
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(0, 8.0, LM_LINEARS)
    with pytest.raises(ValueError, match="regular expression"):
        LoraSpec(4, 8.0, "text.(")


def test_add_lora_starts_as_the_base_model_and_merges_exactly(inputs):
    media, (ids, mask) = inputs
    base = jax.tree.map(jnp.asarray, random_params(CONFIG, seed=1))
    with_lora, spec = add_lora(base, CONFIG, rank=4, alpha=8.0, targets=EVERYWHERE, seed=2)
    check_tree(with_lora, CONFIG, spec)
    with pytest.raises(ValueError, match="unexpected"):
        check_tree(with_lora, CONFIG)
    assert float(with_lora["text"]["layers"]["q"]["lora_scale"][0]) == 2.0
    assert adapter_count(with_lora) == sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(
        with_lora) if jax.tree_util.keystr(p).endswith(("['lora_a']", "['lora_b']")))
    plain, adapted = LlavaOnevision(CONFIG, base), LlavaOnevision(CONFIG, with_lora, lora=spec)
    np.testing.assert_array_equal(np.asarray(adapted(**media).logits), np.asarray(plain(**media).logits))

    trained = LlavaOnevision(CONFIG, _trained(with_lora), lora=spec)
    merged = LlavaOnevision(CONFIG, merge_lora(trained.params))
    jax.tree.map(lambda a, b: None, merged.params, base)  # same tree as the base: adapters gone
    for args in (media, dict(input_ids=ids, attention_mask=mask)):
        got, want, before = (np.asarray(m(**args).logits) for m in (trained, merged, plain))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert np.abs(got - before).max() > 1e-2  # the adapters do change the output


def test_gradients_reach_adapters_not_the_scale(inputs):
    media, _ = inputs
    params, spec = add_lora(jax.tree.map(jnp.asarray, random_params(CONFIG, seed=1)), CONFIG, 4, 8.0, EVERYWHERE)
    params = _trained(params)
    checked = model_inputs(CONFIG, media["input_ids"], pixel_values=media["pixel_values"],
                           image_sizes=media["image_sizes"])
    args = [checked[k] for k in HIDDEN_INPUTS]
    labels = jnp.asarray(media["input_ids"])

    def loss(params):
        total, count = llava.loss(params, *args, labels, config=CONFIG, dtype=jnp.float32)
        return total / count

    grads = jax.grad(loss)(params)
    q = grads["text"]["layers"]["q"]
    assert float(jnp.abs(q["lora_a"]).max()) > 0 and float(jnp.abs(q["lora_b"]).max()) > 0
    assert float(jnp.abs(q["lora_scale"]).max()) == 0
    assert float(jnp.abs(grads["vision"]["patch_embed"]["lora_b"]).max()) > 0
    assert is_adapter("text.layers.q.lora_a") and not is_adapter("text.layers.q.lora_scale")
    assert not is_adapter("text.layers.q.kernel")


def test_engine_serving_copies_fold_the_adapters():
    params, _ = add_lora(jax.tree.map(jnp.asarray, random_params(CONFIG, seed=1)), CONFIG, 4, 8.0,
                         LM_LINEARS + r"|text\.lm_head")
    params = _trained(params)
    merged = merge_lora(params)
    for got, want in zip(steps.serving_layers(params["text"]["layers"]), steps.serving_layers(merged["text"]["layers"])):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), got, want)
    np.testing.assert_allclose(np.asarray(steps.serving_lm_head(params["text"])),
                               np.asarray(steps.serving_lm_head(merged["text"])), atol=1e-6)
    assert np.abs(np.asarray(steps.serving_lm_head(params["text"]))
                  - np.asarray(merged["text"]["lm_head"]["kernel"]).T).max() < 1e-6


def test_sharded_adapters_follow_their_kernel_axes(inputs):
    """The rules table shards adapters like their kernels' input / output axes; the forward is unchanged."""
    _, (ids, mask) = inputs
    params, spec = add_lora(jax.tree.map(jnp.asarray, random_params(CONFIG, seed=1)), CONFIG, 4, 8.0, LM_LINEARS)
    params = _trained(params)
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = sh.shard_params(params, CONFIG, mesh, lora=spec)
    q = sharded["text"]["layers"]["q"]
    assert q["lora_a"].sharding.spec == P(None, "fsdp") and q["lora_b"].sharding.spec == P(None, None, "tensor")
    t = ids.shape[1]
    empty = (np.zeros((0, 3, TILE, TILE), np.float32), np.zeros((1, t, 4), np.int32),
             np.zeros((1, t, 4), np.float32), np.zeros((1, t), bool))
    forward = jax.jit(functools.partial(llava.forward, config=CONFIG, dtype=jnp.float32))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    want = forward(params, ids, mask, positions, *empty)
    with jax.set_mesh(mesh):  # activation constraints from the rules table apply under an active mesh
        got = forward(sharded, ids, mask, positions, *empty)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
