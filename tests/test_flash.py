"""Flash causal attention (`ov_jax.nn.flash`): values and gradients against the dense reference, and memory.

Memory is read from the compiled programs (``memory_analysis().temp_size_in_bytes``), never run: exact and
quiet where process RSS is noisy. Measured (this config, T = 4,096, real 151,936-token vocabulary, loss+grad
temporaries): remat none 1.00 GB, dots_saveable 0.81 GB, full 0.72 GB; with the dense-mask blocked attention
this replaces: 3.61 / 2.27 / 1.27 GB.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ov_jax.config import OneVisionConfig, TextConfig, VisionConfig
from ov_jax.modeling import llava
from ov_jax.modeling.layers import attention
from ov_jax.nn import attention as attention_api
from ov_jax.nn.flash import flash_attention, token_segments
from ov_jax.params import random_params


def _dense_mask(valid, segments):
    t = valid.shape[1]
    causal = np.arange(t)[None, :] <= np.arange(t)[:, None]
    same = (segments[:, :, None] == segments[:, None, :]) & (segments != 0)[:, None, :]
    return causal[None] & same & valid[:, None, :]


@pytest.mark.parametrize("block", [8, 16, 64])
def test_values_and_gradients_equal_the_dense_reference(block):
    """GQA (8 query heads on 2 kv heads), a left-padded row, a packed row with a right-padded tail, ``T`` not a
    multiple of the block: outputs and all three gradients within 1e-5 of ``layers.attention`` with the dense
    mask on every real query; padding queries give exactly 0."""
    rng = np.random.default_rng(0)
    b, t, nh, nkv, hd = 2, 45, 8, 2, 16
    q = jnp.asarray(rng.standard_normal((b, t, nh, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, nkv, hd)), jnp.float32) for _ in range(2))
    valid = np.arange(t)[None] >= np.array([[0], [13]])
    seg = np.ones((b, t), np.int32)
    seg[0, 20:], seg[0, 40:] = 2, 0
    valid &= seg != 0
    segments = token_segments(jnp.asarray(valid), jnp.asarray(seg))
    mask = jnp.asarray(_dense_mask(valid, seg))
    weight = jnp.asarray(rng.standard_normal((b, t, nh, hd)) * valid[:, :, None, None], jnp.float32)

    def ours(q, k, v):
        return flash_attention(q, k, v, segments, block=block)

    def reference(q, k, v):
        return attention(q, k, v, mask)

    got, want = np.asarray(ours(q, k, v)), np.asarray(reference(q, k, v))
    assert np.abs(got - want)[valid].max() <= 1e-5
    assert np.all(got[~valid] == 0)
    grads = jax.grad(lambda *a: (ours(*a) * weight).sum(), argnums=(0, 1, 2))(q, k, v)
    wants = jax.grad(lambda *a: (reference(*a) * weight).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, wants):
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * max(1.0, float(np.abs(w).max()))


def test_without_segments_and_in_bfloat16():
    """``segments=None`` is plain causal attention; bfloat16 inputs give bfloat16 outputs near float32's."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 70, 2, 8)), jnp.float32) for _ in range(3))
    causal = jnp.asarray(np.tril(np.ones((70, 70), bool))[None])
    want = np.asarray(attention(q, k, v, causal))
    assert np.abs(np.asarray(flash_attention(q, k, v, block=32)) - want).max() <= 1e-5
    low = flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), block=32)
    assert low.dtype == jnp.bfloat16
    assert 0 < np.abs(np.asarray(low, np.float32) - want).max() < 5e-2


def test_bad_shapes_are_named():
    q = jnp.zeros((1, 8, 4, 8))
    with pytest.raises(ValueError, match="nkv"):
        flash_attention(q, jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 3, 8)))
    with pytest.raises(ValueError, match="block"):
        flash_attention(q, jnp.zeros((1, 8, 2, 8)), jnp.zeros((1, 8, 2, 8)), block=0)


