"""Weight-only int8 / int4 quantization: memory, agreement with bfloat16, storage, sharding, errors."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agreement_helpers import agreement, distinct_targets, fitted_head, text_positions, top1_margin
from loading_helpers import assert_trees_equal
from ov_jax.checkpoint import load_orbax, save_orbax
from ov_jax.config import QuantConfig
from ov_jax.geometry import image_token_count, video_token_count
from ov_jax.model import LlavaOnevision
from ov_jax.nn.linear import kernel_of, table_of, unpack_int4
from ov_jax.modeling.lm_head import lm_logits
from ov_jax.nn.quant import _pack_int4, quantize_leaf, quantize_params, weight_bytes
from ov_jax.params import check_tree, param_specs, random_params
from ov_jax.presets import preset

# Divides every input size of the tiny model. Its attention is deliberately sharp (q/k gains: score std ~ 4),
# which amplifies int4's noise: top-1 agreement with bf16 measured 87.0% at group 32, 92.4% at group 16.
TINY_GROUP = 16


def _spec_bytes(config, float_dtype=jnp.bfloat16) -> int:
    """Bytes of the language model's weights as declared (no arrays built)."""
    specs = param_specs(config)["text"]
    return sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype or float_dtype).itemsize
               for s in jax.tree.leaves(specs, is_leaf=lambda x: hasattr(x, "axes")))


@pytest.mark.parametrize("name", ["0.5b", "7b", "72b"])
@pytest.mark.parametrize("quant, ratio", [(QuantConfig("int8"), 1.9), (QuantConfig("int4", 128), 3.5),
                                          (QuantConfig("int4", 128, int8_weights=()), 3.7)])
def test_lm_weight_bytes_shrink(name, quant, ratio):
    """Embedding (tied head) included; scales stored in bfloat16 like the other float leaves. Measured on the
    0.5B: int8 2.00x, int4 3.62x (3.76x with no int8 exceptions); the 72B's int4 3.51x."""
    config = preset(name)
    measured = _spec_bytes(config) / _spec_bytes(config.replace(quantization=quant))
    assert measured >= ratio, measured


@pytest.mark.parametrize("mode, ratio", [("int8", 1.9), ("int4", 3.5)])
def test_lm_weight_bytes_shrink_on_arrays(tiny_ckpt, mode, ratio):
    """On arrays, group 64 (the tiny model's hidden size: one scale per 64 features, as 128 on the 0.5B's 896),
    int4 everywhere (the tiny model's attention values are a larger share than the 0.5B's)."""
    model = LlavaOnevision.from_pretrained(tiny_ckpt, dtype="bfloat16")
    params, config = quantize_params(model.params, model.config, QuantConfig(mode, 64, int8_weights=()))
    assert weight_bytes(model.params["text"]) / weight_bytes(params["text"]) >= ratio
    assert weight_bytes(params["text"]) == _spec_bytes(config)
    assert params["text"]["embed"]["kernel"].dtype == (jnp.int8 if mode == "int8" else jnp.uint8)
    assert params["vision"]["layers"]["q"]["kernel"].dtype == jnp.bfloat16  # the tower stays float by default


def test_int4_packing_and_dequantization_round_trip():
    values = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    packed = _pack_int4(jnp.asarray(values), 1)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 4)
    np.testing.assert_array_equal(unpack_int4(packed, 1), values)
    np.testing.assert_array_equal(unpack_int4(_pack_int4(jnp.asarray(values.T), 0), 0), values.T)


