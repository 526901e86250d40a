"""Host-side image preprocessing with PIL and NumPy, reproducing transformers' PIL-backend image processor.

Reference: ``LlavaOnevisionImageProcessorPil`` (transformers 5.24), REFERENCE_NOTES §4. Single-image samples
are split into anyres tiles (base view first, then the best-resolution canvas row-major); samples with
several images use one mean-colour padded square per image. Tile geometry comes from
:mod:`ov_jax.geometry`, the one place that decides grids and token counts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ov_jax import geometry
from ov_jax.config import DEFAULT_PINPOINTS
from ov_jax.processing.media import load_image

# Class defaults of the reference image processor (OpenAI CLIP). Checkpoints override them with 0.5.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3
PINPOINT_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS; released grids reach 2304x2304


@dataclasses.dataclass(frozen=True)
class ImageProcessingConfig:
    """What ``preprocessor_config.json`` (or the nested ``image_processor`` section) controls.

    Defaults are the reference class defaults, so a config that omits a key behaves as transformers does.
    """

    tile_size: int = 384
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC
    pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_pad: bool = True

    def __post_init__(self):
        """A ``ValueError`` naming the first value preprocessing cannot run with (a damaged or hostile
        ``preprocessor_config.json`` would otherwise divide by zero or give NaN pixels)."""
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise ValueError(f"the tile size must be a positive integer, got {self.tile_size!r}")
        for name in ("image_mean", "image_std"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (3,) or not np.isfinite(value).all() or name == "image_std" and (value == 0).any():
                raise ValueError(f"{name} must be 3 finite numbers{' (none 0)' if name == 'image_std' else ''}, "
                                 f"got {getattr(self, name)!r}")
        if not (np.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise ValueError(f"rescale_factor must be a positive finite number, got {self.rescale_factor!r}")
        if self.resample not in tuple(Image.Resampling):
            raise ValueError(f"resample must be a PIL resampling filter (0-5), got {self.resample!r}")
        if not self.pinpoints or not all(h > 0 and w > 0 for h, w in self.pinpoints):
            raise ValueError(f"image_grid_pinpoints must be pairs of positive sizes, got {list(self.pinpoints)}")
        largest = max(h * w for h, w in self.pinpoints)
        if largest > PINPOINT_MAX_PIXELS:  # every image is resized to a pinpoint: this bounds the tiles' memory
            raise ValueError(f"image_grid_pinpoints holds a {largest:,}-pixel grid, over the limit of "
                             f"{PINPOINT_MAX_PIXELS:,} (PIL's decompression-bomb size)")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ImageProcessingConfig":
        """Parse a transformers image-processor dict; unknown keys are ignored, unsupported settings raise."""
        if config.get("do_center_crop"):
            raise ValueError("do_center_crop=True is not used by LLaVA-OneVision and is not supported")
        values: dict[str, Any] = {}
        if config.get("size") is not None:
            values["tile_size"] = _square_size(config["size"])
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                value = config[key]
                values[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        if config.get("image_grid_pinpoints") is not None:
            values["pinpoints"] = tuple((int(h), int(w)) for h, w in config["image_grid_pinpoints"])
        for key in ("rescale_factor",):
            if config.get(key) is not None:
                values[key] = float(config[key])
        if config.get("resample") is not None:
            values["resample"] = int(config["resample"])
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if config.get(key) is not None:
                values[key] = bool(config[key])
        return cls(**values)

    @property
    def pad_color(self) -> tuple[int, ...]:
        """Multi-image square padding colour: ``int(mean * 255)`` per channel (127 for mean 0.5)."""
        return tuple(int(m * 255) for m in self.image_mean)


def _square_size(size: Any) -> int:
    """Tile side from a transformers ``size`` value; LLaVA-OneVision tiles are square."""
    if isinstance(size, int):
        return size
    if isinstance(size, Mapping):
        if size.get("height") is not None and size.get("width") is not None:
            if size["height"] != size["width"]:
                raise ValueError(f"non-square tile size {dict(size)} is not supported (LLaVA-OneVision uses 384x384)")
            return int(size["height"])
        if size.get("shortest_edge") is not None:
            return int(size["shortest_edge"])
    raise ValueError(f"cannot read a tile size from size={size!r}; expected {{'height': 384, 'width': 384}}")


# ------------------------------------------------------------------------------------- conversion to RGB


def _pil_to_rgb(image: Image.Image, convert: bool) -> np.ndarray:
    """PIL image → uint8 HWC RGB, compositing any alpha / transparency onto white (reference convert_to_rgb)."""
    if not convert:
        array = np.array(image)
    elif "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        array = np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    else:
        array = np.array(image.convert("RGB"))
    return array


def _array_to_rgb(array: np.ndarray, convert: bool) -> np.ndarray:
    """NumPy image (HW, HWC or CHW with 1/3/4 channels, uint8 values) → uint8 HWC RGB."""
    if array.ndim == 2:  # grayscale H x W
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ValueError(f"an image array must be HxW, HxWxC or CxHxW; got shape {array.shape}")
    elif array.shape[0] in (1, 3, 4):  # channels first wins when ambiguous, as in the reference
        array = np.moveaxis(array, 0, -1)
    elif array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot find the channel axis (1, 3 or 4 channels) of an image of shape {array.shape}")
    if array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.number) and np.all(array == np.round(array))
                and array.min(initial=0) >= 0 and array.max(initial=0) <= 255):
            raise ValueError(
                f"image arrays must hold integer pixel values in [0, 255] (uint8); got dtype {array.dtype} "
                f"with range [{array.min()}, {array.max()}]. Pass uint8 arrays or PIL images."
            )
        array = array.astype(np.uint8)
    channels = array.shape[-1]
    if not convert or channels == 3:
        if channels != 3:
            raise ValueError(f"do_convert_rgb is off but the image has {channels} channels")
        return array
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    alpha = array[..., 3:4] / 255
    return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)


def to_rgb_chw(image: Any, *, convert: bool = True) -> np.ndarray:
    """Any supported image (PIL, NumPy, or a source :func:`.media.load_image` reads) → uint8 ``[3, H, W]`` RGB."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image, convert)
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image, convert)
    elif hasattr(image, "__array__") and getattr(image, "ndim", 0) in (2, 3):  # e.g. torch / jax arrays
        rgb = _array_to_rgb(np.asarray(image), convert)
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, a uint8 numpy array, "
            "a file path, an http(s) URL or base64 data"
        )
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image after conversion, got shape {rgb.shape}")
    if min(rgb.shape[:2]) < 1:
        raise ValueError(f"image has an empty side: {rgb.shape[0]}x{rgb.shape[1]}")
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))


