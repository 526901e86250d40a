"""Fused attention kernels under a multi-device mesh (8 simulated CPU devices, float32).

XLA cannot partition a Pallas kernel, so the splash and cuDNN backends run per shard by ``jax.shard_map``
(`ov_jax.nn.attention.per_shard_self_attention`) when a mesh is active. On the tiny model (text: 4 query / 2 KV
heads; vision: 2 heads) ``tensor=2`` shards every head axis, and ``tensor=4`` takes both fallbacks of the rules
table: text KV heads replicated with each shard reading its one KV head, vision heads computed whole. The
engine compiles under its params' mesh, so its prefill takes the same path.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ov_jax.geometry import video_token_count
from ov_jax.model import HIDDEN_INPUTS, LlavaOnevision
from ov_jax.nn.attention import AttentionMeta, attention
from ov_jax.nn.backends import cudnn
from ov_jax.sharding import make_mesh, mesh_of

MESHES = ["data=2,tensor=4", "data=4,tensor=2"]


@pytest.fixture(scope="module")
def batch(tiny_ckpt):
    """Four rows, two of them left-padded, a one-frame video in each (the tower runs through the backend too),
    and the unsharded splash logits."""
    model = LlavaOnevision.from_pretrained(tiny_ckpt, attention="splash")
    n = video_token_count(1)
    vid = model.config.video_token_id
    ids = np.array([[11, 12] + [vid] * n + [13, 14, 15], [0, 0, 0, 12] + [vid] * n + [13],
                    [21, 22] + [vid] * n + [23, 24, 25], [0, 31] + [vid] * n + [32, 33, 34]], np.int64)
    mask = (ids != 0).astype(np.int64)
    video = np.random.default_rng(0).standard_normal((4, 1, 3, 384, 384)).astype(np.float32)
    inputs = dict(attention_mask=mask, pixel_values_videos=video, position_ids=np.maximum(np.cumsum(mask, 1) - 1, 0))
    return ids, inputs, np.asarray(model(ids, **inputs).logits)


def _manual_computations(model, ids, inputs) -> int:
    """How many ``shard_map`` regions the model's forward lowers to under its params' mesh."""
    checked = model._inputs(ids, inputs["attention_mask"], None, None, None, inputs["pixel_values_videos"],
                            inputs["position_ids"])
    args = [checked[k] for k in HIDDEN_INPUTS]
    with jax.set_mesh(mesh_of(model.params)):
        return model._jit_hidden.lower(model.params, *args).as_text().count("sdy.manual_computation")


@pytest.mark.parametrize("mesh", MESHES)
def test_splash_on_a_mesh_equals_the_unsharded_forward(tiny_ckpt, batch, mesh):
    ids, inputs, expected = batch
    model = LlavaOnevision.from_pretrained(tiny_ckpt, attention="splash", mesh=mesh)
    ours = np.asarray(model(ids, **inputs).logits)
    valid = inputs["attention_mask"].astype(bool)
    # float32: the row-parallel output projection sums its shards in another order (logits up to ~15).
    assert np.abs(ours[valid] - expected[valid]).max() <= 5e-5
    assert _manual_computations(model, ids, inputs) == 2  # one in the tower's layer scan, one in the decoder's
    model.attention = "xla"  # partitioned by XLA itself: no shard_map
    assert _manual_computations(model, ids, inputs) == 0


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_call_per_shard_equals_the_reference(mesh, causal):
    """The cuDNN backend's call (run by jax's xla implementation of ``dot_product_attention``) per shard on
    grouped-query heads (8 query / 2 KV heads: KV heads sharded on tensor=2, read per shard on tensor=4)."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((4, 24, 8, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, 24, 2, 16)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(np.arange(24)[None] >= np.array([[0], [7], [0], [3]]))
    meta = AttentionMeta(causal=causal, key_valid=valid)
    expected = np.asarray(attention(q, k, v, meta, "xla"))
    with jax.set_mesh(make_mesh(mesh)):
        run = jax.jit(lambda q, k, v, valid: cudnn.self_attention(
            q, k, v, AttentionMeta(causal=causal, key_valid=valid), implementation="xla"))
        ours = np.asarray(run(q, k, v, valid))
        assert run.lower(q, k, v, valid).as_text().count("sdy.manual_computation") == 1
    rows = np.asarray(valid)
    assert np.abs(ours[rows] - expected[rows]).max() <= 1e-6


def test_engine_prefill_runs_splash_per_shard(tiny_ckpt, monkeypatch):
    """The engine compiles under its params' mesh: its prefill runs splash by ``shard_map`` (a spy on
    ``jax.shard_map``) and generates the unsharded engine's tokens on a left-padded batch."""
    from ov_jax.engine import Buckets, engine_for

    ids = np.random.default_rng(1).integers(3, 200, (4, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = mask[3, :2] = 0
    buckets = Buckets(batch=(4,), prompt=(128,), cache=(136,))

    def generate(model):
        return engine_for(model, buckets).generate(ids, mask, max_new_tokens=4, stop_token_ids=[])

    want = generate(LlavaOnevision.from_pretrained(tiny_ckpt, attention="splash"))
    calls = []
    shard_map = jax.shard_map
    monkeypatch.setattr(jax, "shard_map", lambda *a, **kw: calls.append(kw["in_specs"]) or shard_map(*a, **kw))
    got = generate(LlavaOnevision.from_pretrained(tiny_ckpt, attention="splash", mesh="data=4,tensor=2"))
    np.testing.assert_array_equal(got, want)
    # Prefill runs one request (batch 1, rows whole) per call; heads over tensor.
    assert calls and calls[0][0] == jax.sharding.PartitionSpec(None, None, "tensor", None)
