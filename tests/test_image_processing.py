"""Image preprocessing: ``pixel_values`` / ``image_sizes`` / ``batch_num_images`` bit-identical to transformers'
PIL-backend ``LlavaOnevisionImageProcessorPil`` (built from the same checkpoint config), plus input errors."""

import io

import numpy as np
import pytest
from PIL import Image

from ov_jax import geometry
from ov_jax.compare import reference_processor
from ov_jax.processing import LlavaOnevisionProcessor
from ov_jax.processing.image import ImageProcessingConfig, load_image, preprocess_images


@pytest.fixture(scope="module")
def processors(tiny_ckpt):
    return LlavaOnevisionProcessor.from_pretrained(tiny_ckpt), reference_processor(tiny_ckpt)


def pattern(height, width, channels=3, seed=0):
    """Smooth gradients plus noise: exercises both the interpolation weights and the clamping."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256] +
                    [(x * 7 + y * 3) % 256] * (channels - 3), axis=-1)
    noisy = base + rng.integers(-40, 41, size=base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def palette_with_transparency():
    image = Image.fromarray(pattern(90, 130)).quantize(colors=16)
    image.info["transparency"] = 3
    return image


def rgb_with_transparency_key():
    image = Image.fromarray(pattern(60, 61))
    image.info["transparency"] = (0, 0, 0)
    return image


SINGLE_IMAGES = {
    "rgb_300x500": lambda: Image.fromarray(pattern(300, 500)),
    "rgb_899x1024_hf_test_size": lambda: Image.fromarray(pattern(899, 1024)),
    "rgb_1x1": lambda: Image.fromarray(pattern(1, 1)),
    "rgb_1x10000_thin": lambda: Image.fromarray(pattern(1, 10_000)),
    "rgb_10000x1_thin": lambda: Image.fromarray(pattern(10_000, 1)),
    "rgb_3000x4000_over_cap": lambda: Image.fromarray(pattern(3000, 4000)),
    "rgb_384x384_pinpoint": lambda: Image.fromarray(pattern(384, 384)),
    "rgb_769x383_pinpoint_plus_minus_1": lambda: Image.fromarray(pattern(769, 383)),
    "rgb_2305x2303_largest_pinpoint_plus_minus_1": lambda: Image.fromarray(pattern(2305, 2303)),
    "rgba_alpha_on_white": lambda: Image.fromarray(pattern(123, 457, channels=4), "RGBA"),
    "la_alpha_on_white": lambda: Image.fromarray(pattern(200, 100, channels=4)[..., [0, 3]], "LA"),
    "l_grayscale": lambda: Image.fromarray(pattern(333, 222)[..., 0], "L"),
    "p_with_transparency": palette_with_transparency,
    "p_without_transparency": lambda: Image.fromarray(pattern(140, 90)).quantize(colors=32),
    "rgb_with_transparency_key": rgb_with_transparency_key,
    "cmyk": lambda: Image.fromarray(pattern(77, 99, channels=4), "CMYK"),
    "i16_mode": lambda: Image.fromarray(pattern(50, 70)[..., 0].astype(np.uint16) * 200),
    "numpy_hwc": lambda: pattern(250, 180),
    "numpy_chw": lambda: np.ascontiguousarray(pattern(250, 180).transpose(2, 0, 1)),
    "numpy_hwc_rgba": lambda: pattern(64, 640, channels=4),
}


def assert_same(ours, reference_output):
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        expected = np.asarray(reference_output[key])
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        assert np.array_equal(ours[key], expected), key


@pytest.mark.parametrize("name", sorted(SINGLE_IMAGES))
def test_single_image_pixel_values_identical(processors, name):
    ours, reference = processors
    image = SINGLE_IMAGES[name]()
    expected = reference.image_processor(image, return_tensors="np")
    got = ours.preprocess_images(image)
    assert_same(got, expected)
    height, width = got["image_sizes"][0]
    assert got["pixel_values"].shape[1] == geometry.image_tile_count(height, width, ours.image_config.pinpoints)


@pytest.mark.parametrize("layout", ["nested_multi_image", "flat_list_anyres", "mixed_batch", "batch_with_empty_sample"])
def test_batches_identical(processors, layout):
    ours, reference = processors
    wide, tall, square = (Image.fromarray(pattern(*size, seed=i)) for i, size in enumerate([(90, 400), (500, 70), (64, 64)]))
    thin = Image.fromarray(pattern(3, 900))
    images = {
        "nested_multi_image": [[wide, tall, square, thin]],
        "flat_list_anyres": [wide, tall, square],
        "mixed_batch": [[wide], [tall, square]],
        "batch_with_empty_sample": [[wide, thin], [], [square]],
    }[layout]
    got = ours.preprocess_images(images)
    assert_same(got, reference.image_processor(images, return_tensors="np"))
    if layout == "nested_multi_image":
        assert got["pixel_values"].shape[:2] == (4, 1)  # one padded square per image
    if layout == "flat_list_anyres":
        assert list(got["batch_num_images"]) == [1, 1, 1]
        tiles = [geometry.image_tile_count(h, w, ours.image_config.pinpoints) for h, w in got["image_sizes"]]
        for index, count in enumerate(tiles):  # padding tiles are zeros after normalization
            assert not np.any(got["pixel_values"][index, count:])
            assert np.all(got["pixel_values"][index, :count].min(axis=(1, 2, 3)) < 0)


def test_multi_image_pad_colour_comes_from_the_config_mean():
    config = ImageProcessingConfig(image_mean=(0.2, 0.5, 0.9), image_std=(0.5, 0.5, 0.5))
    assert config.pad_color == (51, 127, 229)
    wide = pattern(10, 384)
    values = preprocess_images([[wide, wide]], config)["pixel_values"]
    corner = values[0, 0, :, 0, 0] * 0.5 + np.asarray(config.image_mean, dtype=np.float32)
    np.testing.assert_allclose(corner * 255, config.pad_color, atol=1e-3)


def test_images_from_files_match_reference_loading(processors, tmp_path):
    """Paths go through load_image as in transformers: EXIF transpose, then convert("RGB") (alpha dropped)."""
    ours, reference = processors
    rgba_path = tmp_path / "alpha.png"
    Image.fromarray(pattern(120, 200, channels=4), "RGBA").save(rgba_path)
    exif_path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(pattern(100, 300)).save(exif_path, exif=exif, quality=95)
    for path in (rgba_path, exif_path):
        assert_same(ours.preprocess_images(str(path)), reference.image_processor(str(path), return_tensors="np"))
    assert tuple(ours.preprocess_images(exif_path)["image_sizes"][0]) == (300, 100)  # pathlib.Path also accepted
    # A PIL RGBA image is composited on white instead, so the two inputs really differ.
    direct = ours.preprocess_images(Image.open(rgba_path))["pixel_values"]
    assert not np.array_equal(direct, ours.preprocess_images(str(rgba_path))["pixel_values"])


def test_base64_and_data_uri_sources(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(pattern(20, 30)).save(buffer, format="PNG")
    encoded = __import__("base64").b64encode(buffer.getvalue()).decode()
    for source in (encoded, "data:image/png;base64," + encoded):
        assert np.array_equal(np.asarray(load_image(source)), pattern(20, 30))


def test_input_errors(tmp_path):
    config = ImageProcessingConfig()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess_images(str(tmp_path / "missing.png"), config)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        preprocess_images(str(broken), config)
    with pytest.raises(TypeError, match="unsupported image type dict"):
        preprocess_images({"not": "an image"}, config)
    with pytest.raises(ValueError, match=r"integer pixel values in \[0, 255\]"):
        preprocess_images(np.random.default_rng(0).random((20, 20, 3)), config)
    with pytest.raises(ValueError, match="4-D array is ambiguous"):
        preprocess_images(np.zeros((2, 20, 20, 3), np.uint8), config)
    with pytest.raises(ValueError, match="not a mix"):
        preprocess_images([[pattern(5, 5)], pattern(5, 5)], config)
    with pytest.raises(ValueError, match="non-square tile size"):
        ImageProcessingConfig.from_dict({"size": {"height": 384, "width": 336}})
