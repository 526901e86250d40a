"""The training-grade forward: hidden states, chunked loss, logits_to_keep, packed segments, remat, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ov_jax.config import OneVisionConfig, TextConfig, VisionConfig
from ov_jax.model import LlavaOnevision
from ov_jax.modeling import lm_head, llava
from ov_jax.params import random_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    return ref, LlavaOnevision.from_pretrained(tiny_ckpt)


def _text_batch(ours, rng, b=2, t=40):
    ids = rng.integers(20, 200, (b, t))
    mask = np.ones((b, t), bool)
    mask[1, :7] = False  # left padding
    labels = np.where(rng.random((b, t)) < 0.3, -100, ids)
    labels[~mask] = -100
    labels[1, 7] = -100  # predicted from a padding position, whose logits are arbitrary in both implementations
    return ids, mask, labels


def _plain_loss(logits, labels):
    targets = lm_head.shift_labels(jnp.asarray(labels))
    valid = targets != -100
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.where(valid, picked, 0.0).sum(), valid.sum()


def test_loss_and_logits_to_keep_match_transformers(pair):
    ref, ours = pair
    ids, mask, labels = _text_batch(ours, np.random.default_rng(0))
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        hf = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 position_ids=torch.from_numpy(positions), labels=torch.from_numpy(labels))
        hf_last = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                      position_ids=torch.from_numpy(positions), logits_to_keep=3).logits.numpy()
        index = np.array([0, 5, 39])
        hf_index = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(positions), logits_to_keep=torch.from_numpy(index)).logits.numpy()
    out = ours(ids, mask, position_ids=positions, labels=labels)
    assert abs(float(out.loss) - hf.loss.item()) <= 1e-5
    assert np.abs(np.asarray(out.logits) - hf.logits.numpy())[mask].max() <= 1e-4
    last = ours(ids, mask, position_ids=positions, logits_to_keep=3).logits
    assert last.shape == (2, 3, ours.config.text.vocab_size)
    assert np.abs(np.asarray(last) - hf_last).max() <= 1e-4
    picked = ours(ids, mask, position_ids=positions, logits_to_keep=index).logits
    assert np.abs(np.asarray(picked) - hf_index)[mask[:, index]].max() <= 1e-4
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(ids, logits_to_keep=np.array([40]))
    with pytest.raises(ValueError, match="labels shape"):
        ours(ids, labels=labels[:, :-1])


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_chunked_loss_and_gradient_equal_the_plain_ones(pair, chunk_size):
    """Several chunks (the last one padded) or one: same sum, count and gradients as a full-logits loss."""
    _, ours = pair
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 40, ours.config.text.hidden_size)), jnp.float32)
    _, _, labels = _text_batch(ours, rng)
    text = ours.params["text"]

    def chunked(text, hidden):
        return lm_head.causal_lm_loss(text, hidden, jnp.asarray(labels), chunk_size=chunk_size)[0]

    def plain(text, hidden):
        return _plain_loss(lm_head.lm_logits(text, hidden), labels)[0]

    total, count = lm_head.causal_lm_loss(text, hidden, jnp.asarray(labels), chunk_size=chunk_size)
    want_total, want_count = _plain_loss(lm_head.lm_logits(text, hidden), labels)
    assert int(count) == int(want_count) and abs(float(total) - float(want_total)) <= 1e-4 * abs(float(want_total))
    got = jax.grad(chunked, argnums=(0, 1))(text, hidden)
    want = jax.grad(plain, argnums=(0, 1))(text, hidden)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * max(1.0, float(np.abs(w).max()))


def test_chunked_loss_never_holds_full_logits():
    """With the real 151,936-token vocabulary, the compiled loss gradient's temporaries stay far below one
    float32 ``[B, T, V]`` logits tensor (which the plain loss does hold). Compiled only, never run."""
    b, t, h, v = 1, 4096, 64, 151936
    text = {"embed": jax.ShapeDtypeStruct((v, h), jnp.float32),
            "lm_head": {"kernel": jax.ShapeDtypeStruct((h, v), jnp.float32)}}
    hidden = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
    labels = jax.ShapeDtypeStruct((b, t), jnp.int32)
    full_logits = b * t * v * 4

    def loss(text, hidden, labels):
        return lm_head.causal_lm_loss(text, hidden, labels, chunk_size=256)[0]

    def plain(text, hidden, labels):
        return _plain_loss(lm_head.lm_logits(text, hidden), labels)[0]

    chunked = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(text, hidden, labels).compile().memory_analysis()
    naive = jax.jit(jax.grad(plain, argnums=(0, 1))).lower(text, hidden, labels).compile().memory_analysis()
    assert naive.temp_size_in_bytes >= full_logits  # the check can fail: the plain loss does hold them
    assert chunked.temp_size_in_bytes < 3 * b * 256 * v * 4  # a chunk's logits and their gradient, and change


def test_packed_segments_equal_separate_rows(pair):
    """Two sequences packed in one row (segment ids, positions restarting) give each one's own hidden states."""
    _, ours = pair
    rng = np.random.default_rng(2)
    a, b = rng.integers(20, 200, 9), rng.integers(20, 200, 6)
    config = ours.config
    empty = dict(tower_inputs=np.zeros((0, 3, 384, 384), np.float32), tap_index=np.zeros((1, 16, 4), np.int32),
                 tap_weight=np.zeros((1, 16, 4), np.float32), is_media=np.zeros((1, 16), bool))
    ids = np.concatenate([a, b, [0]])[None]
    segments = np.array([[1] * 9 + [2] * 6 + [0]])
    positions = np.concatenate([np.arange(9), np.arange(6), [0]])[None]
    fn = functools.partial(llava.hidden_states, config=config, dtype=jnp.float32)
    packed = fn(ours.params, ids, segments != 0, positions, **empty, segment_ids=segments)
    for seq, lo in ((a, 0), (b, 9)):
        n = len(seq)
        media = dict(tower_inputs=empty["tower_inputs"], tap_index=np.zeros((1, n, 4), np.int32),
                     tap_weight=np.zeros((1, n, 4), np.float32), is_media=np.zeros((1, n), bool))
        alone = fn(ours.params, seq[None], np.ones((1, n), bool), np.arange(n)[None], **media)
        assert np.abs(np.asarray(packed[0, lo:lo + n]) - np.asarray(alone[0])).max() <= 1e-5
    unpacked = fn(ours.params, ids, segments != 0, positions, **empty)  # without segments b sees a: differs
    assert np.abs(np.asarray(unpacked[0, 9:15]) - np.asarray(packed[0, 9:15])).max() > 1e-3


