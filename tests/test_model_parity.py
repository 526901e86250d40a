"""Per-stage float32 parity with transformers' LlavaOnevisionForConditionalGeneration on tiny checkpoints.

Each stage (vision hidden state, projector, packed image features, multi-image, video features,
merged embeddings, logits) must agree to <= 1e-4 max abs. Inputs are random pixel tensors, so the
model is tested independently of the processor.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from ov_jax.geometry import image_tile_count, image_token_count, video_token_count  # noqa: E402
from ov_jax.media_plan import MediaMismatchError, build_media_plan  # noqa: E402
from ov_jax.model import LlavaOnevision  # noqa: E402
from ov_jax.modeling import llava, siglip  # noqa: E402
from ov_jax.tiny import make_tiny  # noqa: E402

TOL = 1e-4
# wide, tall, tiny, thin, over the cap, exact pinpoints, near-square, extreme aspect
IMAGE_SIZES = [(300, 500), (500, 300), (1, 1), (13, 900), (2000, 3000), (3000, 2000), (384, 384), (384, 768),
               (768, 1152), (899, 1024), (100, 10000), (10000, 100), (1173, 960)]


def _load_pair(path):
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return ref, LlavaOnevision.from_pretrained(path)


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    return _load_pair(tiny_ckpt)


def _max_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _image_inputs(model, sizes, rng, multi=False):
    cfg = model.config
    tiles = [image_tile_count(h, w, cfg.image_grid_pinpoints, multi_image=multi) for h, w in sizes]
    pv = rng.standard_normal((len(sizes), max(tiles), 3, 384, 384)).astype(np.float32)
    return pv, np.array(sizes, np.int64)


def _ours_packed(model, input_ids, **media):
    """Our packed media rows in sequence order (what the model scatters into the embeddings)."""
    plan = build_media_plan(input_ids, model.config, **media)
    projected = llava.media_features(model.params, jnp.asarray(plan.tower_inputs), model.config, jnp.float32)
    rows = llava.gather_media(model.params, projected, plan.tap_index, plan.tap_weight)
    return np.asarray(rows)[plan.is_media]


def test_vision_tower_and_projector(pair):
    ref, ours = pair
    pixels = np.random.default_rng(0).standard_normal((3, 3, 384, 384)).astype(np.float32)
    with torch.no_grad():
        out = ref.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True)
        hf_hidden = out.hidden_states[ref.config.vision_feature_layer]
        hf_proj = ref.model.multi_modal_projector(hf_hidden)
    hidden = siglip.vision_features(ours.params["vision"], jnp.asarray(pixels), ours.config)
    assert _max_diff(hidden, hf_hidden) <= TOL
    assert _max_diff(llava.project(ours.params["projector"], hidden), hf_proj) <= TOL
    # the unused post-layernorm really is unused: its output differs from the feature we take
    assert _max_diff(out.last_hidden_state, hf_hidden) > 1e-2


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_packed_image_features(pair, size):
    ref, ours = pair
    pv, sizes = _image_inputs(ours, [size], np.random.default_rng(1))
    n = image_token_count(*size, ours.config.image_grid_pinpoints)
    ids = np.full((1, n), ours.config.image_token_id)
    with torch.no_grad():
        hf = ref.model.get_image_features(torch.from_numpy(pv), torch.from_numpy(sizes),
                                          vision_feature_layer=ref.config.vision_feature_layer,
                                          vision_feature_select_strategy="full",
                                          vision_aspect_ratio=ref.config.vision_aspect_ratio).pooler_output
    hf = torch.cat(list(hf)).numpy()
    assert hf.shape[0] == n  # our token count == transformers' packing
    assert _max_diff(_ours_packed(ours, ids, pixel_values=pv, image_sizes=sizes), hf) <= TOL


def test_multi_image_features(pair):
    ref, ours = pair
    pv, sizes = _image_inputs(ours, [(300, 500), (800, 200), (64, 64)], np.random.default_rng(2), multi=True)
    ids = np.full((1, 3 * 730), ours.config.image_token_id)
    with torch.no_grad():
        hf = ref.model.get_image_features(torch.from_numpy(pv), torch.from_numpy(sizes),
                                          vision_feature_layer=ref.config.vision_feature_layer,
                                          vision_feature_select_strategy="full",
                                          batch_num_images=torch.tensor([3])).pooler_output
    hf = torch.cat(list(hf)).numpy()
    got = _ours_packed(ours, ids, pixel_values=pv, image_sizes=sizes, batch_num_images=np.array([3]))
    assert _max_diff(got, hf) <= TOL


def test_video_features(pair):
    ref, ours = pair
    videos = np.random.default_rng(3).standard_normal((2, 3, 3, 384, 384)).astype(np.float32)
    ids = np.full((1, 2 * video_token_count(3)), ours.config.video_token_id)
    with torch.no_grad():
        hf = ref.model.get_video_features(torch.from_numpy(videos),
                                          vision_feature_layer=ref.config.vision_feature_layer,
                                          vision_feature_select_strategy="full").pooler_output
    hf = hf.reshape(-1, hf.shape[-1]).numpy()
    assert _max_diff(_ours_packed(ours, ids, pixel_values_videos=videos), hf) <= TOL


def _mixed_batch(config, rng, image_size=(500, 300)):
    """Left-padded rows: anyres image, multi-image pair, video, text only."""
    img, vid = config.image_token_id, config.video_token_id
    n1 = image_token_count(*image_size, config.image_grid_pinpoints)
    rows = [
        [11, 12] + [img] * n1 + [13, 14, 15],
        [16] + [img] * 730 + [17] + [img] * 730 + [18],
        [19, 20] + [vid] * video_token_count(2) + [21],
        [22, 23, 24, 25, 26, 27],
    ]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pv = np.zeros((3, 10, 3, 384, 384), np.float32)
    pv[:, :] = rng.standard_normal((3, 10, 3, 384, 384))
    media = dict(pixel_values=pv, image_sizes=np.array([list(image_size), [300, 500], [800, 200]]),
                 batch_num_images=np.array([1, 2, 0, 0]),
                 pixel_values_videos=rng.standard_normal((1, 2, 3, 384, 384)).astype(np.float32))
    return ids, mask, media


def assert_logits_match_reference(ref, inputs, ours_logits, valid=None):
    """Logits parity that stays meaningful over thousands of tokens.

    Two float32 implementations differ by their rounding noise, which on this deliberately sharp tiny model
    reaches ~1e-4 at a few thousand tokens for transformers' own float32 run too. So the reference is
    transformers in float64: ours must be within 1e-4 of it or within 2x of transformers' own float32
    error, whichever is larger (the latter only matters for prompts of 2.5k+ tokens here, where
    transformers' float32 run is itself ~1e-4 off). Greedy tokens must agree with transformers' float32 run.
    """
    ref64 = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        ref.config._name_or_path, dtype=torch.float64).eval()
    with torch.no_grad():
        hf32 = ref(**inputs).logits.numpy()
        hf64 = ref64(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).logits.numpy()
    ours = np.asarray(ours_logits)
    if valid is not None:
        ours, hf32, hf64 = ours[valid], hf32[valid], hf64[valid]
    ours_err, ref_err = _max_diff(ours, hf64), _max_diff(hf32, hf64)
    assert ours_err <= max(TOL, 2 * ref_err), (ours_err, ref_err)
    assert (ours.argmax(-1) == hf32.argmax(-1)).mean() >= 0.999


@pytest.mark.parametrize("image_size", [(500, 300), (899, 1024)], ids=["2k-tokens", "6.5k-tokens"])
def test_merged_embeddings_and_logits_mixed_batch(pair, image_size):
    """Left-padded image / multi-image / video / text rows, compared at every non-padded position."""
    ref, ours = pair
    ids, mask, media = _mixed_batch(ours.config, np.random.default_rng(4), image_size)
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  **{k: torch.from_numpy(v) for k, v in media.items()})
    captured = {}
    hook = ref.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            ref(**inputs)
    finally:
        hook.remove()
    plan = build_media_plan(ids, ours.config, **media)
    embeds = llava.merged_embeddings(ours.params, jnp.asarray(ids), jnp.asarray(plan.tower_inputs), plan.tap_index,
                                     plan.tap_weight, plan.is_media, ours.config, jnp.float32)
    valid = mask.astype(bool)
    assert _max_diff(np.asarray(embeds)[valid], captured["embeds"].numpy()[valid]) <= TOL
    assert_logits_match_reference(ref, inputs, ours(ids, mask, **media).logits, valid)


@pytest.mark.parametrize("variant", [
    dict(tie_word_embeddings=True),
    dict(vision_feature_layer=-2),
    dict(vision_aspect_ratio="anyres_max_4"),
    dict(image_grid_pinpoints=[[384, 384], [384, 1152], [768, 768], [1152, 384], [1152, 1152]]),
], ids=["tied", "layer-2", "anyres_max_4", "custom_pinpoints"])
def test_variants_logits(tmp_path, variant):
    ref, ours = _load_pair(make_tiny(tmp_path / "ckpt", **variant))
    if variant.get("tie_word_embeddings"):
        assert "lm_head" not in ours.params["text"]
    rng = np.random.default_rng(5)
    for size in [(600, 900), (384, 1152)]:  # (600, 900) is capped under anyres_max_4
        pv, sizes = _image_inputs(ours, [size], rng)
        n = image_token_count(*size, ours.config.image_grid_pinpoints, max_n=ours.config.anyres_max)
        ids = np.array([[11, 12] + [ours.config.image_token_id] * n + [13]])
        inputs = dict(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pv),
                      image_sizes=torch.from_numpy(sizes))
        assert_logits_match_reference(ref, inputs, ours(ids, pixel_values=pv, image_sizes=sizes).logits)


def test_loss_matches_transformers(pair):
    ref, ours = pair
    ids = np.array([[11, 12, 13, 14, 15, 16]])
    labels = np.array([[-100, -100, 13, 14, 15, 16]])
    with torch.no_grad():
        hf = ref(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.item()
    assert abs(float(ours(ids, labels=labels).loss) - hf) <= 1e-5


def test_bfloat16_top1_agreement(tiny_ckpt, pair):
    """bfloat16 greedy tokens vs our float32 ones, measured against what transformers' own bfloat16 run
    achieves on the same inputs. The tiny checkpoint is deliberately sharp (large q/k gains, 64-wide
    hidden), so bf16 rounding flips ~4% of its top-1 tokens in transformers too (measured: ours 95.7%,
    transformers 95.8%); here ours must be no worse than the reference (-0.5%). The >= 99% criterion is
    checked on a confident model in the next test."""
    ref, ours32 = pair
    ours16 = LlavaOnevision.from_pretrained(tiny_ckpt, dtype="bfloat16")
    ids, mask, media = _mixed_batch(ours32.config, np.random.default_rng(6))
    valid = mask.astype(bool)
    top32 = np.asarray(ours32(ids, mask, **media).logits)[valid].argmax(-1)
    top16 = np.asarray(ours16(ids, mask, **media).logits)[valid].argmax(-1)
    ref16 = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.bfloat16).eval()
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  **{k: torch.from_numpy(v).bfloat16() if v.dtype == np.float32 else torch.from_numpy(v)
                     for k, v in media.items()})
    with torch.no_grad():
        hf16 = ref16(**inputs).logits.float().numpy()[valid].argmax(-1)
    ours_agreement, ref_agreement = (top16 == top32).mean(), (hf16 == top32).mean()
    assert ours_agreement >= ref_agreement - 0.005, (ours_agreement, ref_agreement)
    assert ours_agreement >= 0.9


def test_bfloat16_top1_agreement_on_a_confident_model(tiny_ckpt):
    """The issue's >= 99% criterion, on a model whose predictions have the margins of a trained one.

    A random checkpoint's logits are near-Gaussian, so a few % of positions have top-2 gaps below bf16's
    rounding noise for any implementation (transformers' bf16 included, see above). Trained models are
    confident; so here the tiny model's lm_head is trained (`agreement_helpers.trained_head`: cross-entropy,
    adam) to its own float32 top-1 tokens on the mixed image / multi-image / video / text batch until the
    margins are wide, and bf16 must then agree with float32 on >= 99% of all valid positions (measured
    99.7%; the closed-form least-squares `fitted_head` reaches 96.6% here: these labels are shared by hundreds of image
    positions each). Not a weak bar: scores cast to bf16 before the softmax drop it to 52%.
    """
    from agreement_helpers import trained_head

    base = LlavaOnevision.from_pretrained(tiny_ckpt)
    config, params = base.config, base.params
    assert "lm_head" in params["text"], "the tiny_ckpt fixture is untied"
    ids, mask, media = _mixed_batch(config, np.random.default_rng(9))
    valid = mask.astype(bool)
    hidden = np.asarray(base.hidden_states(ids, mask, **media))[valid]
    targets = np.asarray(base(ids, mask, **media).logits)[valid].argmax(-1)
    head = {"kernel": trained_head(hidden, targets, params["text"]["lm_head"]["kernel"])}
    tuned = dict(params, text=dict(params["text"], lm_head=head))
    top32 = np.asarray(LlavaOnevision.from_params(config, tuned)(ids, mask, **media).logits)[valid].argmax(-1)
    top16 = np.asarray(LlavaOnevision.from_params(config, tuned, "bfloat16")(ids, mask, **media).logits)[valid]
    agreement = (top16.argmax(-1) == top32).mean()
    assert agreement >= 0.99, agreement


def test_placeholder_mismatch_is_a_clear_error(pair):
    _, ours = pair
    pv, sizes = _image_inputs(ours, [(300, 500)], np.random.default_rng(7))
    ids = np.array([[11] + [ours.config.image_token_id] * 10 + [12]])
    with pytest.raises(MediaMismatchError, match="10 <image> tokens but the images given produce 1998"):
        ours(ids, pixel_values=pv, image_sizes=sizes)
