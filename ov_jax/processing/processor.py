"""``LlavaOnevisionProcessor``: text + images + videos → model inputs, identical to transformers' processor.

Images are preprocessed on the host with PIL + NumPy (:mod:`.image`), videos with :mod:`.video`, the chat
template is rendered with jinja2 (:mod:`.chat`) and text is tokenized with the ``tokenizers`` library
(:mod:`.tokenizer`). Every ``<image>`` / ``<video>`` placeholder is expanded to the exact number of feature
tokens the model produces, computed by :mod:`ov_jax.geometry` (shared with the model's packing plan).
Outputs carry transformers' names and meanings, so either side's inputs feed either model.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from ov_jax import geometry
from ov_jax.processing import chat, files, image, video
from ov_jax.processing.image import ImageProcessingConfig
from ov_jax.processing.tokenizer import TextTokenizer


@dataclasses.dataclass(frozen=True)
class VideoProcessingConfig:
    """What ``video_preprocessor_config.json`` (or the nested ``video_processor`` section) controls."""

    frame_size: int = 384
    image_mean: tuple[float, ...] = image.OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = image.OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = image.PIL_BICUBIC
    do_sample_frames: bool = False
    num_frames: int | None = None
    fps: float | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VideoProcessingConfig":
        as_image = ImageProcessingConfig.from_dict({k: v for k, v in config.items() if k != "do_center_crop"})
        return cls(
            frame_size=as_image.tile_size, image_mean=as_image.image_mean, image_std=as_image.image_std,
            rescale_factor=as_image.rescale_factor, resample=as_image.resample,
            do_sample_frames=bool(config.get("do_sample_frames") or False),
            num_frames=config.get("num_frames"), fps=config.get("fps"),
        )


class ProcessorOutput(dict):
    """A dict of model inputs that also allows attribute access (``inputs.input_ids``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LlavaOnevisionProcessor:
    """Turns chat messages / text, images and videos into LLaVA-OneVision model inputs."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        image_config: ImageProcessingConfig | None = None,
        video_config: VideoProcessingConfig | None = None,
        *,
        chat_template: str | Mapping[str, str] | None = None,
        chat_template_files: Mapping[str, str] | None = None,
        num_image_tokens: int = 729,
        vision_aspect_ratio: str = "anyres_max_9",
        vision_feature_select_strategy: str | None = "full",
        image_token: str = "<image>",
        video_token: str = "<video>",
    ):
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
        side = math.isqrt(num_image_tokens)
        if side * side != num_image_tokens:
            raise ValueError(f"num_image_tokens must be a square number of patches, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageProcessingConfig()
        self.video_config = video_config or VideoProcessingConfig()
        self.chat_template = chat_template
        self.chat_template_files = dict(chat_template_files or {})  # template name -> file, for error messages
        self.num_image_tokens = num_image_tokens
        self.patches_per_side = side
        self.vision_aspect_ratio = vision_aspect_ratio
        # transformers parses "anyres_max_9" with str.strip (a character set), reproduced here.
        cap = vision_aspect_ratio.strip("anyres_max_") if isinstance(vision_aspect_ratio, str) else ""
        if not cap.isdigit() or int(cap) < 1:
            raise ValueError(f"vision_aspect_ratio must be 'anyres_max_N' with N >= 1, got {vision_aspect_ratio!r}")
        self.max_tiles_cap = int(cap)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        self.video_token_id = tokenizer.token_to_id(video_token)
        self._placeholder = re.compile(f"(?P<image>{re.escape(image_token)})|(?P<video>{re.escape(video_token)})")

    # ----------------------------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike) -> "LlavaOnevisionProcessor":
        """Build from a checkpoint directory or Hub id (tokenizer, processor configs and chat template)."""
        from ov_jax.hub import resolve_checkpoint

        directory = resolve_checkpoint(path_or_hub_id, allow_patterns=files.PROCESSOR_FILE_PATTERNS)
        found = files.read_processor_files(directory)
        tokenizer = TextTokenizer.from_directory(directory, found.tokenizer_config)
        # transformers lets the tokenizer's image_token / video_token attributes override the processor's.
        image_token = found.tokenizer_config.get("image_token") or found.processor.get("image_token") or "<image>"
        video_token = found.tokenizer_config.get("video_token") or found.processor.get("video_token") or "<video>"
        num_image_tokens = found.processor.get("num_image_tokens")
        if num_image_tokens is None:
            raise ValueError(
                f"{directory}/{files.PROCESSOR_FILE} has no num_image_tokens; the reference processor needs it "
                "to count image tokens (729 for SigLIP at 384x384 with patch 14)"
            )
        try:
            return cls(
                tokenizer,
                ImageProcessingConfig.from_dict(found.image_processor),
                VideoProcessingConfig.from_dict(found.video_processor),
                chat_template=found.chat_template,
                chat_template_files=found.chat_template_files,
                num_image_tokens=num_image_tokens,
                vision_aspect_ratio=found.processor.get("vision_aspect_ratio") or "anyres_max_9",
                vision_feature_select_strategy=found.processor.get("vision_feature_select_strategy"),
                image_token=image_token,
                video_token=video_token,
            )
        except (ValueError, TypeError) as err:  # values of the files (int("x"), a list where a number goes...)
            raise ValueError(f"the processor configuration of {directory} cannot be used: {err}") from None

    # ---------------------------------------------------------------------------------- token counting

    def image_token_count(self, height: int, width: int, *, multi_image: bool = False) -> int:
        """``<image>`` tokens for one image of original size ``height × width`` (shared geometry)."""
        count = geometry.image_token_count(
            height, width, self.image_config.pinpoints, multi_image=multi_image, tile=self.image_config.tile_size,
            side=self.patches_per_side, max_n=self.max_tiles_cap,
        )
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def video_token_count(self, num_frames: int) -> int:
        """``<video>`` tokens for one video of ``num_frames`` frames."""
        return geometry.video_token_count(num_frames, side=self.patches_per_side)

    # ------------------------------------------------------------------------------------------ media

    def preprocess_images(self, images: Any) -> dict[str, np.ndarray]:
        """``pixel_values``, ``image_sizes``, ``batch_num_images`` for ``images`` (see :func:`.image.preprocess_images`)."""
        return image.preprocess_images(images, self.image_config)

    def preprocess_videos(
        self, videos: Any, *, do_sample_frames: bool | None = None, num_frames: int | None = None,
        fps: float | None = None,
    ) -> dict[str, np.ndarray]:
        """``pixel_values_videos`` float32 ``[num_videos, frames, 3, s, s]`` for paths or frame arrays."""
        config = self.video_config
        if do_sample_frames is None:  # asking for a frame count or rate means sampling (as apply_chat_template)
            do_sample_frames = config.do_sample_frames or num_frames is not None or fps is not None
        if do_sample_frames:
            num_frames = num_frames if num_frames is not None else config.num_frames
            fps = fps if fps is not None else config.fps
        else:
            num_frames = fps = None
        processed = []
        for index, source in enumerate(flatten_videos(videos)):
            try:
                frames, _ = video.load_video(source, num_frames=num_frames, fps=fps)
            except FileNotFoundError:
                raise
            except (OSError, RuntimeError) as err:
                raise ValueError(f"cannot read video {index} ({_describe(source)}): {err}") from None
            processed.append(video.preprocess_video_frames(
                frames, size=config.frame_size, image_mean=config.image_mean, image_std=config.image_std,
                rescale_factor=config.rescale_factor, resample=config.resample,
            ))
        if not processed:
            raise ValueError("no videos were given")
        frame_counts = [len(frames) for frames in processed]
        if len(set(frame_counts)) > 1:
            raise ValueError(
                f"videos in one batch must have the same number of frames to stack, got {frame_counts}; "
                "pass num_frames to sample the same count from each"
            )
        return {"pixel_values_videos": np.stack(processed)}

    # ------------------------------------------------------------------------------------------- call

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        *,
        padding: bool | str = True,
        padding_side: str = "left",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = "np",
        do_sample_frames: bool | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
    ) -> ProcessorOutput:
        """Model inputs for a prompt (or a batch of prompts) and its media.

        ``images``: one image, a flat list (each image its own anyres sample) or per-sample lists
        (``[[a, b], [c]]``: samples with several images use multi-image mode). Images are matched to
        ``<image>`` placeholders in order across the batch; likewise ``videos`` to ``<video>``.
        Returns ``input_ids`` / ``attention_mask`` (int64, left-padded by default), ``pixel_values``,
        ``image_sizes``, ``batch_num_images`` and ``pixel_values_videos`` as present.
        ``return_tensors``: "np" (default), "jax", or None for Python lists of token ids.
        """
        if return_tensors not in ("np", "jax", None):
            raise ValueError(f"return_tensors must be 'np', 'jax' or None, got {return_tensors!r}")
        if text is None and images is None and videos is None:
            raise ValueError("give at least one of text, images or videos")
        texts = [text] if isinstance(text, str) else None if text is None else list(text)
        if texts is not None and not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        chat.check_text(texts, "text")
        if texts is not None:
            self._check_placeholder_counts(texts, images, videos)

        outputs = ProcessorOutput()
        replacements: dict[str, list[str]] = {"image": [], "video": []}
        if images is not None:
            image_inputs = self.preprocess_images(images)
            outputs.update(image_inputs)
            multi = [n != 1 for n in image_inputs["batch_num_images"].tolist() for _ in range(n)]
            for (height, width), is_multi in zip(image_inputs["image_sizes"].tolist(), multi):
                replacements["image"].append(self.image_token * self.image_token_count(height, width, multi_image=is_multi))
        if videos is not None:
            video_inputs = self.preprocess_videos(videos, do_sample_frames=do_sample_frames, num_frames=num_frames, fps=fps)
            outputs.update(video_inputs)
            frames = video_inputs["pixel_values_videos"].shape[1]
            replacements["video"] = [self.video_token * self.video_token_count(frames)] * len(video_inputs["pixel_values_videos"])

        if texts is not None:
            expanded = self._expand_placeholders(texts, replacements)
            batch_ids = self.tokenizer.encode_batch(expanded, add_special_tokens=add_special_tokens)
            self._check_token_counts(batch_ids, replacements)
            if return_tensors is None and padding in (False, None, "do_not_pad"):
                text_inputs: dict[str, Any] = {"input_ids": batch_ids, "attention_mask": [[1] * len(ids) for ids in batch_ids]}
            else:
                input_ids, attention_mask = self.tokenizer.pad(
                    batch_ids, padding=padding, padding_side=padding_side, max_length=max_length,
                    pad_to_multiple_of=pad_to_multiple_of,
                )
                text_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
                if return_tensors is None:
                    text_inputs = {k: v.tolist() for k, v in text_inputs.items()}
            outputs = ProcessorOutput({**text_inputs, **outputs})
        if return_tensors == "jax":
            import jax.numpy as jnp

            outputs = ProcessorOutput({k: jnp.asarray(v) for k, v in outputs.items()})
        return outputs

    def _check_placeholder_counts(self, texts: list[str], images: Any, videos: Any) -> None:
        for name, token, media, count in (
            ("image", self.image_token, images, lambda: len(image.group_images(images)[0])),
            ("video", self.video_token, videos, lambda: len(flatten_videos(videos))),
        ):
            in_text = sum(t.count(token) for t in texts)
            given = count() if media is not None else 0
            if in_text != given:
                raise ValueError(
                    f"the text has {in_text} {token} placeholder(s) but {given} {name}(s) were given; "
                    f"every {name} needs exactly one {token} in the text (apply_chat_template adds them)"
                )

    def _expand_placeholders(self, texts: list[str], replacements: dict[str, list[str]]) -> list[str]:
        """Replace the i-th placeholder of each kind (counted across the batch) by its i-th expansion."""
        iterators = {kind: iter(values) for kind, values in replacements.items()}
        return [self._placeholder.sub(lambda m: next(iterators[m.lastgroup]), t) for t in texts]

    def _check_token_counts(self, batch_ids: list[list[int]], replacements: dict[str, list[str]]) -> None:
        """The tokenizer must keep every expanded placeholder as one special token each."""
        for kind, token, token_id in (("image", self.image_token, self.image_token_id),
                                      ("video", self.video_token, self.video_token_id)):
            expected = sum(len(r) // len(token) for r in replacements[kind])
            found = sum(ids.count(token_id) for ids in batch_ids)
            if found != expected:
                raise ValueError(
                    f"tokenization produced {found} {token} tokens but {expected} were expected; "
                    f"is {token} registered as a special token in tokenizer.json?"
                )

    # ------------------------------------------------------------------------------------ chat template

    def resolve_chat_template(self, chat_template: str | None = None) -> str:
        """The template source: ``chat_template`` (a name or a template string) or the checkpoint's default."""
        return self._template_and_origin(chat_template)[0]

    def _template_and_origin(self, chat_template: str | None) -> tuple[str, str]:
        """The template source and where it came from (a file of the checkpoint, or the argument)."""
        templates = self.chat_template
        if chat_template is not None:
            if isinstance(templates, Mapping) and chat_template in templates:
                return templates[chat_template], self._origin(chat_template)
            return chat_template, "(the chat_template argument)"
        if isinstance(templates, Mapping):
            if "default" not in templates:
                raise ValueError(f"the checkpoint has several chat templates ({', '.join(templates)}) and none is "
                                 "named 'default'; pass chat_template=<name>")
            return templates["default"], self._origin("default")
        if templates is None:
            raise ValueError("this checkpoint has no chat template (chat_template.json / chat_template.jinja / "
                             "tokenizer_config.json); pass chat_template=... or build the prompt text yourself")
        return templates, self._origin("default")

    def _origin(self, name: str) -> str:
        file = self.chat_template_files.get(name)
        return repr(file) if file else f"{name!r}"

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping] | Sequence[Sequence[Mapping]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        return_tensors: str | None = "np",
        processor_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Render a conversation (or a batch of them) with the chat template.

        ``tokenize=False``: the prompt string (a list for a batch). ``tokenize=True``: the prompt's
        ``input_ids`` (``[batch, length]``), or with ``return_dict=True`` the complete model inputs, loading
        every image / video named in the messages (``{"type": "image", "image" | "url" | "path": ...}``,
        ``{"type": "video", "video" | "path": ...}``). Keyword arguments the template reads are passed to it;
        the others (``num_frames``, ``fps``, ``do_sample_frames``, ``padding``, ...) go to ``__call__``, as
        does ``processor_kwargs``. Passing ``num_frames`` or ``fps`` turns on frame sampling.
        """
        source, origin = self._template_and_origin(chat_template)
        variables = chat.template_variables(source, origin)
        template_kwargs = {k: v for k, v in kwargs.items() if k in variables}
        call_kwargs = {**{k: v for k, v in kwargs.items() if k not in variables}, **(processor_kwargs or {})}
        conversations, is_batched = chat.normalize_conversations(conversation)
        prompts = chat.render_conversations(
            source, conversations, origin=origin, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **{**self.tokenizer.special_tokens, **template_kwargs},
        )
        if not tokenize:
            return prompts if is_batched else prompts[0]
        batch_images, batch_videos = chat.media_from_conversations(conversations, require=True)
        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):
            call_kwargs.setdefault("add_special_tokens", False)
        if "do_sample_frames" not in call_kwargs and (call_kwargs.get("num_frames") is not None
                                                       or call_kwargs.get("fps") is not None):
            call_kwargs["do_sample_frames"] = True
        call_kwargs.setdefault("return_tensors", return_tensors)
        unknown = sorted(set(call_kwargs) - set(inspect.signature(self.__call__).parameters))
        if unknown:
            hint = " (transformers 4.4x's video_fps is called fps now)" if "video_fps" in unknown else ""
            raise TypeError(f"unknown keyword argument(s) {unknown}: neither the chat template nor the processor "
                            f"reads them{hint}")
        outputs = self(
            text=prompts,
            images=batch_images if any(batch_images) else None,
            videos=batch_videos if any(batch_videos) else None,
            **call_kwargs,
        )
        return outputs if return_dict else outputs["input_ids"]

    # ------------------------------------------------------------------------------------------ decode

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


Processor = LlavaOnevisionProcessor


# ---------------------------------------------------------------------------------------------- videos


def _is_frame(item: Any) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image) or isinstance(item, np.ndarray) and item.ndim in (2, 3)


def flatten_videos(videos: Any) -> list[Any]:
    """Flat list of videos (paths, ``[F, H, W, C]`` arrays or frame lists), read as transformers does.

    A path or a 4-D array is one video, a 5-D array a batch, a single image a one-frame video, a list of
    frames (PIL images / 3-D arrays) one video, and other lists (also per-sample nested lists) are flattened.
    """
    if isinstance(videos, (str, os.PathLike)):
        return [videos]
    if isinstance(videos, np.ndarray):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
    if _is_frame(videos):
        return [np.asarray(videos)[None] if isinstance(videos, np.ndarray) else [videos]]
    if not isinstance(videos, (list, tuple)):
        raise TypeError(
            f"unsupported video input {type(videos).__name__}; pass a file path, a uint8 array [F, H, W, 3], "
            "a list of frames, or a list of those"
        )
    if videos and all(_is_frame(item) for item in videos):
        return [list(videos)]
    flat: list[Any] = []
    for item in videos:
        if isinstance(item, (list, tuple)) and not item:
            continue
        flat.extend(flatten_videos(item))
    return flat


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return f"{type(source).__name__} of {len(source)} frames"
