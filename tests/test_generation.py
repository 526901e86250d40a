"""Generation defaults against transformers 5.24: stop / pad ids and sampling values from generation_config.json,
the attention mask inferred from the pad id, value checks, the position limit, and the engine following the
model's live params."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ov_jax import cli
from ov_jax.engine import Buckets, engine_for
from ov_jax.generation import (BeyondMaxPositionsError, GenerationConfig, GenerationConfigError,
                               infer_attention_mask)
from ov_jax.model import LlavaOnevision

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BUCKETS = Buckets(batch=(4,), prompt=(32,), cache=(64,))


def attach_engine(model: LlavaOnevision) -> LlavaOnevision:
    engine_for(model, BUCKETS)
    return model


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return attach_engine(LlavaOnevision.from_pretrained(tiny_ckpt))


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt).eval()


def text_prompt(config, n: int, seed: int = 0) -> np.ndarray:
    """``n`` ordinary text ids (below the special tokens)."""
    return np.random.default_rng(seed).integers(3, config.text.pad_token_id, n)


def hf_new_tokens(reference, ids, **kwargs) -> np.ndarray:
    """transformers' new tokens (``generate`` with the model's own generation config plus ``kwargs``)."""
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(np.asarray(ids)), **kwargs)
    return out[:, np.shape(ids)[1]:].numpy()


def copy_checkpoint(src, dst, generation_config=None, text_config=None):
    shutil.copytree(src, dst)
    if generation_config is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation_config))
    if text_config is not None:
        config = json.loads((dst / "config.json").read_text())
        config["text_config"].update(text_config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


# --- 1. stop and pad ids: one path, read from generation_config.json -----------------------------------------


def test_generation_config_stop_ids_stop_like_transformers_also_after_convert(tiny_ckpt, model, reference,
                                                                              tmp_path):
    ids = text_prompt(model.config, 12)[None]
    free = hf_new_tokens(reference, ids, max_new_tokens=10, do_sample=False, eos_token_id=None)[0]
    im_end = model.config.text.eos_token_id
    x = int(free[4])  # the 5th greedy token becomes a stop id
    stops = [im_end, x]
    generation = {"bos_token_id": 598, "eos_token_id": stops, "pad_token_id": 598}
    ckpt = copy_checkpoint(tiny_ckpt, tmp_path / "ckpt", generation_config=generation)

    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    want = hf_new_tokens(ref, ids, max_new_tokens=10, do_sample=False)[0]
    assert len(want) <= 5 and want[-1] == x  # transformers stops at X

    ours = attach_engine(LlavaOnevision.from_pretrained(ckpt))
    assert ours.generation_config.eos_token_id == tuple(stops)
    got = ours.generate(ids, max_new_tokens=10)[0]
    np.testing.assert_array_equal(got[:len(want)], want)
    assert (got[len(want):] == 598).all()  # then the pad id

    from ov_jax.checkpoint import convert

    convert(ckpt, tmp_path / "converted", progress=False)
    assert LlavaOnevision.from_pretrained(tmp_path / "converted").generation_config == ours.generation_config


def test_generation_config_file_and_fallback(tiny_ckpt, tmp_path):
    config = LlavaOnevision.from_pretrained(tiny_ckpt).config
    with_file = GenerationConfig.from_pretrained(tiny_ckpt, config.text)
    assert (with_file.eos_token_id, with_file.pad_token_id, with_file.bos_token_id) == ((600,), 598, 598)
    assert (with_file.do_sample, with_file.temperature, with_file.top_k, with_file.top_p) == (False, 1.0, 50, 1.0)

    # no generation_config.json: the text config's ids, as transformers' from_model_config
    bare = copy_checkpoint(tiny_ckpt, tmp_path / "bare")
    (bare / "generation_config.json").unlink()
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(bare).generation_config
    ours = GenerationConfig.from_pretrained(bare, config.text)
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == ((ref.eos_token_id,), ref.pad_token_id,
                                                                         ref.bos_token_id)

    broken = copy_checkpoint(tiny_ckpt, tmp_path / "broken", generation_config={"top_p": 2.0})
    with pytest.raises(GenerationConfigError, match="generation_config.json.*top_p"):
        GenerationConfig.from_pretrained(broken, config.text)
    (broken / "generation_config.json").write_text("{not json")
    with pytest.raises(GenerationConfigError, match="generation_config.json"):
        GenerationConfig.from_pretrained(broken, config.text)


def test_max_length_and_default_length_follow_transformers(model, reference):
    ids = text_prompt(model.config, 9, seed=3)[None]
    no_stop = dict(do_sample=False, eos_token_id=None)
    assert hf_new_tokens(reference, ids, **no_stop).shape[1] == 20  # transformers' default: 20 new tokens
    assert model.generate(ids, stop_token_ids=[]).shape == (1, 20)
    assert dataclasses.replace(model.generation_config, max_length=15).new_tokens(9) == 6
    with pytest.raises(GenerationConfigError, match="max_length"):
        dataclasses.replace(model.generation_config, max_length=9).new_tokens(9)


# --- 2. attention mask inferred from the pad id --------------------------------------------------------------


def test_left_padded_batch_without_mask_matches_transformers(model, reference):
    pad = model.generation_config.pad_id
    short, long = text_prompt(model.config, 5, seed=1), text_prompt(model.config, 11, seed=2)
    ids = np.stack([np.concatenate([[pad] * 6, short]), long])
    want = hf_new_tokens(reference, ids, max_new_tokens=8, do_sample=False)
    want = np.pad(want, ((0, 0), (0, 8 - want.shape[1])), constant_values=pad)
    got = model.generate(ids, max_new_tokens=8)
    np.testing.assert_array_equal(got, want)
    # the padded row equals its own unpadded run
    np.testing.assert_array_equal(got[0], model.generate(short[None], max_new_tokens=8)[0])


def test_mask_inference_rule():
    gen = GenerationConfig(eos_token_id=(7,), pad_token_id=3)
    ids = np.array([[3, 3, 5], [4, 5, 6]])
    np.testing.assert_array_equal(infer_attention_mask(ids, gen), ids != 3)
    # pad equal to a stop id (or no pad at all): nothing can be inferred, every token is attended
    for unknown in (GenerationConfig(eos_token_id=(3,), pad_token_id=3), GenerationConfig(eos_token_id=(3,)),
                    GenerationConfig()):
        assert infer_attention_mask(ids, unknown).all()


# --- 3. sampling defaults ------------------------------------------------------------------------------------


def sampled_first_tokens(model, ids, **kwargs) -> np.ndarray:
    """200 first tokens: 50 seeds x 4 identical rows."""
    batch = np.repeat(ids, 4, axis=0)
    return np.concatenate([model.generate(batch, max_new_tokens=1, seed=seed, **kwargs)[:, 0] for seed in range(50)])


def test_sampling_defaults_to_top_k_50_and_honours_the_checkpoint(tiny_ckpt, model, tmp_path):
    ids = text_prompt(model.config, 10, seed=4)[None]
    logits = np.asarray(model(ids).logits)[0, -1]
    order = np.argsort(-logits, kind="stable")

    def outside(tokens, k):
        return int((~np.isin(tokens, order[:k])).sum())

    assert outside(sampled_first_tokens(model, ids, do_sample=True, temperature=3.0), 50) == 0
    assert outside(sampled_first_tokens(model, ids, do_sample=True, temperature=3.0, top_k=0), 50) > 50

    ckpt = copy_checkpoint(tiny_ckpt, tmp_path / "top5",
                           generation_config={"eos_token_id": 600, "pad_token_id": 598, "do_sample": True,
                                              "temperature": 3.0, "top_k": 5})
    loaded = GenerationConfig.from_pretrained(ckpt, model.config.text)
    assert (loaded.do_sample, loaded.temperature, loaded.top_k, loaded.top_p) == (True, 3.0, 5, 1.0)
    default = model.generation_config
    try:
        model.generation_config = loaded
        tokens = sampled_first_tokens(model, ids)
        assert outside(tokens, 5) == 0 and len(set(tokens.tolist())) > 1
        # an explicit keyword still wins over the checkpoint
        assert outside(sampled_first_tokens(model, ids, top_k=50), 5) > 0
    finally:
        model.generation_config = default


# --- 4. bad sampling values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf"), do_sample=True), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(temperature=1e-300, do_sample=True), "temperature"), (dict(temperature=1e308), "float32"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(stop_token_ids=[-1]), "eos_token_id"),
])
def test_bad_sampling_values_are_named(model, kwargs, name):
    with pytest.raises(GenerationConfigError, match=name):
        model.generate(text_prompt(model.config, 4)[None], **kwargs)


def test_batch_checks_sampling_values_before_any_request(model):
    from ov_jax.batch_inference import make_generate_fn

    with pytest.raises(GenerationConfigError, match="temperature"):
        make_generate_fn(model, processor=None, temperature=float("nan"), seed=1)
    with pytest.raises(GenerationConfigError, match="max_new_tokens"):
        make_generate_fn(model, processor=None, max_new_tokens=0)


@pytest.mark.parametrize("flags,name", [(["--temperature", "nan"], "temperature"), (["--top-p", "nan"], "top_p"),
                                        (["--temperature", "inf"], "temperature"), (["--top-k", "-3"], "top_k")])
def test_cli_bad_sampling_values_are_one_line(tiny_ckpt, capsys, flags, name):
    status = cli.main(["generate", "--model", str(tiny_ckpt), "--prompt", "Hi", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and name in err[0], err


# --- 5. prompt + new tokens beyond max_position_embeddings ------------------------------------------------------


def test_beyond_max_positions_is_an_error_unless_allowed(tiny_ckpt, model, tmp_path, capsys):
    ckpt = copy_checkpoint(tiny_ckpt, tmp_path / "short", text_config={"max_position_embeddings": 16})
    short = attach_engine(LlavaOnevision.from_pretrained(ckpt))
    ids = text_prompt(model.config, 12, seed=5)[None]
    short.generate(ids, max_new_tokens=4, stop_token_ids=[])  # 16 positions: fits
    with pytest.raises(BeyondMaxPositionsError, match="max_position_embeddings=16"):
        short.generate(ids, max_new_tokens=5)
    np.testing.assert_array_equal(short.generate(ids, max_new_tokens=8, allow_beyond_max_positions=True),
                                  model.generate(ids, max_new_tokens=8))

    args = ["generate", "--model", str(ckpt), "--prompt", "Describe a long scene in detail.", "--max-new-tokens", "8"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is the cleared loading bar
    assert "Traceback" not in err and len(errors) == 1, err
    assert "max_position_embeddings=16" in errors[0] and "--allow-beyond-max-positions" in errors[0]


# --- 6. the engine follows the model's live params ---------------------------------------------------------------


def test_generate_uses_reassigned_params_without_recompiling(model):
    ids = text_prompt(model.config, 10, seed=6)[None]
    original = model.params
    before = model.generate(ids, max_new_tokens=8, stop_token_ids=[])
    compiled = engine_for(model).compile_count
    rng = np.random.default_rng(0)
    perturbed = jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), original)
    try:
        model.params = perturbed
        after = model.generate(ids, max_new_tokens=8, stop_token_ids=[])
        fresh = attach_engine(LlavaOnevision(model.config, perturbed))
        np.testing.assert_array_equal(after, fresh.generate(ids, max_new_tokens=8, stop_token_ids=[]))
        assert not np.array_equal(after, before)
        assert engine_for(model).compile_count == compiled

        # a leaf replaced inside the tree is seen too
        model.params = jax.tree.map(lambda x: x, original)  # new dicts, same leaves: nothing to re-derive
        model.params["text"]["lm_head"] = perturbed["text"]["lm_head"]
        mixed = attach_engine(LlavaOnevision(model.config, jax.tree.map(lambda x: x, model.params)))
        got = model.generate(ids, max_new_tokens=8, stop_token_ids=[])
        np.testing.assert_array_equal(got, mixed.generate(ids, max_new_tokens=8, stop_token_ids=[]))
        assert not np.array_equal(got, before)
        assert engine_for(model).compile_count == compiled
    finally:
        model.params = original
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=8, stop_token_ids=[]), before)
