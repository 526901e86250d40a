"""Host-side (numpy) plan that turns vision-tower outputs into the rows of the merged sequence.

Every media token — a base-tile token, an unpadded grid token, a bilinearly resized (anyres_max cap)
grid token, a pooled video token or a newline — is a weighted sum of at most four rows of a table
``[newline; tower_output_tokens…]``. The plan holds those four indices and weights per sequence
position, so the device side is one gather + weighted sum whose shape depends only on the padded
batch (the engine's buckets), never on image sizes. Newline sits at table row 0 so that padding the
tower batch never moves it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ov_jax.config import OneVisionConfig
from ov_jax.geometry import anyres_layout, image_tile_count, pooled_side

TAPS = 4
NEWLINE_ROW = 0


class MediaMismatchError(ValueError):
    """The prompt's placeholders and the supplied media do not describe the same number of tokens."""


@dataclasses.dataclass(frozen=True)
class MediaPlan:
    """What the device needs to build the merged embeddings.

    tower_inputs: ``[N, C, H, W]`` float32 tiles and frames to run through the vision tower, in the
        order the gather indices assume (image tiles first, then video frames).
    tap_index, tap_weight: ``[B, T, 4]`` rows of ``[newline; tower tokens]`` and their weights.
    is_media: ``[B, T]`` positions whose embedding is replaced by the gathered features.
    """

    tower_inputs: np.ndarray
    tap_index: np.ndarray
    tap_weight: np.ndarray
    is_media: np.ndarray

    @property
    def num_tower_inputs(self) -> int:
        return int(self.tower_inputs.shape[0])


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch ``interpolate(mode="bilinear", align_corners=False)`` along one axis: (lo, hi, weight of hi)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, src - lo


