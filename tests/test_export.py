"""Export to the transformers layout: the loading key table run backwards, checked against transformers 5.24."""

import dataclasses
import hashlib
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from loading_helpers import (HUB, assert_trees_equal, build_hf_checkpoint, read_file, rekey, to_lmms_lab)
from ov_jax import loading
from ov_jax.compare import reference_processor
from ov_jax.config import load_config
from ov_jax.export import hf_state_dict, save_pretrained
from ov_jax.loading import canonical_key, checkpoint_keys, load_params, saved_key
from ov_jax.model import LlavaOnevision
from ov_jax.nn.lora import LM_LINEARS, add_lora, merge_lora
from ov_jax.outputs import MARKER, OutputPathError
from ov_jax.params import random_params
from ov_jax.presets import TINY
from ov_jax.tiny import random_params as tiny_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY_WEIGHTS_SHA256_PREFIX = "b40566ed567a10a0"  # make_tiny(seed=0)'s tensors since the first tiny checkpoints
CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]


def _image(height=300, width=500, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf_model(path, **kwargs):
    model, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, output_loading_info=True, **kwargs)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def _tensors(path):
    """Every tensor of a checkpoint directory (single file or sharded)."""
    return {key: read_file(file)[key] for key, file in loading.weight_files(path).items()}


@pytest.fixture(scope="module", params=["tiny_ckpt", "tiny_ckpt_tied"])
def exported(request, tmp_path_factory):
    """(source checkpoint, our model loaded from it, its export)."""
    source = request.getfixturevalue(request.param)
    model = LlavaOnevision.from_pretrained(source)
    out = model.save_pretrained(tmp_path_factory.mktemp("export") / "out")
    return source, model, out


@pytest.mark.parametrize("transform, target", [
    (loading.COPY, (6, 4)), (loading.LINEAR, (6, 4)), (loading.CONV_HWIO, (3, 2, 5, 4)),
    (loading.HEADS_IN, (5, 3, 4)), (loading.HEADS_OUT, (3, 4, 5)), (loading.HEADS_BIAS, (3, 4)),
], ids=lambda x: x.name.split()[0] if isinstance(x, loading.Transform) else None)
def test_transform_write_inverts_read(transform, target):
    source = np.random.default_rng(0).standard_normal(transform.source_shape(target)).astype(np.float32)
    leaf = transform.read(source, target, tuple(slice(0, n) for n in target))
    written = transform.write(leaf)
    assert written.shape == source.shape and written.dtype == source.dtype
    np.testing.assert_array_equal(written, source)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_keys_read_back_as_their_canonical_names(tied):
    config = TINY.replace(tie_word_embeddings=tied)
    names = checkpoint_keys(config)
    assert ("lm_head.weight" in names) == (not tied)
    for name in names:
        key = saved_key(name)
        assert key.split(".")[0] in ("vision_tower", "multi_modal_projector", "language_model", "image_newline")
        assert canonical_key(key)[0] == name
    with pytest.raises(KeyError, match="not a canonical"):
        saved_key("model.layers.0.weight")


def test_exported_names_and_tensors_equal_the_source(exported):
    """The llava-hf source and its export hold the same keys, shapes and bits (tied: no lm_head, as transformers)."""
    source, _, out = exported
    ours, theirs = _tensors(out), _tensors(source)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    tied = load_config(source).lm_head_tied
    assert ("language_model.lm_head.weight" in ours) == (not tied)
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}


