"""Placeholder counts: ours (ov_jax.geometry through the processor) == transformers' processor counting.

The reference is ``LlavaOnevisionProcessor._get_number_of_features`` (what ``replace_image_token`` uses for
single-image samples) and ``_get_num_multimodal_tokens`` (videos), called on the reference processor loaded
from the same tiny checkpoint. Sizes: a seeded sweep of 12,000 random sizes (log-uniform up to 10,000 and
uniform up to 2,400), the extremes, every pinpoint ±1 on each side, and every aspect-ratio boundary.
"""

import itertools
import math

import numpy as np
import pytest

from ov_jax import geometry
from ov_jax.compare import reference_processor
from ov_jax.processing import LlavaOnevisionProcessor


@pytest.fixture(scope="module")
def processors(tiny_ckpt):
    return LlavaOnevisionProcessor.from_pretrained(tiny_ckpt), reference_processor(tiny_ckpt)


def reference_count(reference, height, width):
    return reference._get_number_of_features(height, width, 384, 384)


def sweep_sizes(pinpoints):
    rng = np.random.default_rng(20240607)
    log_uniform = np.exp(rng.uniform(0, math.log(10_000), size=(8_000, 2))).astype(int)
    uniform = rng.integers(1, 2_400, size=(4_000, 2))
    sizes = {tuple(int(v) for v in s) for s in np.concatenate([log_uniform, uniform])}
    sizes |= {(1, 1), (1, 10_000), (10_000, 1), (10_000, 10_000), (2, 1), (1, 2), (384, 384), (383, 385)}
    for (h, w), dh, dw in itertools.product(pinpoints, (-1, 0, 1), (-1, 0, 1)):
        sizes.add((h + dh, w + dw))
    for (h, w), scale in itertools.product(pinpoints, (1, 2, 3, 7)):  # exact aspect ratios of each canvas
        sizes |= {(h * scale // 7 or 1, w * scale // 7 or 1), (h // scale, w // scale)}
    return sorted(sizes)


def test_image_token_count_matches_reference_on_10k_sizes(processors):
    ours, reference = processors
    sizes = sweep_sizes(ours.image_config.pinpoints)
    assert len(sizes) >= 10_000
    mismatches = [(h, w, ours.image_token_count(h, w), reference_count(reference, h, w))
                  for h, w in sizes if ours.image_token_count(h, w) != reference_count(reference, h, w)]
    assert mismatches == []
    counts = [ours.image_token_count(h, w) for h, w in sizes]
    # The sweep reaches both the uncapped maximum region and thin images with very few grid rows.
    assert max(counts) > 8_000 and min(counts) < 800


@pytest.mark.parametrize("height,width,expected", [
    (300, 500, 1998), (500, 300, 2017), (1000, 200, 2187), (200, 1000, 2123), (384, 384, 1485),
    (2000, 3000, 7329), (3000, 2000, 7362), (899, 1024, 6551), (1024, 899, 6561), (480, 640, 2929),
    (1080, 1920, 7269), (224, 224, 1485), (3000, 4000, 7309), (2304, 2304, 7371), (800, 800, 7371),
    (100, 10_000, 892), (7, 500, 784), (1, 1, 1485),
])
def test_known_counts_from_reference_notes(processors, height, width, expected):
    ours, reference = processors
    assert ours.image_token_count(height, width) == reference_count(reference, height, width) == expected


def test_multi_image_and_video_counts(processors):
    ours, reference = processors
    assert ours.image_token_count(899, 1024, multi_image=True) == reference.num_image_tokens + 1 == 730
    frames = [1, 2, 8, 16, 32]
    expected = reference._get_num_multimodal_tokens(video_sizes=[(f, 384, 384) for f in frames])["num_video_tokens"]
    assert [ours.video_token_count(f) for f in frames] == expected == [197, 393, 1569, 3137, 6273]


def test_processor_count_is_the_shared_geometry_function(processors):
    ours, _ = processors
    pins = ours.image_config.pinpoints
    for height, width in [(1, 10_000), (899, 1024), (37, 41)]:
        assert ours.image_token_count(height, width) == geometry.anyres_layout(height, width, pins).num_tokens


def test_custom_pinpoints_and_cap(processors, tmp_path):
    """A checkpoint with other pinpoints / anyres_max: both sides read them from the config files."""
    from ov_jax.tiny import make_tiny

    pins = [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    path = make_tiny(tmp_path / "ckpt", image_grid_pinpoints=pins, vision_aspect_ratio="anyres_max_4")
    ours, reference = LlavaOnevisionProcessor.from_pretrained(path), reference_processor(path)
    assert ours.max_tiles_cap == 4
    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in s) for s in np.exp(rng.uniform(0, math.log(4000), size=(2_000, 2))).astype(int)]
    assert all(ours.image_token_count(h, w) == reference_count(reference, h, w) for h, w in sizes)