def _plain_int4(w, axis):
    """Reference int4 without the clipping search: symmetric ``absmax / 7`` and asymmetric (16 levels over
    ``[min(w, 0), max(w, 0)]``, integer zero point), groups along ``axis``."""
    absmax = np.abs(w).max(axis=axis, keepdims=True)
    symmetric = np.clip(np.round(w / absmax * 7), -7, 7) * absmax / 7
    low, high = np.minimum(w.min(axis, keepdims=True), 0), np.maximum(w.max(axis, keepdims=True), 0)
    scale = (high - low) / 15
    zero = -8 - np.round(low / scale)
    return symmetric, (np.clip(np.round(w / scale) + zero, -8, 7) - zero) * scale


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantized_weights_error_is_bounded(tiny_ckpt, mode):
    """int8: every weight within half a step (absmax / 127 of its output channel). int4: every group's squared
    error at most that of plain min / max rounding (the clipping search only improves on it), and the total
    well below symmetric absmax / 7 rounding's."""
    model = LlavaOnevision.from_pretrained(tiny_ckpt)
    params, _ = quantize_params(model.params, model.config, QuantConfig(mode, TINY_GROUP, int8_weights=()))
    group = None if mode == "int8" else TINY_GROUP
    checked = [(model.params["text"]["embed"], params["text"]["embed"], None)]
    layer = lambda tree, n: jax.tree.map(lambda a: a[1], tree["text"]["layers"][n])  # the second layer
    checked += [(layer(model.params, n)["kernel"], layer(params, n), n_in)
                for n, n_in in (("q", 1), ("o", 2), ("down", 1))]
    for w, leaf, n_in in checked:
        w = np.asarray(w)
        if n_in is None:  # the [V, H] table: channels are rows, groups run along H
            q = np.asarray(table_of(leaf)).reshape(w.shape[0], 1 if group is None else -1, group or w.shape[1])
            w, axis = w.reshape(q.shape), 2
        else:
            q = np.asarray(kernel_of(leaf))
            n = int(np.prod(w.shape[:n_in]))
            w, q = (x.reshape((1 if group is None else n // group, -1) + w.shape[n_in:]) for x in (w, q))
            axis = 1
        assert np.abs(q - w).max() > 0
        if mode == "int8":
            assert np.all(np.abs(q - w) <= 0.5 * np.abs(w).max(axis=axis, keepdims=True) / 127 * 1.001)
        else:
            symmetric, plain = _plain_int4(w, axis)
            error = ((q - w) ** 2).sum(axis)
            assert np.all(error <= ((plain - w) ** 2).sum(axis) * 1.001 + 1e-12)
            assert error.sum() < 0.8 * ((symmetric - w) ** 2).sum(), error.sum() / ((symmetric - w) ** 2).sum()


# --- agreement with bfloat16 -----------------------------------------------------------------------------


def _prompt_set(config, rng, image=True):
    """Left-padded rows: an image (``image``; else another text row), a video, two text-only rows."""
    img, vid = config.image_token_id, config.video_token_id
    n_image = image_token_count(300, 200, config.image_grid_pinpoints)
    rows = [
        [11, 12] + [img] * n_image + list(rng.integers(30, 300, 40)) if image else list(rng.integers(30, 300, 50)),
        [19, 20] + [vid] * video_token_count(2) + list(rng.integers(30, 300, 40)),
        list(rng.integers(30, 300, 90)),
        list(rng.integers(30, 300, 25)),
    ]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    media = dict(pixel_values_videos=rng.standard_normal((1, 2, 3, 384, 384)).astype(np.float32))
    if image:
        media.update(pixel_values=rng.standard_normal((1, 5, 3, 384, 384)).astype(np.float32),
                     image_sizes=np.array([[300, 200]]), batch_num_images=np.array([1, 0, 0, 0]))
    return ids, mask, media


def _text_hidden(model, prompts) -> jax.Array:
    """``model``'s final-normed hidden states ``[N, H]`` (its dtype) at the text positions of ``prompts``."""
    return jnp.concatenate([model.hidden_states(ids, mask, **media)[text_positions(ids, mask, model.config)]
                            for ids, mask, media in prompts])


def agreement_table(config, params, prompts, modes, group):
    """Top-1 agreement and logit relative error against bfloat16 over the text positions of ``prompts``
    (``[(ids, mask, media)]``; media rows still steer them through attention), with the random head and
    with a :func:`agreement_helpers.fitted_head` fitted to the bfloat16 model's hidden states. ``modes``:
    ``"int8"`` / ``"int4"`` (at ``group``, the default int8 exceptions) / ``"int4 everywhere"`` (no int8
    exceptions) and ``"float32"`` (the same weights computed in float32: the yardstick of bfloat16's own
    rounding).

    ``config`` must be untied; ``params`` float, their ``lm_head`` the random head. Returns ``{"margin":
    {head: median top-1 gap}, mode: {head: (top1, relative error), "fitted per prompt": [top1, ...]}}``."""
    float_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    reference = LlavaOnevision(config, float_params, "bfloat16")
    hidden = _text_hidden(reference, prompts)
    targets = distinct_targets(len(hidden), config)
    random_head = np.asarray(params["text"]["lm_head"]["kernel"], np.float32)
    heads = {"random": random_head, "fitted": fitted_head(np.asarray(hidden, np.float32), targets, random_head)}
    heads = {name: jnp.asarray(kernel, jnp.bfloat16) for name, kernel in heads.items()}
    want = {name: lm_logits({"lm_head": {"kernel": kernel}}, hidden) for name, kernel in heads.items()}
    table = {"margin": {name: top1_margin(logits) for name, logits in want.items()}}
    ends = np.cumsum([text_positions(ids, mask, config).sum() for ids, mask, _ in prompts])[:-1]
    spec = param_specs(config)["text"]["lm_head"]["kernel"]
    for mode in modes:
        if mode == "float32":
            model = LlavaOnevision(config, jax.tree.map(lambda x: x.astype(jnp.float32), float_params), "float32")
            head = lambda kernel: {"kernel": kernel.astype(jnp.float32)}
        else:
            everywhere = {"int8_weights": ()} if mode == "int4 everywhere" else {}
            quant = QuantConfig(mode.split()[0], group, **everywhere)
            qparams, qconfig = quantize_params(float_params, config, quant)
            model = LlavaOnevision(qconfig, qparams, "bfloat16")
            del qparams
            head = lambda kernel: quantize_leaf("text.lm_head.kernel", kernel, spec, quant)
        got_hidden = _text_hidden(model, prompts)
        del model
        got = {name: lm_logits({"lm_head": head(kernel)}, got_hidden) for name, kernel in heads.items()}
        table[mode] = {name: agreement(want[name], got[name]) for name in heads}
        table[mode]["fitted per prompt"] = [agreement(a, b)[0] for a, b in zip(
            np.split(np.asarray(want["fitted"]), ends), np.split(np.asarray(got["fitted"]), ends))]
    return table


@pytest.fixture(scope="module")
def tiny_table(tiny_ckpt):
    model = LlavaOnevision.from_pretrained(tiny_ckpt)
    prompts = [_prompt_set(model.config, np.random.default_rng(3))]
    table = agreement_table(model.config, model.params, prompts, ("float32", "int8", "int4"), TINY_GROUP)
    print(table)
    return table


@pytest.mark.parametrize("mode, bar", [("int8", 0.98), ("int4", 0.90)])
def test_top1_agreement_with_bfloat16(tiny_table, mode, bar):
    """The issue's bars on the tiny model (image, video and text rows), held with the fitted head (a model
    with a trained model's margins); the random head's near-tied logits are reported, not held. Measured:
    int8 100% (logit relative error 0.047), int4 97.5% (0.39); random head 97.0% and 52.3%."""
    top1, rel = tiny_table[mode]["fitted"]
    assert top1 >= bar, tiny_table
    assert rel < (0.06 if mode == "int8" else 0.5), tiny_table
    assert tiny_table["margin"]["fitted"] > 4 * tiny_table["margin"]["random"], tiny_table


@pytest.mark.slow
def test_top1_agreement_on_the_0_5b_architecture():
    """Random 0.5B weights (tower included), one 384x384 image, a 2-frame video and a text prompt (48, 48 and
    96 counted positions), each its own batch; int4 at group 128. Measured (fitted head; per prompt image /
    video / text): float32 100%; int8 100%; int4 99.0% (97.9 / 97.9 / 100%); int4 everywhere (no int8
    exceptions) 90.6% (79.2 / 83.3 / 100%). After a media block random attention is near-uniform, so the
    text positions' hidden states are near-duplicates (pairwise cosine 0.993 after the image, 0.63 on the
    text prompt), and at int4 the attention values' error shifts them together: the exceptions are for
    that."""
    config = preset("0.5b")
    tied = random_params(config, seed=0, dtype=jnp.bfloat16)  # the reference's own weights (memory: 1.8 GB)
    config = config.replace(tie_word_embeddings=False, text=dataclasses.replace(config.text, tie_word_embeddings=False))
    params = dict(tied, text=dict(tied["text"], lm_head={"kernel": np.ascontiguousarray(tied["text"]["embed"].T)}))
    del tied
    rng = np.random.default_rng(5)
    img, vid = config.image_token_id, config.video_token_id
    text = lambda n: list(rng.integers(1000, 150000, n))
    rows = [([img] * image_token_count(384, 384, config.image_grid_pinpoints) + text(48),
             dict(pixel_values=rng.standard_normal((1, 2, 3, 384, 384)).astype(np.float32),
                  image_sizes=np.array([[384, 384]]))),
            ([vid] * video_token_count(2) + text(48),
             dict(pixel_values_videos=rng.standard_normal((1, 2, 3, 384, 384)).astype(np.float32))),
            (text(96), {})]
    prompts = [(np.array([row]), np.ones((1, len(row)), np.int32), media) for row, media in rows]
    table = agreement_table(config, params, prompts, ("float32", "int8", "int4", "int4 everywhere"),
                            QuantConfig("int4").group_size)
    print(f"0.5B architecture: {table}")
    assert table["float32"]["fitted"][0] >= 0.99, table
    assert min(table["int8"]["fitted per prompt"]) >= 0.98 and min(table["int4"]["fitted per prompt"]) >= 0.90, table
    assert table["int4"]["fitted"][0] > table["int4 everywhere"]["fitted"][0] + 0.04, table


# --- storage ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_orbax_round_trip_is_exact(tiny_ckpt, tmp_path, mode):
    model = LlavaOnevision.from_pretrained(tiny_ckpt, dtype="bfloat16", quantization=mode, group_size=TINY_GROUP)
    save_orbax(model.params, model.config, tmp_path / "q", files_from=tiny_ckpt)
    config, params = load_orbax(tmp_path / "q", dtype="bfloat16")
    assert config == model.config
    check_tree(params, config)
    assert_trees_equal(params, model.params)
    assert jax.tree.map(lambda x: x.dtype, params) == jax.tree.map(lambda x: x.dtype, model.params)


@pytest.mark.parametrize("mode, vision", [("int8", False), ("int4", True)])
def test_convert_quantize_writes_what_from_pretrained_quantizes(tiny_ckpt_tied, tmp_path, mode, vision):
    dst = tmp_path / "converted"
    args = [sys.executable, "-m", "ov_jax.cli", "convert", str(tiny_ckpt_tied), str(dst), "--quantize", mode,
            "--group-size", str(TINY_GROUP), "--no-progress"] + (["--quantize-vision"] if vision else [])
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = LlavaOnevision.from_pretrained(dst)  # no quantization argument: the directory says it
    direct = LlavaOnevision.from_pretrained(tiny_ckpt_tied, quantization=mode, group_size=TINY_GROUP,
                                            quantize_vision=vision)
    assert loaded.config == direct.config and loaded.config.quantization.vision == vision
    assert_trees_equal(loaded.params, direct.params)
    kind = jnp.int8 if mode == "int8" else jnp.uint8
    assert loaded.params["vision"]["layers"]["fc1"]["kernel"].dtype == (kind if vision else jnp.float32)
    with pytest.raises(ValueError, match="quantized as"):
        LlavaOnevision.from_pretrained(dst, quantization="int8" if mode == "int4" else "int4")
    with pytest.raises(ValueError, match="weights are quantized"):
        loaded.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_int4_keeps_the_attention_values_at_int8(tiny_ckpt, tmp_path):
    """int4's default int8 exceptions (v and o: per-channel int8, no zero point), int4 everywhere with
    ``int8_weights=()``, the choice stored in a converted directory, and an older directory's config (written
    before the field existed) read as int4 everywhere."""
    from ov_jax.config import LM_LINEARS, OneVisionConfig

    layers = LlavaOnevision.from_pretrained(tiny_ckpt, quantization="int4", group_size=TINY_GROUP).params["text"]["layers"]
    assert {n: layers[n]["kernel"].dtype for n in LM_LINEARS} == {
        n: jnp.int8 if n in ("v", "o") else jnp.uint8 for n in LM_LINEARS}
    assert "kernel_zero" not in layers["o"] and layers["o"]["kernel_scale"].shape[1] == 1
    pure = LlavaOnevision.from_pretrained(tiny_ckpt, quantization="int4", group_size=TINY_GROUP, int8_weights=())
    assert all(pure.params["text"]["layers"][n]["kernel"].dtype == jnp.uint8 for n in LM_LINEARS)
    assert pure.config.quantization.int8_weights == ()
    save_orbax(pure.params, pure.config, tmp_path / "pure", files_from=tiny_ckpt)
    config, params = load_orbax(tmp_path / "pure")
    assert config.quantization == pure.config.quantization
    assert_trees_equal(params, pure.params)
    # options left out load the directory as stored (quantization too); given, they must match
    for asked in ({"quantization": "int4", "group_size": TINY_GROUP}, {"quantization": "int4"}, {}):
        again = LlavaOnevision.from_pretrained(tmp_path / "pure", **asked)
        assert again.config.quantization == pure.config.quantization
    with pytest.raises(ValueError, match=r"quantized as .*int8_weights=\(\)\); asked for .*\('v', 'o'\)"):
        LlavaOnevision.from_pretrained(tmp_path / "pure", quantization="int4", group_size=TINY_GROUP,
                                       int8_weights=("o", "v"))
    with pytest.raises(ValueError, match=r"quantized as .*group_size=16.*; asked for .*group_size=32"):
        LlavaOnevision.from_pretrained(tmp_path / "pure", group_size=32)
    with pytest.raises(ValueError, match=r"group_size, int8_weights apply only with quantization='int8' or 'int4'"):
        LlavaOnevision.from_pretrained(tiny_ckpt, group_size=32, int8_weights=())
    old = pure.config.to_dict()
    del old["quantization"]["int8_weights"]
    assert OneVisionConfig.from_dict(old).quantization == QuantConfig("int4", TINY_GROUP, int8_weights=())


def test_bad_group_size_and_mode_are_clear_errors(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="group_size 48 does not divide the input size 64 of text.layers.q"):
        LlavaOnevision.from_pretrained(tiny_ckpt, quantization="int4", group_size=48)
    with pytest.raises(ValueError, match="positive even integer"):
        QuantConfig("int4", 7)
    # int8_weights: any collection of names, kept in LM_LINEARS order (the config is compared and hashed)
    for names in ({"o", "v"}, ["o", "v", "v"], (n for n in "ov")):
        quant = QuantConfig("int4", int8_weights=names)
        assert quant == QuantConfig("int4") and hash(quant) == hash(QuantConfig("int4"))
    with pytest.raises(ValueError, match="vision must be True or False, got 'no'"):
        QuantConfig("int4", vision="no")  # a non-empty string would have quantized the tower
    with pytest.raises(ValueError, match="quantization must be one of"):
        LlavaOnevision.from_pretrained(tiny_ckpt, quantization="int3")
    for names in (("v", "lm_head"), "v", "none"):
        with pytest.raises(ValueError, match="int8_weights must be names among"):
            LlavaOnevision.from_pretrained(tiny_ckpt, quantization="int4", int8_weights=names)
    result = subprocess.run([sys.executable, "-m", "ov_jax.cli", "convert", str(tiny_ckpt), str(tmp_path / "y"),
                             "--quantize", "int4", "--int8-weights", "v,x", "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: int8_weights must be names among")
    assert not (tmp_path / "y").exists()
    result = subprocess.run([sys.executable, "-m", "ov_jax.cli", "convert", str(tiny_ckpt), str(tmp_path / "z"),
                             "--int8-weights", "none", "--quantize-vision", "--no-progress"],
                            capture_output=True, text=True)  # quantization's options without --quantize
    assert result.returncode == 2 and result.stderr == (
        "error: --int8-weights and --quantize-vision apply only with --quantize int8|int4\n")
    assert not (tmp_path / "z").exists()
    result = subprocess.run([sys.executable, "-m", "ov_jax.cli", "convert", str(tiny_ckpt), str(tmp_path / "x"),
                             "--quantize", "int4", "--group-size", "48", "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: int4 group_size 48 does not divide") and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


# --- engine and sharding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_serving_copies_stay_quantized_and_match_the_forward(tiny_ckpt_tied, mode):
    from ov_jax.engine import Buckets, Engine

    model = LlavaOnevision.from_pretrained(tiny_ckpt_tied, quantization=mode, group_size=TINY_GROUP)
    ids = np.random.default_rng(1).integers(30, 300, (2, 20))
    engine = Engine(model.config, model.params, model.dtype, Buckets(batch=(2,), prompt=(32,), cache=(64,)))
    kind = jnp.int8 if mode == "int8" else jnp.uint8
    assert engine._layers[0]["gate_up"]["weight"]["kernel"].dtype == kind
    qkv = engine._layers[0]["qkv"]["weight"]  # int4: q and k fused, the int8 v beside them
    assert ([m["kernel"].dtype for m in qkv] == [jnp.uint8, jnp.int8] if mode == "int4"
            else qkv["kernel"].dtype == jnp.int8)
    assert engine._decode_params["text"]["lm_head_t"]["kernel"].dtype == kind  # the tied embedding itself
    tokens = engine.generate(ids, max_new_tokens=6, stop_token_ids=[])
    # teacher-forced: the forward over prompt + generated tokens predicts each generated token greedily
    logits = model(np.concatenate([ids, tokens[:, :-1]], axis=1)).logits[:, ids.shape[1] - 1:]
    np.testing.assert_array_equal(np.asarray(logits.argmax(-1)), tokens)


def test_lora_on_int4_weights_takes_the_float_weights_shapes(tiny_ckpt_tied):
    """int4 kernels and tables pack two values per byte; their adapters are shaped as the float weights' (as
    on the unquantized model), and the engine's serving copies (adapter folded into the dequantized weight)
    give the forward's (adapter applied beside the weight) greedy tokens."""
    from ov_jax.engine import Buckets, Engine
    from ov_jax.nn.lora import LM_LINEARS, add_lora

    model = LlavaOnevision.from_pretrained(tiny_ckpt_tied, quantization="int4", group_size=TINY_GROUP)
    params, spec = add_lora(model.params, model.config, rank=4, alpha=8, targets=rf"text\.embed|{LM_LINEARS}")
    float_model = LlavaOnevision.from_pretrained(tiny_ckpt_tied)
    float_layers = add_lora(float_model.params, float_model.config, rank=4, alpha=8)[0]["text"]["layers"]
    shapes = lambda layers: {n: (layers[n]["lora_a"].shape, layers[n]["lora_b"].shape) for n in layers if n[-4:] != "norm"}
    assert shapes(params["text"]["layers"]) == shapes(float_layers)
    text = model.config.text
    assert params["text"]["embed"]["lora_a"].shape == (text.vocab_size, 4)
    assert params["text"]["embed"]["lora_b"].shape == (4, text.hidden_size)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(  # adapters as after training: lora_b non-zero
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape) if "lora_b" in jax.tree_util.keystr(p) else x, params)
    adapted = LlavaOnevision(model.config, params, model.dtype, lora=spec)
    ids = rng.integers(30, 300, (2, 20))
    assert np.abs(np.asarray(adapted(ids).logits) - np.asarray(model(ids).logits)).max() > 0.1
    engine = Engine(model.config, params, model.dtype, Buckets(batch=(2,), prompt=(32,), cache=(64,)),
                    layout="unrolled")
    tokens = engine.generate(ids, max_new_tokens=6, stop_token_ids=[])
    logits = adapted(np.concatenate([ids, tokens[:, :-1]], axis=1)).logits[:, ids.shape[1] - 1:]
    np.testing.assert_array_equal(np.asarray(logits.argmax(-1)), tokens)


@pytest.mark.parametrize("mode, layout", [("int4", "unrolled"),
                                          pytest.param("int8", "scanned", marks=pytest.mark.slow)])
def test_sharded_quantized_generation_equals_unsharded(tiny_ckpt, mode, layout):
    from ov_jax.engine import Buckets, engine_for

    assert len(jax.devices()) == 8
    model = LlavaOnevision.from_pretrained(tiny_ckpt, quantization=mode, group_size=TINY_GROUP)
    ids, mask, media = _prompt_set(model.config, np.random.default_rng(2), image=False)
    buckets = Buckets(batch=(4,), prompt=(512,), cache=(528,), tower_chunk=2)
    want = engine_for(model, buckets, layout=layout).generate(ids, mask, **media, max_new_tokens=12,
                                                               stop_token_ids=[])
    assert len(np.unique(want)) > 4
    sharded = LlavaOnevision.from_pretrained(tiny_ckpt, mesh="data=2,tensor=4", quantization=mode,
                                             group_size=TINY_GROUP)
    scale = sharded.params["text"]["layers"]["gate"]["kernel_scale"]
    assert scale.sharding.spec[-1] == "tensor"  # the scales shard with their output axis (mlp)
    got = engine_for(sharded, buckets, layout=layout).generate(ids, mask, **media, max_new_tokens=12,
                                                                stop_token_ids=[])
    np.testing.assert_array_equal(got, want)


# --- benchmark -------------------------------------------------------------------------------------------


def test_quantization_benchmark_dry_run(tmp_path):
    """benchmarks/bench_quant.py on its tiny preset (the real run is the 0.5B architecture): one quantized
    ov_jax format and torch's int8 path, the table printed and the JSON written."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "quant.json"
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_quant.py"), "--preset", "tiny",
                             "--formats", "ov_jax int4,transformers int8 (torch dynamic)", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"ov_jax int4", "transformers int8 (torch dynamic)"}
    assert all("decode_tok_s_b8" in run and run["peak_rss_gb"] > 0 for run in runs.values()), runs
    assert "| ov_jax int4 |" in result.stdout and "avx512f" in result.stdout