def test_remat_policies_keep_values_and_gradients():
    """Both layer scans under each remat policy: the same loss and gradients as without remat."""
    tile = 56
    config = OneVisionConfig(
        vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            image_size=tile),
        text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
        image_grid_pinpoints=((tile, tile),), image_token_id=250, video_token_id=251).validate()
    params = jax.tree.map(jnp.asarray, random_params(config, seed=3))
    rng = np.random.default_rng(3)
    tiles = jnp.asarray(rng.standard_normal((1, 3, tile, tile)), jnp.float32)
    t = 12
    ids = rng.integers(20, 200, (1, t))
    tap_index = np.zeros((1, t, 4), np.int32)
    tap_index[0, 2:6, 0] = np.arange(1, 5)
    tap_weight = np.zeros((1, t, 4), np.float32)
    tap_weight[0, 2:6, 0] = 1.0
    is_media = np.zeros((1, t), bool)
    is_media[0, 2:6] = True
    labels = jnp.asarray(ids)

    def loss(params, remat):
        total, count = llava.loss(params, ids, np.ones((1, t), bool), np.arange(t)[None], tiles, tap_index,
                                  tap_weight, is_media, labels, config=config, dtype=jnp.float32, remat=remat)
        return total / count

    run = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    want_value, want = run(params, "none")
    assert float(jnp.abs(want["vision"]["layers"]["q"]["kernel"]).max()) > 0  # the tower is in the gradient
    for policy in ("full", "dots_saveable"):
        value, got = run(params, policy)
        assert abs(float(value) - float(want_value)) <= 1e-5
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * max(1.0, float(np.abs(w).max()))
    with pytest.raises(ValueError, match="remat policy"):
        loss(params, "sometimes")


def test_bfloat16_compute_on_float32_params(pair):
    """float32 master params with a bfloat16 forward: bf16 activations, float32 logits near the f32 ones."""
    _, ours = pair
    ids, mask, _ = _text_batch(ours, np.random.default_rng(4))
    bf16 = LlavaOnevision(ours.config, ours.params, "bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
    logits16, logits32 = bf16(ids, mask).logits, ours(ids, mask).logits
    assert logits16.dtype == jnp.float32
    diff = float(jnp.abs(logits16 - logits32)[mask].max())
    assert 0 < diff < 0.5 * float(jnp.abs(logits32).max())
    hidden = llava.hidden_states(ours.params, ids, mask, np.broadcast_to(np.arange(40), (2, 40)),
                                 np.zeros((0, 3, 384, 384), np.float32), np.zeros((2, 40, 4), np.int32),
                                 np.zeros((2, 40, 4), np.float32), np.zeros((2, 40), bool),
                                 config=ours.config, dtype=jnp.bfloat16)
    assert hidden.dtype == jnp.bfloat16


def test_fused_loss_computes_the_logits_once_per_chunk():
    """``value_and_grad`` of the loss (what a train step calls) over two chunks, counted in the lowered program's
    ``[·, V]`` products: a frozen head takes the logits and the hidden states' gradient (2), a training head one
    more (its own gradient). Rematerialising each chunk in the backward pass would add the logits again (3, 4)."""
    h, v, t = 64, 5000, 512
    text = {"embed": jax.ShapeDtypeStruct((v, h), jnp.float32)}
    hidden = jax.ShapeDtypeStruct((1, t, h), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(text, hidden, labels):
        return lm_head.causal_lm_loss(text, hidden, labels, chunk_size=t // 2)[0]

    def head_products(fn, *args):
        lowered = jax.jit(fn).lower(*args).as_text()
        return sum("dot_general" in line and str(v) in line for line in lowered.splitlines())

    frozen = jax.value_and_grad(lambda hd, tx, lb: loss(jax.lax.stop_gradient(tx), hd, lb))
    assert head_products(loss, text, hidden, labels) == 1
    assert head_products(frozen, hidden, text, labels) == 2
    assert head_products(jax.value_and_grad(loss, argnums=(0, 1)), text, hidden, labels) == 3