# ------------------------------------------------------------------------------------------- transforms


def pil_resize(chw: np.ndarray, height: int, width: int, resample: int = PIL_BICUBIC) -> np.ndarray:
    """uint8 ``[3, H, W]`` → ``[3, height, width]`` with PIL (a same-size resize is an exact copy in PIL)."""
    if chw.shape[1:] == (height, width):
        return chw.copy()
    resized = Image.fromarray(np.moveaxis(chw, 0, -1)).resize((width, height), resample=resample)
    return np.moveaxis(np.asarray(resized), -1, 0)


def anyres_views(chw: np.ndarray, config: ImageProcessingConfig) -> np.ndarray:
    """Single-image mode: ``[base, tile(0,0), tile(0,1), ...]`` as uint8 ``[1 + rows*cols, 3, t, t]``.

    The image is resized (aspect kept) into the best pinpoint, centred on black, and cut row-major;
    the base view is the whole image resized straight to ``t × t``.
    """
    height, width = chw.shape[1:]
    tile = config.tile_size
    best_h, best_w = geometry.select_best_resolution(height, width, config.pinpoints)
    new_h, new_w = geometry.resize_within(height, width, best_h, best_w)
    resized = pil_resize(chw, new_h, new_w, config.resample)
    left, extra_w = divmod(best_w - new_w, 2)
    top, extra_h = divmod(best_h - new_h, 2)
    canvas = np.pad(resized, ((0, 0), (top, top + extra_h), (left, left + extra_w)))
    rows, cols = -(-best_h // tile), -(-best_w // tile)
    if (rows * tile, cols * tile) != (best_h, best_w):
        raise ValueError(f"pinpoint {best_h}x{best_w} is not a multiple of the tile size {tile}")
    tiles = canvas.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    base = pil_resize(chw, tile, tile, config.resample)
    return np.concatenate([base[None], tiles])


def padded_square_view(chw: np.ndarray, config: ImageProcessingConfig) -> np.ndarray:
    """Multi-image mode: the image centred on a mean-colour square, resized to ``t × t`` → ``[1, 3, t, t]``."""
    _, height, width = chw.shape
    side = max(height, width)
    if height != width:
        square = np.empty((3, side, side), dtype=chw.dtype)
        square[:] = np.asarray(config.pad_color, dtype=chw.dtype)[:, None, None]
        if width > height:
            start = (side - height) // 2
            square[:, start:start + height, :] = chw
        else:
            start = (side - width) // 2
            square[:, :, start:start + width] = chw
        chw = square
    return pil_resize(chw, config.tile_size, config.tile_size, config.resample)[None]


def rescale_and_normalize(views: np.ndarray, config: ImageProcessingConfig) -> np.ndarray:
    """uint8 views → float32, as the reference: ``float32(float64(x) * factor)``, then ``(x - mean) / std``."""
    pixels = views.astype(np.float32)
    if config.do_rescale:
        pixels = (views.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels


# ---------------------------------------------------------------------------------------------- batches


def group_images(images: Any) -> tuple[list[Any], list[int]]:
    """Flat image list and ``batch_num_images``, with the reference's reading of the nesting.

    ``[[a, b], [c]]`` → per-sample groups ``[2, 1]`` (empty groups are dropped, as the reference does);
    a flat list ``[a, b, c]`` → ``[1, 1, 1]`` (each image its own anyres sample); one image → ``[1]``.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            return [], []
        if isinstance(images[0], (list, tuple)):
            if not all(isinstance(group, (list, tuple)) for group in images):
                raise ValueError("images must be all nested lists (one per sample) or a flat list of images, not a mix")
            groups = [list(group) for group in images if len(group)]
            for group in groups:
                for image in group:
                    if isinstance(image, (list, tuple)):
                        raise ValueError("images can be nested at most two levels deep ([[img, ...], ...])")
            return [image for group in groups for image in group], [len(group) for group in groups]
        for image in images:
            if isinstance(image, (list, tuple)):
                raise ValueError("images must be all nested lists (one per sample) or a flat list of images, not a mix")
        return list(images), [1] * len(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        raise ValueError("a 4-D array is ambiguous as images; pass a list of HxWxC arrays (or a video via videos=)")
    return [images], [1]


def preprocess_images(images: Any, config: ImageProcessingConfig) -> dict[str, Any]:
    """``pixel_values`` float32 ``[num_images, max_tiles, 3, t, t]``, ``image_sizes`` int64 ``[num_images, 2]``
    (original ``(H, W)``) and ``batch_num_images`` int64, identical to the reference PIL-backend processor.
    """
    flat, batch_num_images = group_images(images)
    multi_image = [n != 1 for n in batch_num_images for _ in range(n)]
    per_image, sizes = [], []
    for image, is_multi in zip(flat, multi_image):
        chw = to_rgb_chw(image, convert=config.do_convert_rgb)
        sizes.append(chw.shape[1:])
        if not config.do_resize:
            raise ValueError("do_resize=False is not supported: tiles must be resized to the tile size")
        views = padded_square_view(chw, config) if is_multi else anyres_views(chw, config)
        per_image.append(rescale_and_normalize(views, config))
    if not per_image:
        raise ValueError("no images were given")
    if config.do_pad:
        max_tiles = max(len(views) for views in per_image)
        pixel_values = np.zeros((len(per_image), max_tiles, *per_image[0].shape[1:]), dtype=np.float32)
        for i, views in enumerate(per_image):
            pixel_values[i, : len(views)] = views
    else:
        if len({len(views) for views in per_image}) > 1:
            raise ValueError("do_pad=False but the images have different tile counts; they cannot be stacked")
        pixel_values = np.stack(per_image)
    return {
        "pixel_values": pixel_values,
        "image_sizes": np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        "batch_num_images": np.asarray(batch_num_images, dtype=np.int64),
    }
