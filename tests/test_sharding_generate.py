"""Sharded greedy generation is token-identical to unsharded on meshes 1x8, 2x4, 4x2 and 8x1.

The tiny checkpoint has 8 query heads and 2 KV heads, so tensor=4 and tensor=8 exceed the KV heads (the
KV cache and k/v weights are replicated over tensor) and 4 vision heads do not split 8 ways. The batch
mixes a video, left-padded text rows and (on data=8) a batch that shards one row per device.
"""

import inspect

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ov_jax import sharding as sh
from ov_jax.geometry import video_token_count
from ov_jax.model import LlavaOnevision
from ov_jax.tiny import make_tiny

engine = pytest.importorskip("ov_jax.engine")
Buckets, Engine, engine_for = engine.Buckets, engine.Engine, engine.engine_for
pytestmark = pytest.mark.skipif("mesh" not in inspect.signature(Engine).parameters,
                                reason="the engine does not take a mesh yet")

MESHES = ["data=1,tensor=8", "data=2,tensor=4", "data=4,tensor=2", "data=8,tensor=1"]
BUCKETS = Buckets(batch=(8,), prompt=(512,), cache=(544,), tower_chunk=2, prefill_chunk=128)  # chunked prefill
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("gen_shard"), text_overrides={"num_attention_heads": 8},
                     vision_overrides={"num_attention_heads": 4})
    return LlavaOnevision.from_pretrained(path)


@pytest.fixture(scope="module")
def request_batch(tiny_model):
    cfg = tiny_model.config
    rng = np.random.default_rng(0)
    frames = 2
    video_tokens = video_token_count(frames, side=cfg.vision.patches_per_side)
    lengths = [video_tokens + 20, 30, 7, 120, 64, 1, 200, 45]
    length = max(lengths)
    ids, mask = np.zeros((8, length), np.int64), np.zeros((8, length), np.int64)
    for row, n in enumerate(lengths):
        toks = rng.integers(1, 200, n)
        if row == 0:
            toks[10:10 + video_tokens] = cfg.video_token_id
        ids[row, length - n:], mask[row, length - n:] = toks, 1
    video = rng.standard_normal((1, frames, 3, 384, 384)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=video)


@pytest.fixture(scope="module")
def reference_tokens(tiny_model, request_batch):
    engine = Engine(tiny_model.config, tiny_model.params, tiny_model.dtype, BUCKETS)
    tokens = engine.generate(**request_batch, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert len(np.unique(tokens)) > 8, "degenerate reference: the comparison would prove nothing"
    return tokens


# every mesh once in the default run, alternating the engine's two cache layouts; the other pairs are slow
CASES = [pytest.param(m, layout, marks=() if (i + j) % 2 == 0 else pytest.mark.slow)
         for i, m in enumerate(MESHES) for j, layout in enumerate(("unrolled", "scanned"))]


@pytest.mark.parametrize("mesh_spec, layout", CASES)
def test_sharded_greedy_generation_is_token_identical(tiny_model, request_batch, reference_tokens, mesh_spec, layout):
    mesh = sh.make_mesh(mesh_spec)
    model = LlavaOnevision(tiny_model.config, sh.shard_params(tiny_model.params, tiny_model.config, mesh))
    engine = engine_for(model, BUCKETS, layout=layout)
    assert engine.mesh is mesh
    tokens = model.generate(**request_batch, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    np.testing.assert_array_equal(tokens, reference_tokens)

    data, tensor = mesh.shape["data"], mesh.shape["tensor"]
    decode = next(exe for key, exe in engine._executables.items()
                  if key[0] == "decode").compiled  # the cache is argument 2
    cache = decode.input_shardings[0][2]
    kv = "tensor" if tensor == 2 else None  # 2 KV heads: sharded over tensor=2, replicated over 4 and 8
    batch = "data" if data > 1 else None
    want = P(None, batch, None, kv) if layout == "scanned" else P(batch, kv)
    got = jax.tree.leaves(cache)[0].spec
    assert tuple(got) + (None,) * (5 - len(got)) == tuple(want) + (None,) * (5 - len(want)), got
    assert engine.tower_chunk % data == 0  # the vision tower splits its chunk over the data axis