def _resize_taps(grid_index: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps for resizing the 2-D index map ``grid_index [h, w]`` to ``[out_h, out_w]`` bilinearly."""
    h, w = grid_index.shape
    y0, y1, ly = _bilinear_taps(h, out_h)
    x0, x1, lx = _bilinear_taps(w, out_w)
    idx = np.stack(
        [grid_index[np.ix_(y0, x0)], grid_index[np.ix_(y0, x1)], grid_index[np.ix_(y1, x0)], grid_index[np.ix_(y1, x1)]],
        axis=-1,
    )
    ly, lx = ly[:, None], lx[None, :]
    wts = np.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], axis=-1)
    return idx, wts


def _single(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.zeros(rows.shape + (TAPS,), np.int64)
    idx[..., 0] = rows
    wts = np.zeros(rows.shape + (TAPS,), np.float64)
    wts[..., 0] = 1.0
    return idx, wts


def _with_newlines(idx: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append a newline column to a ``[h, w, 4]`` tap map and flatten row-major."""
    nl_idx, nl_w = _single(np.full(idx.shape[:1] + (1,), NEWLINE_ROW))
    idx = np.concatenate([idx, nl_idx], axis=1).reshape(-1, TAPS)
    wts = np.concatenate([wts, nl_w], axis=1).reshape(-1, TAPS)
    return idx, wts


def image_rows(height: int, width: int, first_tile: int, multi_image: bool, config: OneVisionConfig):
    """Taps of one image's packed tokens; ``first_tile`` is its base tile's row in the tower batch."""
    side = config.vision.patches_per_side
    tokens = side * side
    base = 1 + first_tile * tokens + np.arange(tokens)
    parts = [_single(base)]
    if multi_image:
        parts.append(_single(np.array([NEWLINE_ROW])))
    else:
        lay = anyres_layout(height, width, config.image_grid_pinpoints, tile=config.vision.image_size,
                            side=side, max_n=config.anyres_max)
        ys = lay.crop_top + np.arange(lay.crop_h)
        xs = lay.crop_left + np.arange(lay.crop_w)
        tile = first_tile + 1 + (ys[:, None] // side) * lay.grid_cols + xs[None, :] // side
        grid = 1 + tile * tokens + (ys[:, None] % side) * side + xs[None, :] % side
        if lay.resized:
            idx, wts = _resize_taps(grid, lay.out_h, lay.out_w)
        else:
            idx, wts = _single(grid)
        parts.append(_with_newlines(idx, wts))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def video_rows(first_frame: int, num_frames: int, config: OneVisionConfig):
    """Taps of one video: each frame's 27×27 map pooled bilinearly to 14×14, one newline at the end."""
    side = config.vision.patches_per_side
    out = pooled_side(side)
    local = np.arange(side * side).reshape(side, side)
    idx, wts = [], []
    for f in range(num_frames):
        i, w = _resize_taps(1 + (first_frame + f) * side * side + local, out, out)
        idx.append(i.reshape(-1, TAPS))
        wts.append(w.reshape(-1, TAPS))
    i, w = _single(np.array([NEWLINE_ROW]))
    return np.concatenate(idx + [i]), np.concatenate(wts + [w])


def image_modes(num_images: int, batch_num_images) -> list[bool]:
    """Per image (flat order): True when its sample holds several images (multi-image mode)."""
    if batch_num_images is None:
        return [False] * num_images
    counts = [int(n) for n in np.asarray(batch_num_images).reshape(-1)]
    if sum(counts) != num_images:
        raise MediaMismatchError(f"batch_num_images {counts} sums to {sum(counts)} but {num_images} images were given")
    return [n > 1 for n in counts for _ in range(n)]


def build_media_plan(
    input_ids: np.ndarray,
    config: OneVisionConfig,
    pixel_values: np.ndarray | None = None,
    image_sizes: np.ndarray | None = None,
    batch_num_images: np.ndarray | None = None,
    pixel_values_videos: np.ndarray | None = None,
    tower_bucket: int | None = None,
) -> MediaPlan:
    """Plan the merge of images and videos into ``input_ids [B, T]``.

    ``tower_bucket`` pads the tower batch with zero tiles to a fixed size (the engine's buckets);
    None uses the exact count. Raises :class:`MediaMismatchError` when placeholders and media disagree.
    """
    input_ids = np.asarray(input_ids)
    tiles, idx_parts, w_parts = [], [], []
    n_images = 0
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values)
        if pixel_values.ndim == 4:  # one image's tiles without the image axis
            pixel_values = pixel_values[None]
        if image_sizes is None:
            raise MediaMismatchError("pixel_values given without image_sizes")
        sizes = np.asarray(image_sizes).reshape(-1, 2)
        n_images = len(sizes)
        if pixel_values.shape[0] != n_images:
            raise MediaMismatchError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {n_images}")
        row = 0
        for i, ((h, w), multi) in enumerate(zip(sizes.tolist(), image_modes(n_images, batch_num_images))):
            count = image_tile_count(h, w, config.image_grid_pinpoints, multi_image=multi, tile=config.vision.image_size)
            if count > pixel_values.shape[1]:
                raise MediaMismatchError(
                    f"image {i} ({h}x{w}) needs {count} tiles but pixel_values holds {pixel_values.shape[1]}")
            tiles.append(pixel_values[i, :count])
            idx, wts = image_rows(h, w, row, multi, config)
            idx_parts.append(("image", idx, wts))
            row += count
    if pixel_values_videos is not None:
        videos = np.asarray(pixel_values_videos)
        if videos.ndim == 4:
            videos = videos[None]
        row = sum(len(t) for t in tiles)
        for v in range(videos.shape[0]):
            tiles.append(videos[v])
            idx, wts = video_rows(row, videos.shape[1], config)
            idx_parts.append(("video", idx, wts))
            row += videos.shape[1]

    b, t = input_ids.shape
    tap_index = np.zeros((b, t, TAPS), np.int32)
    tap_weight = np.zeros((b, t, TAPS), np.float32)
    is_media = np.zeros((b, t), bool)
    for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
        positions = input_ids == token_id
        parts = [(i, w) for k, i, w in idx_parts if k == kind]
        rows = sum(len(i) for i, _ in parts)
        if int(positions.sum()) != rows:
            raise MediaMismatchError(
                f"input_ids holds {int(positions.sum())} <{kind}> tokens but the {kind}s given produce {rows} "
                f"feature rows ({len(parts)} {kind}(s)); the prompt and the media do not match")
        if rows:
            tap_index[positions] = np.concatenate([i for i, _ in parts])
            tap_weight[positions] = np.concatenate([w for _, w in parts])
            is_media |= positions

    tower_inputs = np.concatenate(tiles).astype(np.float32, copy=False) if tiles else np.zeros(
        (0, config.vision.num_channels, config.vision.image_size, config.vision.image_size), np.float32)
    if tower_bucket is not None:
        if tower_bucket < len(tower_inputs):
            raise ValueError(f"tower bucket {tower_bucket} is smaller than the {len(tower_inputs)} tiles and frames")
        pad = np.zeros((tower_bucket - len(tower_inputs),) + tower_inputs.shape[1:], np.float32)
        tower_inputs = np.concatenate([tower_inputs, pad])
    return MediaPlan(tower_inputs, tap_index, tap_weight, is_media)