def test_exported_logits_match_ours_and_the_source(exported):
    """Text + anyres image (2k tokens) through transformers on the export: the source's logits bit for bit,
    and ours within 1e-4 (of transformers in float64: two float32 runs differ by ~1e-4 at this length)."""
    source, model, out = exported
    processor = reference_processor(source)
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    text = processor(text="The cat is sitting on the wooden table.", return_tensors="pt")
    exported32, source32, exported64 = _hf_model(out), _hf_model(source), _hf_model(out, dtype=torch.float64)
    for batch in (inputs, text):
        with torch.no_grad():
            theirs = exported32(**batch).logits.numpy()
            original = source32(**batch).logits.numpy()
            exact = exported64(**{k: v.double() if v.is_floating_point() else v for k, v in batch.items()}).logits
        ours = np.asarray(model(**{k: v.numpy() for k, v in batch.items()}).logits)
        np.testing.assert_array_equal(theirs, original)
        assert np.abs(ours - exact.numpy()).max() <= TOL
        assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.999
        assert theirs.std() > 1.0  # informative logits, not a degenerate model


def test_processor_and_tokenizer_files_are_the_sources(exported):
    source, _, out = exported
    copied = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "video_preprocessor_config.json", "processor_config.json", "generation_config.json")
    for name in copied:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    prompt_source = reference_processor(source).apply_chat_template(CONVERSATION, add_generation_prompt=True)
    prompt_out = reference_processor(out).apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert prompt_out == prompt_source
    # AutoProcessor needs torchvision for its video processor; reference_processor is it without videos
    loaders = [reference_processor]
    if transformers.utils.is_torchvision_available():
        loaders.append(transformers.AutoProcessor.from_pretrained)
    for load in loaders:
        theirs = load(source)(images=_image(), text=prompt_source, return_tensors="np")
        ours = load(out)(images=_image(), text=prompt_out, return_tensors="np")
        assert ours.keys() == theirs.keys()
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert (theirs["input_ids"] == load_config(source).image_token_id).sum() > 729


def test_config_json_is_the_sources_for_transformers(exported):
    source, _, out = exported
    theirs = transformers.LlavaOnevisionConfig.from_pretrained(source).to_dict()
    ours = transformers.LlavaOnevisionConfig.from_pretrained(out).to_dict()
    assert ours == theirs
    assert load_config(out) == load_config(source)


