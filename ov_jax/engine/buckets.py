"""Static shape buckets and the host-side (numpy) padding of a request into them.

Every device function of the engine is compiled for shapes taken from a :class:`Buckets` set, never
from a request: batch rows are padded up to a batch bucket, the prompt is left-padded up to a prompt
bucket, the KV cache has a cache-length bucket, and the vision tower always sees chunks of
``tower_chunk`` tiles (any number of tiles and frames runs as a host loop over chunks, so image sizes
and frame counts never reach a compiled shape). After warm-up, requests inside the buckets compile
nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ov_jax.media_plan import MediaPlan


class PromptTooLongError(ValueError):
    """A prompt (text plus media tokens) plus the tokens to generate does not fit the largest bucket."""


def _sorted_unique(values: Sequence[int], name: str) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values}))
    if not out or out[0] < 1:
        raise ValueError(f"{name} buckets must be positive integers, got {tuple(values)}")
    return out


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The static shapes the engine compiles for.

    batch: row counts a batch is padded up to.
    prompt: prompt lengths (text + media tokens) a prompt is left-padded up to. Prefill cost grows with
        the bucket, so the default ladder is fine where images land (one anyres image: 757 to ~8.8k
        tokens; an 8-frame video: 1569) and at the short end (text chat turns); only the buckets a
        deployment warms up are ever compiled.
    cache: KV cache lengths; a request gets the smallest one that holds its padded prompt plus the new
        tokens (decode cost grows with the cache length, so keep these close to real needs).
    tower_chunk: tiles/frames per vision-tower call; None picks 1 on CPU (no padding waste, the
        matmuls are already large) and 8 on accelerators.
    prefill_chunk: prompt slots per text-prefill call. A prompt bucket longer than this is prefilled a chunk
        at a time (each chunk a separate call, so running rows decode between them); a shorter one in one
        call.
    """

    batch: tuple[int, ...] = (1, 2, 4, 8)
    prompt: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 7168, 8192,
                               10240, 12288, 16384)
    cache: tuple[int, ...] = (128, 256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192, 9216, 10240, 12288,
                              16384, 20480, 24576, 32768)
    tower_chunk: int | None = None
    prefill_chunk: int = 512

    def __post_init__(self):
        object.__setattr__(self, "batch", _sorted_unique(self.batch, "batch"))
        object.__setattr__(self, "prompt", _sorted_unique(self.prompt, "prompt"))
        object.__setattr__(self, "cache", _sorted_unique(self.cache, "cache"))
        if self.tower_chunk is not None and int(self.tower_chunk) < 1:
            raise ValueError(f"tower_chunk must be >= 1, got {self.tower_chunk}")
        if int(self.prefill_chunk) < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        object.__setattr__(self, "prefill_chunk", int(self.prefill_chunk))

    def resolved_chunk(self, platform: str) -> int:
        if self.tower_chunk is not None:
            return int(self.tower_chunk)
        return 1 if platform == "cpu" else 8

    def prefill_starts(self, prompt_bucket: int, length: int) -> tuple[int, ...] | None:
        """First slots of the prefill chunks of a ``length``-token prompt left-padded to ``prompt_bucket``, in
        order; None when the bucket is prefilled in one call (not longer than ``prefill_chunk``). The chunks end
        at the bucket's last slot and cover every prompt token; chunks of padding only are skipped, and the
        first chunk starts at slot 0 at the latest (overlapping the next one when the bucket is not a
        multiple of the chunk)."""
        c = self.prefill_chunk
        if prompt_bucket <= c:
            return None
        count = -(-length // c)
        return tuple(max(prompt_bucket - c * k, 0) for k in range(count, 0, -1))

    def batch_bucket(self, rows: int) -> int:
        for b in self.batch:
            if b >= rows:
                return b
        raise ValueError(f"a batch of {rows} rows exceeds the largest batch bucket {self.batch[-1]}; "
                         f"split the batch or add a larger bucket (Buckets(batch=...))")

    def prompt_bucket(self, length: int, media_tokens: int = 0) -> int:
        for t in self.prompt:
            if t >= length:
                return t
        raise PromptTooLongError(
            f"the prompt holds {length} tokens ({length - media_tokens} text + {media_tokens} image/video "
            f"tokens in the longest row) but the largest prompt bucket is {self.prompt[-1]}; nothing is cut "
            f"silently: use fewer or smaller images/frames, or add a larger bucket (Buckets(prompt=..., cache=...))")

    def cache_bucket(self, prompt_bucket: int, max_new_tokens: int, length: int, media_tokens: int = 0) -> int:
        """Smallest cache holding the padded prompt and every generated token that is fed back."""
        needed = prompt_bucket + max_new_tokens - 1
        for s in self.cache:
            if s >= needed:
                return s
        raise PromptTooLongError(
            f"the prompt ({length} tokens: {length - media_tokens} text + {media_tokens} image/video, padded to "
            f"the {prompt_bucket}-token bucket) plus max_new_tokens={max_new_tokens} needs a KV cache of {needed} "
            f"slots but the largest cache bucket is {self.cache[-1]}; lower max_new_tokens or add a larger cache "
            f"bucket (Buckets(cache=...))")

    def cache_lengths_for(self, prompt_bucket: int) -> tuple[int, ...]:
        """Cache buckets a prompt bucket can be decoded in (at least one new token)."""
        return tuple(s for s in self.cache if s >= prompt_bucket)


@dataclasses.dataclass(frozen=True)
class PaddedRequest:
    """A request padded to its buckets: every array has a bucket shape.

    input_ids, attention_mask, is_media: ``[B, T]``; tap_index, tap_weight: ``[B, T, 4]`` (left padding:
    the pads sit on the left, as the prompt does); tower_inputs: ``[N, C, H, W]`` real tiles and frames
    (unpadded: the engine feeds them in chunks). ``rows`` is the number of real rows.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    tap_index: np.ndarray
    tap_weight: np.ndarray
    is_media: np.ndarray
    tower_inputs: np.ndarray
    rows: int
    length: int  # longest real prompt (columns after dropping all-pad columns)
    media_tokens: int  # media tokens of the longest row

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[1])


def check_left_padded(mask: np.ndarray) -> None:
    """Each row must be pads (0) then tokens (1), with at least one token."""
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"attention_mask row(s) {empty.tolist()} hold no tokens")
    bad = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1))
    if bad.size:
        raise ValueError(f"attention_mask row(s) {bad.tolist()} are not left-padded (a 0 follows a 1); "
                         "generation needs left padding (tokenizer padding_side='left')")


def drop_pad_columns(input_ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove leading columns that are padding in every row (positions come from the mask, so this is exact)."""
    first = int(np.argmax(mask.any(axis=0)))
    return input_ids[:, first:], mask[:, first:]


def _left_pad(x: np.ndarray, length: int, rows: int, fill=0) -> np.ndarray:
    b, t = x.shape[:2]
    out = np.full((rows, length) + x.shape[2:], fill, dtype=x.dtype)
    out[:b, length - t:] = x
    return out


def pad_rows(input_ids: np.ndarray, mask: np.ndarray, plan: MediaPlan, buckets: Buckets,
             pad_token_id: int) -> list[PaddedRequest]:
    """Each row of a left-padded, pad-column-free request on its own (batch 1), left-padded up to the prompt
    bucket of the longest row: rows run as separate slots of the decode batch, and one bucket per request keeps
    the insert executables to one per (prompt, cache) bucket pair. Every row shares ``plan.tower_inputs`` (its
    taps index into all of them). More rows than the largest batch bucket (the decode batch) is an error."""
    rows, length = input_ids.shape
    buckets.batch_bucket(rows)
    media_per_row = (plan.is_media & mask).sum(axis=1)
    t = buckets.prompt_bucket(length, int(media_per_row[int(np.argmax(mask.sum(axis=1)))]))
    out = []
    for r in range(rows):
        first = int(np.argmax(mask[r]))
        length = mask.shape[1] - first
        media = int(media_per_row[r])
        part = np.s_[r:r + 1, first:]
        out.append(PaddedRequest(
            input_ids=_left_pad(input_ids[part].astype(np.int32), t, 1, fill=pad_token_id),
            attention_mask=_left_pad(mask[part].astype(bool), t, 1, fill=False),
            tap_index=_left_pad(plan.tap_index[part].astype(np.int32), t, 1),
            tap_weight=_left_pad(plan.tap_weight[part].astype(np.float32), t, 1),
            is_media=_left_pad(plan.is_media[part].astype(bool), t, 1, fill=False),
            tower_inputs=plan.tower_inputs,
            rows=1,
            length=length,
            media_tokens=media,
        ))
    return out
