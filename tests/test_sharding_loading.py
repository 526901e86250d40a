"""Loading straight into shardings: each device's slice is read on its own, from safetensors and from orbax."""

from collections import Counter

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ov_jax import loading
from ov_jax import sharding as sh
from ov_jax.tiny import make_tiny

MESH = "data=2,tensor=4"


@pytest.fixture(scope="module")
def shardable_ckpt(tmp_path_factory):
    """Tiny checkpoint with 8 query / 2 KV heads (tensor=4 splits the heads, not the KV heads)."""
    return make_tiny(tmp_path_factory.mktemp("shardable"), text_overrides={"num_attention_heads": 8},
                     vision_overrides={"num_attention_heads": 4})


@pytest.fixture(scope="module")
def unsharded(shardable_ckpt):
    return loading.load_params(shardable_ckpt)


def _leaves(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="."): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _count_reads(monkeypatch):
    """Bytes read from the safetensors files, charged to the device whose shard callback read them."""
    per_device: Counter = Counter()
    per_call: list[tuple[str, int, int]] = []  # (device, bytes read, shard bytes)
    reads: list[int] = []
    real_read, real_make = loading._read_slice, jax.make_array_from_callback

    def counting_read(tensor, index):
        out = real_read(tensor, index)
        reads.append(out.nbytes)
        return out

    def counting_make(shape, sharding, callback, dtype=None):
        index_map = sharding.addressable_devices_indices_map(shape)
        order = list(index_map)[:1] if sharding.is_fully_replicated else list(index_map)
        calls = iter(order)

        def charged(index):
            device = next(calls)
            assert sharding.is_fully_replicated or index == index_map[device], "jax changed its callback order"
            before = sum(reads)
            out = callback(index)
            per_device[str(device)] += sum(reads) - before
            per_call.append((str(device), sum(reads) - before, out.nbytes))
            return out

        return real_make(shape, sharding, charged, dtype)

    monkeypatch.setattr(loading, "_read_slice", counting_read)
    monkeypatch.setattr(jax, "make_array_from_callback", counting_make)
    return per_device, per_call


def test_safetensors_loading_reads_only_each_devices_slices(shardable_ckpt, unsharded, monkeypatch):
    mesh = sh.make_mesh(MESH)
    config = loading.checkpoint_config(shardable_ckpt)
    shardings = sh.param_shardings(config, mesh)
    per_device, per_call = _count_reads(monkeypatch)
    _, params = loading.load_params(shardable_ckpt, shardings=shardings)

    # every callback read exactly its shard (or nothing: a replica of a shard already read), never more
    assert all(read in (0, shard) for _, read, shard in per_call)
    file_bytes = sum(x.nbytes for x in jax.tree.leaves(unsharded[1]))
    assert sum(per_device.values()) == file_bytes, "each checkpoint byte is read exactly once"
    # per device: exactly the shards it is the first holder of (replicas along data read nothing)
    expected: Counter = Counter()
    for x, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        first_holder = {}
        for device, index in sharding.addressable_devices_indices_map(x.shape).items():
            first_holder.setdefault(tuple((s.start, s.stop) for s in index), device)
        for device in first_holder.values():
            expected[str(device)] += sh.per_device_bytes(x, sharding)
    assert per_device == expected
    assert max(per_device.values()) < file_bytes / 2
    assert all(per_device[str(d)] == 0 for d in mesh.devices[1].flat)

    q = params["text"]["layers"]["q"]["kernel"]
    assert q.sharding.spec == P(None, None, "tensor") and q.addressable_shards[0].data.shape[2] == 2
    for name, x in _leaves(params).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(_leaves(unsharded[1])[name]), err_msg=name)


def test_orbax_restores_into_target_shardings(shardable_ckpt, unsharded, tmp_path):
    from ov_jax import checkpoint

    config, params = unsharded
    target = checkpoint.save_orbax(params, config, tmp_path / "converted", files_from=shardable_ckpt)
    shardings = sh.param_shardings(config, sh.make_mesh(MESH))
    restored_config, restored = checkpoint.load_orbax(target, shardings=shardings)
    assert restored_config == config
    want, got = _leaves(shardings), _leaves(restored)
    for name, x in _leaves(params).items():
        assert got[name].sharding == want[name], name
        for shard in got[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(x)[shard.index], err_msg=name)


@pytest.mark.parametrize("source", ["safetensors", "orbax"])
def test_from_pretrained_onto_a_mesh(shardable_ckpt, unsharded, tmp_path, source):
    from ov_jax import checkpoint
    from ov_jax.model import LlavaOnevision

    path = shardable_ckpt
    if source == "orbax":
        path = checkpoint.save_orbax(unsharded[1], unsharded[0], tmp_path / "converted", files_from=shardable_ckpt)
    model = LlavaOnevision.from_pretrained(path, mesh=MESH)
    mesh = sh.mesh_of(model.params)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert model.params["text"]["layers"]["up"]["kernel"].sharding.spec == P(None, None, "tensor")
    assert model.params["text"]["layers"]["k"]["kernel"].sharding.spec == P()  # 2 KV heads < tensor=4

    reference = LlavaOnevision.from_params(*unsharded)
    ids = np.random.default_rng(0).integers(1, 200, (2, 9))
    np.testing.assert_allclose(np.asarray(model(ids).logits), np.asarray(reference(ids).logits), atol=1e-5, rtol=2e-6)