@pytest.mark.parametrize("backend", ["xla", "cpu"])
def test_backends_run_the_causal_forward_as_flash_and_prefill_by_query_blocks(backend):
    """The ``xla`` / ``cpu`` backends' causal self-attention is flash (equal to it, and no ``[B, T, T]`` mask in
    the program); a prefill (``meta.prefill``) keeps the dense-mask query blocks, with the same values on every
    real query. ``T`` = 600 > flash's 512-slot block, so only a dense mask is ``T × T``."""
    rng = np.random.default_rng(1)
    b, t, nh, nkv, hd = 2, 600, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, nh, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, nkv, hd)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(t)[None] >= np.array([[0], [37]]))
    dense_mask = f"bool[{b},{t},{t}]"
    results = {}
    for prefill in (False, True):
        meta = attention_api.AttentionMeta(causal=True, key_valid=valid, prefill=prefill)
        program = str(jax.make_jaxpr(lambda q, k, v: attention_api.attention(q, k, v, meta, backend))(q, k, v))
        assert (dense_mask in program) == prefill, (prefill, dense_mask)
        results[prefill] = np.asarray(attention_api.attention(q, k, v, meta, backend))
    np.testing.assert_array_equal(results[False], np.asarray(flash_attention(q, k, v, token_segments(valid))))
    real = np.asarray(valid)
    assert np.abs(results[False] - results[True])[real].max() <= 1e-5


def test_memory_at_8192_tokens_is_blockwise():
    """B = 2, T = 8,192, 14 query heads on 2 kv heads (Qwen2-0.5B's attention): forward and gradient temporaries
    stay O(T · block), far below one float32 ``T × T`` score tensor (7.5 GB). Compiled only, never run."""
    b, t, nh, nkv, hd = 2, 8192, 14, 2, 64
    q = jax.ShapeDtypeStruct((b, t, nh, hd), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, nkv, hd), jnp.float32)
    valid = jax.ShapeDtypeStruct((b, t), bool)

    def forward(q, k, v, valid):
        return flash_attention(q, k, v, token_segments(valid))

    grad = jax.grad(lambda *a: forward(*a).sum(), argnums=(0, 1, 2))
    scores = b * nh * t * t * 4
    for fn in (forward, grad):
        temp = jax.jit(fn).lower(q, kv, kv, valid).compile().memory_analysis().temp_size_in_bytes
        assert temp < scores / 20, (fn, temp)  # measured: forward 0.20 GB, gradient 0.26 GB


def test_remat_memory_with_the_real_vocabulary():
    """The loss forward and loss+grad of a 4-layer model with the real 151,936-token vocabulary at T = 4,096,
    remat none / dots_saveable / full: the forward never holds ``[T, V]`` float32 logits, full remat needs less
    than none for the gradient, and every policy stays below what the dense-mask attention needed without remat
    (3.6 GB). Compiled only, never run."""
    vocab, t = 151936, 4096
    config = OneVisionConfig(
        vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                            image_size=56),
        text=TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
        image_grid_pinpoints=((56, 56),), image_token_id=250, video_token_id=251).validate()
    params = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, random_params(config, seed=0)))
    s = jax.ShapeDtypeStruct
    args = (s((1, t), jnp.int32), s((1, t), bool), s((1, t), jnp.int32), s((0, 3, 56, 56), jnp.float32),
            s((1, t, 4), jnp.int32), s((1, t, 4), jnp.float32), s((1, t), bool), s((1, t), jnp.int32))

    def loss(params, *inputs, remat):
        total, count = llava.loss(params, *inputs, config=config, dtype=jnp.float32, remat=remat)
        return total / count

    def temp(fn):
        return jax.jit(fn).lower(params, *args).compile().memory_analysis().temp_size_in_bytes

    forward = temp(lambda p, *a: loss(p, *a, remat="none"))
    assert forward < t * vocab * 4 / 4  # measured 0.31 GB; the logits alone would be 2.5 GB
    grad = {policy: temp(jax.grad(lambda p, *a, policy=policy: loss(p, *a, remat=policy)))
            for policy in ("none", "dots_saveable", "full")}
    assert grad["full"] < grad["dots_saveable"] < grad["none"] < 1.5e9, grad