def test_round_trip_is_exact(exported, tmp_path):
    """load(export(params)) == params, in float32 and in bfloat16."""
    _, model, out = exported
    config, params = load_params(out)
    assert config == model.config
    assert_trees_equal(params, model.params)
    half = LlavaOnevision.from_params(model.config, model.params, dtype="bfloat16")
    path = half.save_pretrained(tmp_path / "bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == ml_dtypes.bfloat16 for v in _tensors(path).values())
    assert_trees_equal(load_params(path, dtype="bfloat16")[1], half.params)
    cast = model.save_pretrained(tmp_path / "f16", dtype="float16")
    assert json.loads((cast / "config.json").read_text())["dtype"] == "float16"
    assert_trees_equal(load_params(cast, dtype="float16")[1],
                       jax.tree.map(lambda x: np.asarray(x).astype(np.float16), model.params))


def test_params_sharded_over_a_mesh_export_the_same_files(tiny_ckpt, tmp_path):
    model = LlavaOnevision.from_pretrained(tiny_ckpt, mesh="data=2,tensor=4")
    assert len(model.params["text"]["layers"]["q"]["kernel"].sharding.device_set) > 1
    out = model.save_pretrained(tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (tiny_ckpt / "model.safetensors").read_bytes()


def test_hf_state_dict_maps_a_gradient_shaped_tree_to_torch_names(tiny_ckpt):
    """Any params-shaped tree (here random, as gradients would be) lands where torch keeps that weight."""
    model = LlavaOnevision.from_pretrained(tiny_ckpt)
    grads = random_params(model.config, seed=3)
    state = hf_state_dict(model.config, grads)
    torch_model = _hf_model(tiny_ckpt)
    torch_names = {canonical_key(k)[0]: k for k in torch_model.state_dict()}  # in-memory names
    assert sorted(canonical_key(k)[0] for k in state) == sorted(torch_names)
    torch_model.load_state_dict({torch_names[canonical_key(k)[0]]: torch.from_numpy(np.array(v))
                                 for k, v in state.items()})
    q = grads["text"]["layers"]["q"]["kernel"][1]  # [H, nh, hd] → torch [nh*hd, H]
    np.testing.assert_array_equal(
        torch_model.model.language_model.layers[1].self_attn.q_proj.weight.detach().numpy(), q.reshape(64, -1).T)
    np.testing.assert_array_equal(  # conv [kh, kw, in, out] → torch [out, in, kh, kw]
        torch_model.model.vision_tower.embeddings.patch_embedding.weight.detach().numpy(),
        grads["vision"]["patch_embed"]["kernel"].transpose(3, 2, 0, 1))
    bad = jax.tree.map(lambda x: x, grads)
    del bad["text"]["norm"]
    with pytest.raises(ValueError, match="missing"):
        hf_state_dict(model.config, bad)


def test_sharded_export(tiny_ckpt, tmp_path):
    """Above max_shard_size: transformers' shard names and index; every tensor once; transformers loads it."""
    model = LlavaOnevision.from_pretrained(tiny_ckpt)
    out = model.save_pretrained(tmp_path / "out", max_shard_size=200_000)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    tensors = _tensors(out)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(v.size for v in tensors.values())
    assert all(os.path.getsize(out / s) < 200_000 + 70_000 for s in shards)  # one tensor may overshoot
    single = _tensors(tiny_ckpt)
    assert sorted(tensors) == sorted(single)
    for key in single:
        np.testing.assert_array_equal(tensors[key], single[key])
    reference, exported_state = _hf_model(tiny_ckpt).state_dict(), _hf_model(out).state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(exported_state[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_lmms_lab_and_hub_layouts_export_to_what_transformers_saves(tied, tmp_path):
    """Any layout we read exports to transformers 5.24's save_pretrained names; transformers loads the same
    weights as from the original (non-square attention heads, head_dim 24, need config head_dim)."""
    reference = build_hf_checkpoint(tmp_path / "base", tied=tied)
    base = tmp_path / "base"
    expected = sorted(k for k in read_file(base / "model.safetensors") if not k.startswith("vision_tower.head."))
    for layout, path in (("lmms_lab", to_lmms_lab(base, tmp_path / "lmms_lab")),
                         ("hub", rekey(base, tmp_path / "hub", HUB))):
        out = LlavaOnevision.from_pretrained(path).save_pretrained(tmp_path / f"{layout}_out")
        assert sorted(_tensors(out)) == expected, layout
        state = _hf_model(out).state_dict()
        assert sorted(state) == sorted(k for k in reference if ".vision_tower.head." not in k)
        for key, value in state.items():
            np.testing.assert_array_equal(value.numpy(), reference[key], err_msg=f"{layout} {key}")


def test_from_params_export_has_a_derived_generation_config(tmp_path):
    config = TINY.replace(text=dataclasses.replace(TINY.text, pad_token_id=0))
    model = LlavaOnevision.from_params(config, random_params(config, seed=1))
    out = model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", "generation_config.json",
                                                     "model.safetensors"]
    generation = transformers.GenerationConfig.from_pretrained(out)
    t = config.text
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        t.bos_token_id, t.eos_token_id, 0)
    ids = np.array([[5, 17, 200, 3]])
    with torch.no_grad():
        theirs = _hf_model(out)(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.asarray(model(ids).logits) - theirs).max() <= TOL


def test_output_directory_is_new_empty_or_an_earlier_export(tiny_ckpt, tmp_path):
    model = LlavaOnevision.from_pretrained(tiny_ckpt)
    before = {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()}
    with pytest.raises(OutputPathError, match="source"):
        model.save_pretrained(tiny_ckpt, overwrite=True)
    with pytest.raises(OutputPathError, match="source"):
        model.save_pretrained(tiny_ckpt.parent, overwrite=True)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="other files"):
        model.save_pretrained(occupied, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="existing file"):
        model.save_pretrained(tmp_path / "file", overwrite=True)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and (occupied / "notes.txt").read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()} == before
    (tmp_path / "empty").mkdir()
    out = model.save_pretrained(tmp_path / "empty")
    assert out == (tmp_path / "empty").resolve() and (out / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save_pretrained(out)
    (out / "model.safetensors").write_bytes(b"stale")
    model.save_pretrained(out, overwrite=True)  # an earlier export is replaced whole
    assert _tensors(out).keys() == _tensors(tiny_ckpt).keys()


def test_bad_params_write_nothing(tmp_path):
    params = random_params(TINY, seed=0)
    params["text"]["layers"]["q"]["kernel"] = params["text"]["layers"]["q"]["kernel"][:1]
    with pytest.raises(ValueError, match="shape"):
        save_pretrained(TINY, params, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_tiny_checkpoints_are_written_through_hf_state_dict(tiny_ckpt):
    """make_tiny's weights are its params tree exported by the one key table, and the same weights as ever
    (tests fitted on them rely on the exact values)."""
    config = load_config(tiny_ckpt)
    file = read_file(tiny_ckpt / "model.safetensors")
    state = hf_state_dict(config, tiny_params(config, seed=0))
    assert sorted(state) == sorted(file)
    digest = hashlib.sha256()
    for key in sorted(file):
        np.testing.assert_array_equal(state[key], file[key])
        digest.update(key.encode() + file[key].tobytes())
    assert digest.hexdigest()[:16] == TINY_WEIGHTS_SHA256_PREFIX


def test_lora_adapters_are_merged_on_export(tiny_ckpt, tmp_path):
    """Adapters on every weight kind (decoder, lm_head, projector, tower, patch embedding) after some training:
    the export holds exactly merge_lora's weights, and transformers on it computes the adapted model."""
    base = LlavaOnevision.from_pretrained(tiny_ckpt)
    targets = LM_LINEARS + r"|text\.lm_head|projector\.linear_[12]|vision\.layers\.(q|o|fc1)|vision\.patch_embed"
    with_lora, spec = add_lora(base.params, base.config, rank=4, alpha=8.0, targets=targets, seed=2)
    rng = np.random.default_rng(5)
    trained = jax.tree_util.tree_map_with_path(  # lora_b moved away from zero, as training does
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) if "lora_b" in jax.tree_util.keystr(p)
        else x, with_lora)
    model = LlavaOnevision(base.config, trained, lora=spec)
    model.source_dir = base.source_dir
    out = model.save_pretrained(tmp_path / "out")
    config, params = load_params(out)
    assert config == base.config
    assert_trees_equal(params, jax.tree.map(np.asarray, merge_lora(trained)))
    processor = reference_processor(tiny_ckpt)
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    batch = processor(images=_image(120, 150), text=prompt, return_tensors="pt")
    with torch.no_grad():
        exact = _hf_model(out, dtype=torch.float64)(
            **{k: v.double() if v.is_floating_point() else v for k, v in batch.items()}).logits.numpy()
    inputs = {k: v.numpy() for k, v in batch.items()}
    adapted, before = np.asarray(model(**inputs).logits), np.asarray(base(**inputs).logits)
    assert np.abs(adapted - exact).max() <= TOL
    assert np.abs(before - exact).max() > 1e-2  # the adapters change the model


def test_export_of_a_converted_checkpoint_is_the_sources(tiny_ckpt, tmp_path):
    """From an `ov-jax convert` directory: same weights and files as exporting the original, none of the
    converted directory's own files (params/, checksums, our config section, output marker)."""
    from ov_jax.checkpoint import convert

    convert(tiny_ckpt, tmp_path / "converted", progress=False)
    out = LlavaOnevision.from_pretrained(tmp_path / "converted").save_pretrained(tmp_path / "out")
    direct = LlavaOnevision.from_pretrained(tiny_ckpt).save_pretrained(tmp_path / "direct")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in direct.iterdir())
    for file in direct.iterdir():
        if file.name != MARKER:
            assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    assert "ov_jax" not in json.loads((out / "config.json").read_text())
