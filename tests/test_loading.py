"""Loading safetensors checkpoints of every layout into the params tree, checked against torch's weights."""

import json
import math
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from loading_helpers import (HUB, IN_MEMORY, TEXT, VISION, assert_trees_equal, build_hf_checkpoint, mesh_shardings,
                             read_file, rekey, split_into_shards, to_lmms_lab)
from ov_jax import loading
from ov_jax.loading import CheckpointError, load_params

LAYOUTS = ("save_pretrained", "hub", "in_memory", "lmms_lab", "sharded")


def expected_params(sd: dict, tied: bool) -> dict:
    """The params tree written out by hand from transformers' in-memory state dict (REFERENCE_NOTES §11.2)."""
    nh, nkv, hd = TEXT["num_attention_heads"], TEXT["num_key_value_heads"], TEXT["head_dim"]
    vnh = VISION["num_attention_heads"]

    def stack(fmt, n, fn=lambda w: w):
        return np.stack([fn(sd[fmt.format(i)]) for i in range(n)])

    def heads_in(n):  # Linear [n*hd, in] → x @ W.T split into heads: [in, n, hd]
        return lambda w: w.T.reshape(w.shape[1], n, -1)

    def heads_out(n):  # Linear [out, n*hd] → [n, hd, out]
        return lambda w: w.T.reshape(n, -1, w.shape[0])

    lt, lv = TEXT["num_hidden_layers"], VISION["num_hidden_layers"]
    t, v = "model.language_model.layers.{}.", "model.vision_tower.encoder.layers.{}."
    text = {
        "embed": sd["model.language_model.embed_tokens.weight"],
        "norm": {"scale": sd["model.language_model.norm.weight"]},
        "layers": {
            "input_norm": {"scale": stack(t + "input_layernorm.weight", lt)},
            "post_norm": {"scale": stack(t + "post_attention_layernorm.weight", lt)},
            "q": {"kernel": stack(t + "self_attn.q_proj.weight", lt, heads_in(nh)),
                  "bias": stack(t + "self_attn.q_proj.bias", lt, lambda b: b.reshape(nh, hd))},
            "k": {"kernel": stack(t + "self_attn.k_proj.weight", lt, heads_in(nkv)),
                  "bias": stack(t + "self_attn.k_proj.bias", lt, lambda b: b.reshape(nkv, hd))},
            "v": {"kernel": stack(t + "self_attn.v_proj.weight", lt, heads_in(nkv)),
                  "bias": stack(t + "self_attn.v_proj.bias", lt, lambda b: b.reshape(nkv, hd))},
            "o": {"kernel": stack(t + "self_attn.o_proj.weight", lt, heads_out(nh))},
            "gate": {"kernel": stack(t + "mlp.gate_proj.weight", lt, np.transpose)},
            "up": {"kernel": stack(t + "mlp.up_proj.weight", lt, np.transpose)},
            "down": {"kernel": stack(t + "mlp.down_proj.weight", lt, np.transpose)},
        },
    }
    if not tied:
        text["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    vision_layers = {f"ln{n}": {"scale": stack(v + f"layer_norm{n}.weight", lv), "bias": stack(v + f"layer_norm{n}.bias", lv)}
                     for n in (1, 2)}
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        vision_layers[ours] = {"kernel": stack(v + f"self_attn.{theirs}.weight", lv, heads_in(vnh)),
                               "bias": stack(v + f"self_attn.{theirs}.bias", lv, lambda b: b.reshape(vnh, -1))}
    vision_layers["o"] = {"kernel": stack(v + "self_attn.out_proj.weight", lv, heads_out(vnh)),
                          "bias": stack(v + "self_attn.out_proj.bias", lv)}
    for fc in ("fc1", "fc2"):
        vision_layers[fc] = {"kernel": stack(v + f"mlp.{fc}.weight", lv, np.transpose),
                             "bias": stack(v + f"mlp.{fc}.bias", lv)}
    vt, mp = "model.vision_tower.", "model.multi_modal_projector."
    return {
        "image_newline": sd["model.image_newline"],
        "projector": {f"linear_{n}": {"kernel": sd[f"{mp}linear_{n}.weight"].T, "bias": sd[f"{mp}linear_{n}.bias"]}
                      for n in (1, 2)},
        "vision": {
            "patch_embed": {"kernel": sd[vt + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
                            "bias": sd[vt + "embeddings.patch_embedding.bias"]},
            "pos_embed": sd[vt + "embeddings.position_embedding.weight"],
            "layers": vision_layers,
            "post_ln": {"scale": sd[vt + "post_layernorm.weight"], "bias": sd[vt + "post_layernorm.bias"]},
        },
        "text": text,
    }


@pytest.fixture(scope="module", params=["untied", "tied"])
def hf_checkpoint(request, tmp_path_factory):
    """(directory of every layout, torch in-memory state dict, tied) for a tiny transformers model."""
    tied = request.param == "tied"
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    sd = build_hf_checkpoint(root / "save_pretrained", tied=tied)
    base = root / "save_pretrained"
    rekey(base, root / "hub", HUB)
    in_memory = rekey(base, root / "in_memory", IN_MEMORY)
    assert ("lm_head.weight" in read_file(in_memory / "model.safetensors")) == (not tied)
    to_lmms_lab(base, root / "lmms_lab")
    split_into_shards(base, root / "sharded")
    return root, sd, tied


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_torch_weights(hf_checkpoint, layout):
    root, sd, tied = hf_checkpoint
    config, params = load_params(root / layout)
    assert config.lm_head_tied == tied
    assert (config.text.head_dim, config.text.num_key_value_heads, config.vision.num_hidden_layers) == (24, 2, 3)
    assert_trees_equal(params, expected_params(sd, tied))


def test_every_layout_gives_the_same_config(hf_checkpoint):
    root, _, _ = hf_checkpoint
    configs = [load_params(root / layout)[0] for layout in LAYOUTS]
    for config in configs[1:]:
        assert config.text == configs[0].text and config.vision == configs[0].vision
        assert config.image_grid_pinpoints == configs[0].image_grid_pinpoints


def test_lmms_lab_vision_sizes_are_read_from_the_tensors(hf_checkpoint, tmp_path):
    root, sd, _ = hf_checkpoint
    path = to_lmms_lab(root / "save_pretrained", tmp_path / "ckpt", with_vision_config=False)
    config, params = load_params(path)
    v = config.vision
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.patch_size, v.image_size) == (32, 48, 3, 14, 384)
    assert v.num_attention_heads == 16  # not visible in shapes: the SigLIP default is kept
    q = sd["model.vision_tower.encoder.layers.2.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(params["vision"]["layers"]["q"]["kernel"][2]).reshape(32, 32), q.T)


def test_a_file_lm_head_is_used_even_if_the_config_ties(tmp_path):
    sd = build_hf_checkpoint(tmp_path / "ckpt", tied=False)
    config_file = tmp_path / "ckpt" / "config.json"
    raw = json.loads(config_file.read_text())
    raw["tie_word_embeddings"] = raw["text_config"]["tie_word_embeddings"] = True
    config_file.write_text(json.dumps(raw))
    config, params = load_params(tmp_path / "ckpt")
    assert not config.lm_head_tied
    np.testing.assert_array_equal(np.asarray(params["text"]["lm_head"]["kernel"]), sd["lm_head.weight"].T)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_files(tmp_path, dtype_name):
    import torch

    torch_dtype = getattr(torch, dtype_name)
    sd = build_hf_checkpoint(tmp_path / "ckpt", tied=False, torch_dtype=torch_dtype)
    config, params = load_params(tmp_path / "ckpt")  # default: float32, exact widening
    assert_trees_equal(params, expected_params(sd, tied=False))
    _, half = load_params(tmp_path / "ckpt", dtype=dtype_name)
    assert_trees_equal(half, jax.tree.map(lambda x: x.astype(loading.LOAD_DTYPES[dtype_name]),
                                          expected_params(sd, tied=False)))


def test_casting_on_load_rounds_like_torch(hf_checkpoint):
    import torch

    root, sd, tied = hf_checkpoint
    _, params = load_params(root / "save_pretrained", dtype="bfloat16")
    w = sd["model.language_model.layers.1.mlp.down_proj.weight"]
    torch_bf16 = torch.from_numpy(w.T.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    ours = np.asarray(params["text"]["layers"]["down"]["kernel"][1]).view(np.int16)
    np.testing.assert_array_equal(ours, torch_bf16)


def test_every_bad_key_is_listed_in_one_error(hf_checkpoint, tmp_path):
    root, _, _ = hf_checkpoint
    path = tmp_path / "bad"
    path.mkdir()
    shutil.copy(root / "save_pretrained" / "config.json", path)
    tensors = read_file(root / "save_pretrained" / "model.safetensors")
    tensors["language_model.model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    tensors["vision_tower.encoder.layers.0.mlp.fc1.weight"] = np.zeros((32, 48), np.float32)  # transposed
    tensors["vision_tower.encoder.layers.7.mlp.fc1.bias"] = np.zeros(48, np.float32)  # beyond the config
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_params(path)
    message = str(err.value)
    for expected in ("2 unknown keys", "language_model.model.layers.0.self_attn.rotary.weight",
                     "vision_tower.encoder.layers.7.mlp.fc1.bias",
                     "1 missing keys", "language_model.model.layers.1.mlp.up_proj.weight",
                     "1 wrong shapes", "vision_tower.encoder.layers.0.mlp.fc1.weight: file (32, 48), expected (48, 32)"):
        assert expected in message, message


@pytest.mark.parametrize("layers", [20_000, 60])
def test_a_config_with_far_more_layers_than_the_file_is_a_short_error(tiny_ckpt, tmp_path, layers):
    """20,000 layers: refused before any key is listed (10**9 ran out of memory); 60: the listing is cut short."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config))
    match = "more than the 85 tensors" if layers > 85 else r"missing keys:(\n    \S+){40}\n    \.\.\. and \d+ more"
    with pytest.raises(CheckpointError, match=match) as err:
        load_params(path)
    assert len(str(err.value)) < 5000


def test_no_config(hf_checkpoint, tmp_path):
    root, _, _ = hf_checkpoint
    shutil.copy(root / "save_pretrained" / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_params(tmp_path)


def test_no_weights_and_pickle_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_params(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pickle weights are never read"):
        load_params(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_params(tmp_path / "nowhere")


def test_corrupt_index(hf_checkpoint, tmp_path):
    root, _, _ = hf_checkpoint
    path = shutil.copytree(root / "sharded", tmp_path / "ckpt")
    index = path / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt .*index.json"):
        load_params(path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="corrupt .*KeyError"):
        load_params(path)
    wrong_shard = dict(original["weight_map"], **{"image_newline": "model-00009-of-00009.safetensors"})
    index.write_text(json.dumps({"weight_map": wrong_shard}))
    with pytest.raises(CheckpointError, match="shard files that do not exist.*00009"):
        load_params(path)
    elsewhere = next(f for f in sorted(set(original["weight_map"].values()))
                     if f != original["weight_map"]["image_newline"])
    moved = dict(original["weight_map"], image_newline=elsewhere)
    index.write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(CheckpointError, match="keys missing from their shard: \\['image_newline"):
        load_params(path)


def test_truncated_file_is_a_clear_error(hf_checkpoint, tmp_path):
    root, _, _ = hf_checkpoint
    shutil.copy(root / "save_pretrained" / "config.json", tmp_path)
    data = (root / "save_pretrained" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        load_params(tmp_path)


@pytest.mark.parametrize("transform, target", [
    (loading.COPY, (6, 4)), (loading.LINEAR, (6, 4)), (loading.CONV_HWIO, (3, 2, 5, 4)),
    (loading.HEADS_IN, (5, 3, 4)), (loading.HEADS_OUT, (3, 4, 5)), (loading.HEADS_BIAS, (3, 4)),
], ids=lambda x: x.name.split()[0] if isinstance(x, loading.Transform) else None)
def test_transform_reads_any_slice_like_the_full_transform(transform, target):
    rng = np.random.default_rng(0)
    source = rng.standard_normal(transform.source_shape(target)).astype(np.float32)
    full = transform.read(source, target, tuple(slice(0, n) for n in target))
    assert full.shape == target
    for _ in range(30):
        index = tuple(slice(*sorted(int(x) for x in rng.choice(n + 1, 2, replace=False))) for n in target)
        np.testing.assert_array_equal(transform.read(source, target, index), full[index])


def test_sharded_load_reads_only_each_devices_slice(hf_checkpoint, monkeypatch):
    """8 simulated devices, mesh fsdp=2 × tensor=4: every device's callback reads exactly its shard's bytes."""
    root, _, _ = hf_checkpoint
    path = root / "sharded"
    config = loading.checkpoint_config(path)
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    shardings = mesh_shardings(config, mesh)
    reads: dict[tuple, int] = {}
    current: list = []
    real_read_leaf, real_read_slice = loading.read_leaf, loading._read_slice

    def read_leaf(leaf, index=None, dtype=None):
        current[:] = [(leaf.path, tuple((s.start, s.stop) for s in index))]
        reads.setdefault(current[0], 0)
        return real_read_leaf(leaf, index, dtype)

    def read_slice(tensor, index):
        out = real_read_slice(tensor, index)
        reads[current[0]] += out.nbytes
        return out

    monkeypatch.setattr(loading, "read_leaf", read_leaf)
    monkeypatch.setattr(loading, "_read_slice", read_slice)
    _, sharded = load_params(path, shardings=shardings)
    monkeypatch.undo()
    _, plain = load_params(path)
    assert_trees_equal(sharded, plain)

    plan = loading.plan_checkpoint(path)
    per_device = dict.fromkeys(mesh.devices.flat, 0)
    model_bytes, unique_bytes = 0, 0
    for leaf_path, leaf in plan.leaves.items():
        array, sharding = sharded, shardings
        for key in leaf_path:
            array, sharding = array[key], sharding[key]
        assert array.sharding == sharding
        itemsize = leaf.file_dtype.itemsize
        model_bytes += math.prod(leaf.shape) * itemsize
        seen = set()
        for device, index in array.sharding.devices_indices_map(leaf.shape).items():
            index = loading._normalize_index(index, leaf.shape)
            key = (leaf_path, tuple((s.start, s.stop) for s in index))
            shard_bytes = math.prod(s.stop - s.start for s in index) * itemsize
            assert reads[key] == shard_bytes, (leaf_path, index)
            per_device[device] += shard_bytes
            if key not in seen:
                seen.add(key)
                unique_bytes += shard_bytes
    assert sum(reads.values()) == unique_bytes  # replicas of a shard are read once
    q = plan.leaves[("text", "layers", "q", "kernel")]  # [L, embed/fsdp, heads/tensor, hd]: 1/8 per device
    q_reads = [b for (p, _), b in reads.items() if p == q.path]
    assert q_reads == [math.prod(q.shape) * q.file_dtype.itemsize // 8] * 8
    for device, n in per_device.items():
        assert n < model_bytes / 2, (device, n, model_bytes)
    print(f"bytes read per device: {sorted(set(per_device.values()))} of {model_bytes} in the model")


def test_shardings_must_match_the_params_tree(hf_checkpoint):
    root, _, _ = hf_checkpoint
    config = loading.checkpoint_config(root / "save_pretrained")
    shardings = mesh_shardings(config, jax.make_mesh((8,), ("tensor",)))
    del shardings["image_newline"]
    with pytest.raises(ValueError, match=r"missing \['image_newline'\]"):
        load_params(root / "save_pretrained", shardings=shardings)


def test_unsupported_dtype_argument(hf_checkpoint):
    root, _, _ = hf_checkpoint
    with pytest.raises(ValueError, match="int8"):
        load_params(root / "save_pretrained", dtype=np.int8)
    assert loading.resolve_load_dtype(None) == np.float32
    assert loading.resolve_load_dtype(ml_dtypes.bfloat16) == loading.LOAD_DTYPES["bfloat16"]
