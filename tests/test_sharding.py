"""Meshes, the logical-axis rules, sharded params and sharded forward passes on 8 simulated CPU devices."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ov_jax import sharding as sh
from ov_jax.config import OneVisionConfig, TextConfig, VisionConfig
from ov_jax.geometry import image_tile_count, image_token_count, video_token_count
from ov_jax.media_plan import build_media_plan
from ov_jax.modeling import llava
from ov_jax.params import abstract_params, is_spec, param_specs, random_params
from ov_jax.presets import preset

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = ["data=1,tensor=8", "data=2,tensor=4", "data=4,tensor=2", "data=8,tensor=1"]
TILE = 56  # 4x4 patches per tile: real anyres / video packing at a fraction of the cost

# 8 query heads and 2 KV heads: tensor=4 and tensor=8 exceed the KV heads (and the 4 vision heads at 8).
SHARD_CONFIG = OneVisionConfig(
    vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        image_size=TILE),
    text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    image_grid_pinpoints=tuple((TILE * a, TILE * b) for a in range(1, 4) for b in range(1, 4)),
    image_token_id=250, video_token_id=251, tie_word_embeddings=False,
).validate()


def test_eight_simulated_devices():
    assert jax.device_count() == 8


# --- meshes ---------------------------------------------------------------------------------------------------


def test_mesh_from_string_fills_missing_axes_and_remaining_devices():
    mesh = sh.make_mesh("data=2,tensor=4")
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(sh.make_mesh("tensor=2,data=-1").shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert dict(sh.make_mesh(None).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sh.make_mesh({"fsdp": 2, "tensor": 4}).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert sh.make_mesh(mesh) is mesh


@pytest.mark.parametrize("bad, message", [
    ("data=3,tensor=4", "needs 12 devices but 8"),
    ("data=2,model=4", "'model=4' is not 'axis=size'"),
    ("data=two", "is not an integer"),
    ("data=2,data=4", "given twice"),
    ("data=-1,tensor=-1", "at most one -1"),
    ("tensor=3,data=-1", "do not divide 8 devices"),
    ("no-such-preset", "neither 'axis=size,...'"),
])
def test_bad_mesh_specs_are_clear_errors(bad, message):
    with pytest.raises(sh.MeshError, match=message):
        sh.make_mesh(bad)


def test_mesh_presets_and_json_files_agree():
    """configs/meshes/*.json are MESH_PRESETS written out (regenerate: python -m ov_jax.sharding)."""
    directory = REPO / "configs" / "meshes"
    on_disk = {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}
    assert on_disk == sh.MESH_PRESETS
    assert dict(sh.make_mesh(str(directory / "7b-tp4.json")).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(sh.make_mesh("72b-tp8").shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert sh.mesh_shape("72b-tp16", 32) == (2, 1, 16)


# --- the resolver ----------------------------------------------------------------------------------------------


def test_resolver_drops_mesh_axes_that_do_not_divide_and_reports_them():
    mesh = sh.abstract_mesh("data=2,fsdp=2,tensor=4", 16)
    spec, fallbacks = sh.resolve_spec(("layers", "batch", "cache_length", "kv_heads", "head_dim"),
                                      (80, 4, 1024, 2, 128), mesh, where="cache")
    assert spec == P(None, ("data", "fsdp"))
    assert [(f.logical, f.size, f.mesh_axis, f.mesh_size) for f in fallbacks] == [("kv_heads", 2, "tensor", 4)]
    # batch 2: data divides, then data*fsdp=4 does not -> only data; batch 1 -> replicated over both
    assert sh.resolve_spec(("batch",), (2,), mesh)[0] == P("data")
    spec, fallbacks = sh.resolve_spec(("batch", "length"), (1, 7), mesh)
    assert spec == P() and {f.mesh_axis for f in fallbacks} == {"data", "fsdp"}
    # a mesh axis shards one dimension at most: the second embed stays whole
    assert sh.resolve_spec(("embed", "embed"), (64, 64), mesh)[0] == P("fsdp")
    with pytest.raises(KeyError, match="'sequence' has no sharding rule"):
        sh.resolve_spec(("sequence",), (8,), mesh)


def test_rules_cover_every_logical_axis_of_the_params():
    names = {a for s in jax.tree.leaves(param_specs(preset("72b")), is_leaf=is_spec) for a in s.axes}
    names |= {a for axes in sh.ACTIVATION_AXES.values() for a in axes}
    assert names - {None} <= set(sh.LOGICAL_RULES)


def test_cache_sharding_keeps_kv_heads_whole_when_tensor_exceeds_them():
    cfg = SHARD_CONFIG  # 2 KV heads
    assert sh.cache_sharding(cfg, sh.make_mesh("data=4,tensor=2"), 8, 64).spec == P(None, "data", None, "tensor")
    assert sh.cache_sharding(cfg, sh.make_mesh("data=2,tensor=4"), 8, 64).spec == P(None, "data")
    assert sh.cache_sharding(cfg, sh.make_mesh("data=2,tensor=4"), 1, 64).spec == P()
    assert sh.axis_multiple(sh.make_mesh("data=2,tensor=4"), "tiles") == 2
    per_layer = sh.kv_cache_shardings(cfg, sh.make_mesh("data=4,tensor=2"), 8, 64, layout="unrolled")
    assert len(per_layer.k) == cfg.text.num_hidden_layers and per_layer.v[0].spec == P("data", "tensor")
    with pytest.raises(ValueError, match="unknown cache layout"):
        sh.kv_cache_shardings(cfg, sh.make_mesh("data=8"), 8, 64, layout="paged")


# --- abstract 7B / 72B: every large tensor sharded -------------------------------------------------------------


@pytest.mark.parametrize("size, mesh_spec, devices, tensor", [
    ("7b", "7b-tp4", 8, 4), ("72b", "72b-tp8", 8, 8), ("72b", "72b-fsdp2-tp8", 16, 16), ("72b", "72b-tp16", 16, 16),
])
def test_abstract_params_hold_no_replicated_large_tensor(size, mesh_spec, devices, tensor):
    config = preset(size)
    mesh = sh.abstract_mesh(mesh_spec, devices)
    plan = sh.plan_param_shardings(config, mesh)
    params = abstract_params(config, jnp.bfloat16)
    flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_shardings = dict(jax.tree_util.tree_leaves_with_path(plan.shardings))
    replicated_by_rule = {f.where for f in plan.fallbacks}
    large = 16 << 20  # 16 MiB
    for path, x in flat_params.items():
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        full = math.prod(x.shape) * 2
        shard = math.prod(flat_shardings[path].shard_shape(x.shape)) * 2
        if full >= large and name not in replicated_by_rule:
            assert shard * tensor == full, f"{name}: {shard} bytes per device of {full}"
    total, per_device = sh.total_bytes(params), sh.per_device_bytes(params, plan.shardings)
    kv = sum(sh.total_bytes(params["text"]["layers"][n]) for n in ("k", "v"))
    if mesh_spec == "72b-tp16":  # the 8 KV heads cannot split 16 ways: k/v weights whole on every device
        assert {f.where for f in plan.fallbacks} == {f"text.layers.{n}.{w}" for n in "kv" for w in ("kernel", "bias")}
        expected = (total - kv) / tensor + kv
    else:
        assert plan.fallbacks == []
        expected = total / tensor
    assert abs(per_device - expected) / expected < 2e-3, (per_device, expected)


def test_seven_b_over_eight_way_tensor_is_reported_not_silent():
    """28 heads do not split 8 ways: q/o are replicated and the plan says so (why the 7B preset is tensor=4)."""
    plan = sh.plan_param_shardings(preset("7b"), sh.abstract_mesh("tensor=8", 8))
    assert {"text.layers.q.kernel", "text.layers.o.kernel", "text.layers.k.kernel"} <= {f.where for f in plan.fallbacks}
    assert "heads (28) replicated over tensor=8" in plan.summary()


# --- sharded forward equals unsharded --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forward_inputs():
    """8 left-padded rows: an anyres image, another image, a 3-frame video, plain text; 16-tile bucket."""
    cfg = SHARD_CONFIG
    rng = np.random.default_rng(0)
    sizes = [(100, 150), (60, 200)]
    side = cfg.vision.patches_per_side
    tokens = [image_token_count(h, w, cfg.image_grid_pinpoints, tile=TILE, side=side, max_n=cfg.anyres_max)
              for h, w in sizes]
    tiles = [image_tile_count(h, w, cfg.image_grid_pinpoints, tile=TILE) for h, w in sizes]
    media = {0: [cfg.image_token_id] * tokens[0], 3: [cfg.image_token_id] * tokens[1],
             5: [cfg.video_token_id] * video_token_count(3, side=side)}
    length, lengths = 140, [130, 40, 90, 100, 20, 60, 140, 77]
    ids, mask = np.zeros((8, length), np.int32), np.zeros((8, length), bool)
    for row, n in enumerate(lengths):
        toks = rng.integers(1, 240, n)
        toks[5:5 + len(media.get(row, []))] = media.get(row, [])
        ids[row, length - n:], mask[row, length - n:] = toks, True
    pixels = rng.standard_normal((2, max(tiles), 3, TILE, TILE)).astype(np.float32)
    video = rng.standard_normal((1, 3, 3, TILE, TILE)).astype(np.float32)
    plan = build_media_plan(ids, cfg, pixels, np.array(sizes), None, video, tower_bucket=16)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    args = (ids, mask, positions, plan.tower_inputs, plan.tap_index, plan.tap_weight, plan.is_media)
    params = random_params(cfg, seed=1)
    forward = functools.partial(llava.forward, config=cfg, dtype=jnp.float32)
    reference = np.asarray(jax.jit(forward)(params, *args))
    return params, args, reference


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_forward_matches_unsharded(forward_inputs, mesh_spec):
    params, args, reference = forward_inputs
    cfg, mesh = SHARD_CONFIG, sh.make_mesh(mesh_spec)
    plan = sh.plan_param_shardings(cfg, mesh)
    sharded = sh.shard_params(params, cfg, mesh)
    q = sharded["text"]["layers"]["q"]["kernel"]
    tensor, data = mesh.shape["tensor"], mesh.shape["data"]
    assert q.sharding.spec == (P() if tensor == 1 else P(None, None, "tensor"))
    assert q.addressable_shards[0].data.shape[2] == 8 // tensor
    kv_fallback = any(f.where == "text.layers.k.kernel" for f in plan.fallbacks)
    assert kv_fallback == (tensor > 2)

    kinds = ("tokens", "tokens", "tokens", "tower_inputs", "taps", "taps", "tokens")
    in_shardings = [sh.activation_sharding(mesh, k, a.shape) for k, a in zip(kinds, args)]
    assert in_shardings[3].spec == (P("data") if data > 1 else P())  # tiles data-parallel
    forward = functools.partial(llava.forward, config=cfg, dtype=jnp.float32)
    logits_sharding = sh.activation_sharding(mesh, "logits", reference.shape)
    run = jax.jit(forward, in_shardings=(plan.shardings, *in_shardings), out_shardings=logits_sharding)
    logits = run(sharded, *(sh.put_global(a, s) for a, s in zip(args, in_shardings)))
    assert logits.sharding.spec == logits_sharding.spec
    np.testing.assert_allclose(np.asarray(logits), reference, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1), reference.argmax(-1))
