"""Host-side anyres geometry: the one place that decides tile grids and token counts.

The processor (placeholder expansion) and the model (feature packing) both call
:func:`anyres_layout` / :func:`image_token_count`, so the two can never disagree. Pure Python and
float64 arithmetic, reproducing transformers' expressions operation for operation
(see REFERENCE_NOTES §4.2, §5.2, §6).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

Pinpoints = tuple[tuple[int, int], ...]


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` that keeps most of the image's resolution, then wastes least canvas.

    Strict comparisons: on a complete tie the earlier list entry wins.
    """
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = h * w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    if best is None:
        raise ValueError(f"no pinpoint fits an image of {height}x{width}: {list(pinpoints)}")
    return best


def resize_within(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Aspect-preserving size inside ``(target_h, target_w)`` (transformers' ``get_patch_output_size``)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclasses.dataclass(frozen=True)
class AnyresLayout:
    """How one single-image (anyres) input becomes feature tokens.

    ``grid_rows × grid_cols`` tiles of ``side × side`` patches follow the base tile; the patch map is
    cropped to rows ``[crop_top, crop_top + crop_h)`` and columns ``[crop_left, crop_left + crop_w)``
    (unpadding), then bilinearly resized to ``out_h × out_w`` when ``resized`` (the anyres_max cap),
    and each output row is followed by one newline token.
    """

    best_resolution: tuple[int, int]
    grid_rows: int
    grid_cols: int
    side: int
    crop_top: int
    crop_left: int
    crop_h: int
    crop_w: int
    out_h: int
    out_w: int

    @property
    def resized(self) -> bool:
        return (self.out_h, self.out_w) != (self.crop_h, self.crop_w)

    @property
    def num_tiles(self) -> int:
        """Base view plus grid tiles."""
        return 1 + self.grid_rows * self.grid_cols

    @property
    def num_tokens(self) -> int:
        return self.side * self.side + self.out_h * (self.out_w + 1)


def _unpad(height: int, width: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """Crop of the padded patch map that holds the image: ``(top, left, h, w)`` (transformers' unpad_image)."""
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, 0, cur_h - 2 * pad, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, pad, cur_h, cur_w - 2 * pad


@functools.lru_cache(maxsize=65536)
def _anyres_layout(height: int, width: int, pinpoints: Pinpoints, tile: int, side: int, max_n: int) -> AnyresLayout:
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    rows, cols = best_h // tile, best_w // tile
    top, left, crop_h, crop_w = _unpad(height, width, rows * side, cols * side)
    out_h, out_w = crop_h, crop_w
    ratio = math.sqrt(crop_h * crop_w / (max_n * side * side))
    if ratio > 1.1:
        out_h, out_w = int(crop_h // ratio), int(crop_w // ratio)
    return AnyresLayout((best_h, best_w), rows, cols, side, top, left, crop_h, crop_w, out_h, out_w)


def anyres_layout(
    height: int, width: int, pinpoints: Sequence[Sequence[int]], *, tile: int = 384, side: int = 27, max_n: int = 9
) -> AnyresLayout:
    """Geometry of one anyres image of original size ``height × width`` (pixels)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    pins = tuple((int(h), int(w)) for h, w in pinpoints)
    return _anyres_layout(int(height), int(width), pins, tile, side, max_n)


def image_token_count(
    height: int,
    width: int,
    pinpoints: Sequence[Sequence[int]],
    *,
    multi_image: bool = False,
    tile: int = 384,
    side: int = 27,
    max_n: int = 9,
) -> int:
    """Number of ``<image>`` tokens one image expands to (729 + 1 in multi-image mode)."""
    if multi_image:
        return side * side + 1
    return anyres_layout(height, width, pinpoints, tile=tile, side=side, max_n=max_n).num_tokens


def image_tile_count(
    height: int, width: int, pinpoints: Sequence[Sequence[int]], *, multi_image: bool = False, tile: int = 384
) -> int:
    """Tiles the vision tower sees for one image: 1 in multi-image mode, else base + grid."""
    if multi_image:
        return 1
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    return 1 + (best_h // tile) * (best_w // tile)


def pooled_side(side: int = 27) -> int:
    """Video frames are pooled from ``side × side`` to ``ceil(side / 2)`` squared."""
    return math.ceil(side / 2)


def video_token_count(num_frames: int, *, side: int = 27) -> int:
    """``<video>`` tokens for one video: 196 per frame plus one newline."""
    return num_frames * pooled_side(side) ** 2 + 1
