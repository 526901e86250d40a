"""Shared pieces of the training tests: mixed media batches, and gradients of torch and ours in torch's layout."""

import numpy as np

from ov_jax.geometry import image_tile_count, image_token_count, video_token_count
from ov_jax.loading import canonical_key

IMAGE_SIZE = (100, 200)  # anyres: 2 tiles, 1093 tokens (unpadded grid + newlines)
MULTI_SIZES = ((300, 500), (800, 200))


def mixed_batch(config, rng, *, padding: str = "left", rows=("image", "multi", "video", "text")):
    """Processor-like inputs (numpy) and labels: an anyres image, a two-image sample, a 2-frame video and
    text, padded on ``padding``; labels are random tokens on text positions, -100 on media, padding and
    each row's first token."""
    img, vid = config.image_token_id, config.video_token_id
    pins = config.image_grid_pinpoints
    body = {
        "image": [11, 12] + [img] * image_token_count(*IMAGE_SIZE, pins) + [13, 14, 15],
        "multi": [16] + [img] * 730 + [17] + [img] * 730 + [18],
        "video": [19, 20] + [vid] * video_token_count(2) + [21],
        "text": [22, 23, 24, 25, 26, 27, 28],
    }
    seqs = [body[r] for r in rows]
    width = max(map(len, seqs))
    pad = lambda r, fill: ([fill] * (width - len(r)) + r) if padding == "left" else (r + [fill] * (width - len(r)))
    ids = np.array([pad(r, 0) for r in seqs])
    mask = np.array([pad([1] * len(r), 0) for r in seqs])
    labels = rng.integers(0, config.text.vocab_size, ids.shape)
    labels[(ids == img) | (ids == vid) | (mask == 0)] = -100
    # a row's first token would be predicted from a padding position, whose output is implementation-defined
    # (transformers' SDPA gives fully masked rows a zero attention output): masked, as chat data always has it
    labels[np.arange(len(ids)), mask.argmax(1)] = -100
    inputs = dict(input_ids=ids, attention_mask=mask)
    sizes = ([IMAGE_SIZE] if "image" in rows else []) + (list(MULTI_SIZES) if "multi" in rows else [])
    if sizes:
        multi = [False] * ("image" in rows) + [True, True] * ("multi" in rows)
        tiles = max(image_tile_count(h, w, pins, multi_image=m) for (h, w), m in zip(sizes, multi))
        inputs["pixel_values"] = rng.standard_normal((len(sizes), tiles, 3, 384, 384)).astype(np.float32)
        inputs["image_sizes"] = np.array(sizes)
        inputs["batch_num_images"] = np.array([{"image": 1, "multi": 2}.get(r, 0) for r in rows])
    if "video" in rows:
        inputs["pixel_values_videos"] = rng.standard_normal((rows.count("video"), 2, 3, 384, 384)).astype(np.float32)
    return inputs, labels


def torch_loss_and_grads(ref, inputs, labels) -> tuple[float, dict]:
    """transformers' loss and gradients (``.backward()``), keyed by canonical checkpoint name
    (`ov_jax.loading.canonical_key`; an unused parameter's gradient is zeros)."""
    import torch

    ref.zero_grad(set_to_none=True)
    out = ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, labels=torch.from_numpy(labels))
    out.loss.backward()
    grads = {canonical_key(n)[0]: np.zeros(tuple(p.shape)) if p.grad is None else p.grad.double().numpy()
             for n, p in ref.named_parameters()}
    return float(out.loss.detach()), grads


def in_torch_layout(config, tree) -> dict:
    """A params-shaped tree (e.g. our gradients) as torch-layout arrays keyed by canonical checkpoint name,
    through `ov_jax.export.hf_state_dict` (the loading key table run backwards)."""
    from ov_jax.export import hf_state_dict

    return {canonical_key(k)[0]: np.asarray(v, np.float64) for k, v in hf_state_dict(config, tree).items()}


def norm_relative(ours, theirs) -> float:
    """``|ours - theirs| / |theirs|`` in the Frobenius norm (``|ours|`` itself when ``theirs`` is all zero)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.linalg.norm(theirs)
    diff = np.linalg.norm(ours - theirs)
    return float(diff / scale) if scale > 0 else float(diff)
