"""Cross-check ov_jax against transformers (PyTorch) stage by stage, on one checkpoint and one prompt.

Both models load the same checkpoint (the JAX side may load another copy, e.g. the converted one) and get
the same inputs: ov_jax's processor output, after checking it against transformers' processor. Each stage
is computed by each side from its own previous stage, as in real use:

    processor input_ids / pixel_values → vision features (the selected hidden state) → projector →
    packed image and video features (anyres unpad, anyres_max cap, newlines, video pooling) → logits →
    greedy tokens

For each stage the table gives the max abs diff, the max rel diff (max abs diff / max |reference|) and,
for logits and tokens, top-1 agreement. A stage fails when its max abs diff exceeds the tolerance; greedy
tokens fail when they differ, unless the first difference is a near-tie (the two candidate tokens' logits
within the tolerance of each other in ov_jax's logits).

Videos: transformers' video processor needs torchvision; both models get ov_jax's ``pixel_values_videos``
(the table says so), and the ``<video>`` expansion of the reference ids uses transformers' own
``replace_video_token``. torch and transformers are imported only when :func:`compare` runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

# Max abs diff per stage by dtype. The tests hold float32 to 1e-4 on tiny models (the project's parity target);
# the default leaves room for the rounding noise of deeper models over long prompts. Half precisions are loose
# sanity bounds: two correct implementations round differently, and the difference grows through the layers.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 2.0, "float16": 0.25}
DEFAULT_PROMPT = {"image": "Describe this image.", "video": "Describe this video.", "text": "Tell me a story."}


@dataclasses.dataclass
class Stage:
    """One row of the comparison. ``passed`` None = informational (not checked)."""

    name: str
    shape: str
    max_abs: float | None = None
    max_rel: float | None = None
    top1: float | None = None
    passed: bool | None = True
    note: str = ""


@dataclasses.dataclass
class Comparison:
    stages: list[Stage]
    tolerance: float
    header: str

    @property
    def passed(self) -> bool:
        return all(stage.passed is not False for stage in self.stages)

    @property
    def failed(self) -> list[str]:
        return [stage.name for stage in self.stages if stage.passed is False]

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def table(self) -> str:
        """The per-stage table and a verdict line."""
        def num(x):
            return "-" if x is None else f"{x:.2e}"

        rows = [("stage", "shape", "max abs", "max rel", "top-1", "status", "note")]
        for s in self.stages:
            status = {True: "ok", False: "FAIL", None: "info"}[s.passed]
            top1 = "-" if s.top1 is None else f"{100 * s.top1:.2f}%"
            rows.append((s.name, s.shape, num(s.max_abs), num(s.max_rel), top1, status, s.note))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = [self.header] + ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in rows]
        if self.passed:
            lines.append(f"PASS: every stage within max abs diff {self.tolerance:g}")
        else:
            lines.append(f"FAIL: {', '.join(self.failed)} over max abs diff {self.tolerance:g}")
        return "\n".join(line.rstrip() for line in lines)


def _reference():
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ImportError(f"the compare tool needs PyTorch and transformers, the reference implementation ({err}); "
                          "install them with: pip install 'ov-jax[test]'") from None
    return torch, transformers


def reference_processor(path):
    """transformers' processor for images + text, without the torchvision-only video processor.

    ``AutoProcessor`` fails without torchvision (``LlavaOnevisionVideoProcessor`` needs it) and
    ``LlavaOnevisionProcessor(video_processor=None, ...)`` fails its class check; this subclass drops the
    video processor and reads everything else from the checkpoint as ``AutoProcessor`` would
    (``LlavaOnevisionImageProcessorPil``, the PIL backend this port reproduces; ``Qwen2Tokenizer``; token
    counts, select strategy, aspect ratio and chat template from the checkpoint). The tests use it too.
    Videos may still be passed as already preprocessed ``pixel_values_videos`` ``[V, F, 3, H, W]``: they
    are taken as they are, and transformers' own code expands the ``<video>`` tokens for them.
    """
    from transformers import BatchFeature, LlavaOnevisionProcessor

    def preprocessed_videos(videos, **kwargs):
        return BatchFeature({"pixel_values_videos": np.asarray(videos)})

    class ImageTextProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                             chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)
            self.video_processor = preprocessed_videos

    return ImageTextProcessor.from_pretrained(path)


def _diff(ours, ref) -> tuple[float, float]:
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ov_jax {a.shape} vs transformers {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    max_abs = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    return max_abs, (max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf))


def _numeric_stage(name: str, ours, ref, tolerance: float, note: str = "", top1: bool = False) -> Stage:
    max_abs, max_rel = _diff(ours, ref)
    agreement = None
    if top1:
        agreement = float((np.asarray(ours).argmax(-1) == np.asarray(ref).argmax(-1)).mean())
    return Stage(name, str(tuple(np.shape(ref))), max_abs, max_rel, agreement, max_abs <= tolerance, note)


def _until_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    out = []
    for token in tokens:
        out.append(int(token))
        if token in stop_ids:
            break
    return out


def compare(model: str | os.PathLike, *, jax_model: str | os.PathLike | None = None, images: Sequence[Any] = (),
            video: str | None = None, prompt: str | None = None, num_frames: int = 8, dtype: str = "float32",
            tolerance: float | None = None, max_new_tokens: int = 8, progress: bool = True) -> Comparison:
    """Run one prompt (with PIL ``images`` and/or a ``video`` path) through both implementations.

    ``model``: a transformers checkpoint directory or hub id. ``jax_model``: what ov_jax loads (default
    ``model``; a converted directory works). ``tolerance``: max abs diff per stage (default by dtype,
    :data:`DEFAULT_TOLERANCE`). ``max_new_tokens=0`` skips the greedy-token stage.
    """
    from tqdm.auto import tqdm

    from ov_jax.checkpoint import is_orbax_checkpoint
    from ov_jax.hub import resolve_checkpoint
    from ov_jax.loading import plan_checkpoint
    from ov_jax.processing.chat import single_turn

    if dtype not in DEFAULT_TOLERANCE:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DEFAULT_TOLERANCE)}")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    path = resolve_checkpoint(model)
    if is_orbax_checkpoint(path):
        raise ValueError(f"{path} is a converted ov_jax checkpoint, which transformers cannot read: pass the original "
                         "checkpoint as the model and the converted one as jax_model (--jax-model)")
    plan_checkpoint(path)  # config.json and weight headers, so damage is named here and not by transformers
    jax_path = path if jax_model is None else resolve_checkpoint(jax_model)
    torch, transformers = _reference()
    kind = "video" if video is not None else "image" if images else "text"
    prompt = prompt or DEFAULT_PROMPT[kind]
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()  # its weight-loading bar too
    with tqdm(total=8, desc="comparing", unit="stage", disable=not progress, leave=False,
              bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]") as bar:
        started = []

        def step(label: str):  # a new stage starts: the previous one is done
            bar.update(len(started[-1:]))
            started.append(label)
            bar.set_postfix_str(label)

        try:
            stages, inputs = _run_stages(path, jax_path, single_turn(prompt, images, video), video, num_frames,
                                         dtype, tolerance, max_new_tokens, step)
        finally:
            if hf_bars:
                transformers.utils.logging.enable_progress_bar()
        bar.update()
    header = (f"ov_jax vs transformers {transformers.__version__} (torch {torch.__version__}) | {path}"
              f"{'' if jax_path == path else ' (ov_jax: ' + str(jax_path) + ')'} | {dtype} | "
              f"{inputs['input_ids'].shape[1]} prompt tokens")
    return Comparison(stages, tolerance, header)


def _run_stages(path, jax_path, messages, video, num_frames, dtype, tolerance, max_new_tokens, step
                ) -> tuple[list[Stage], dict]:
    """Every stage in order; ``step(label)`` advances the progress bar. Returns the stages and the inputs."""
    torch, transformers = _reference()
    step("processors")
    stages, inputs = _compare_processors(path, jax_path, messages, video, num_frames, tolerance)
    step("loading transformers")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    step("loading ov_jax")
    from ov_jax.model import LlavaOnevision

    ours = LlavaOnevision.from_pretrained(jax_path, dtype=dtype)
    torch_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in torch_inputs:
            torch_inputs[key] = torch_inputs[key].to(torch_dtype)

    with torch.no_grad():
        stages += _compare_media(ref, ours, inputs, torch_inputs, tolerance, step)
        step("logits")
        stages.append(_compare_logits(ref, ours, inputs, torch_inputs, tolerance))
        step("greedy tokens")
        if max_new_tokens > 0:
            from ov_jax.generation import GenerationConfig

            generation = GenerationConfig.from_pretrained(path, ours.config.text)
            stop_ids, pad_id = list(generation.eos_token_id), generation.pad_id
            stages.append(_compare_tokens(ref, ours, inputs, torch_inputs, max_new_tokens, stop_ids, pad_id, tolerance))
    return stages, inputs


def _compare_processors(path, jax_path, messages, video, num_frames, tolerance) -> tuple[list[Stage], dict]:
    """ids and pixels from both processors; returns the stages and ov_jax's inputs (fed to both models)."""
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    ours_proc = LlavaOnevisionProcessor.from_pretrained(jax_path)
    ref_proc = reference_processor(path)
    frames = {"num_frames": num_frames} if video is not None else {}
    inputs = dict(ours_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                **frames))
    text = ref_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [item["image"] for item in messages[0]["content"] if item["type"] == "image"]
    ref_inputs = ref_proc(text=[text], images=images or None, videos=inputs.get("pixel_values_videos"),
                          return_tensors="np")

    ours_ids, ref_ids = np.asarray(inputs["input_ids"]), np.asarray(ref_inputs["input_ids"])
    same_shape = ours_ids.shape == ref_ids.shape
    differing = int((ours_ids != ref_ids).sum()) if same_shape else None
    note = (f"identical ({ours_ids.shape[1]} tokens)" if differing == 0 else
            f"{differing} of {ours_ids.size} ids differ" if same_shape else
            f"lengths differ: ov_jax {ours_ids.shape[1]}, transformers {ref_ids.shape[1]}")
    stages = [Stage("processor input_ids", str(ours_ids.shape), passed=differing == 0, note=note)]
    if "pixel_values" in inputs:
        same_sizes = np.array_equal(inputs["image_sizes"], ref_inputs["image_sizes"])
        stage = _numeric_stage("processor pixel_values", inputs["pixel_values"], ref_inputs["pixel_values"], tolerance,
                               note="image_sizes identical" if same_sizes else "image_sizes DIFFER")
        stage.passed = stage.passed and same_sizes
        stages.append(stage)
    if video is not None:
        stages.append(Stage("processor pixel_values_videos", str(inputs["pixel_values_videos"].shape), passed=None,
                            note="not compared: transformers' video processor needs torchvision; both models get "
                                 "ov_jax's frames"))
    return stages, inputs


def _compare_media(ref, ours, inputs, torch_inputs, tolerance, step) -> list[Stage]:
    """Vision features, projector and packed features, each side from its own previous stage."""
    import jax.numpy as jnp
    import torch

    from ov_jax.media_plan import build_media_plan
    from ov_jax.modeling import llava, siglip

    plan = build_media_plan(inputs["input_ids"], ours.config, inputs.get("pixel_values"), inputs.get("image_sizes"),
                            inputs.get("batch_num_images"), inputs.get("pixel_values_videos"))
    if plan.num_tower_inputs == 0:
        for label in ("vision tower", "projector", "packing"):
            step(label)
        return []
    config = ref.config
    step("vision tower")
    tiles = plan.tower_inputs
    ours_hidden = siglip.vision_features(ours.params["vision"], jnp.asarray(tiles), ours.config, ours.dtype)
    hidden_states = ref.model.vision_tower(torch.from_numpy(tiles).to(ref.dtype), output_hidden_states=True,
                                           return_dict=True).hidden_states
    layers = config.vision_feature_layer
    ref_hidden = (hidden_states[layers] if isinstance(layers, int)
                  else torch.cat([hidden_states[i] for i in layers], dim=-1))
    note = f"{len(tiles)} tiles/frames, layer {layers}"
    stages = [_numeric_stage("vision features", ours_hidden, ref_hidden.float().numpy(), tolerance, note)]
    step("projector")
    ours_projected = llava.project(ours.params["projector"], ours_hidden)
    ref_projected = ref.model.multi_modal_projector(ref_hidden)
    stages.append(_numeric_stage("projector", ours_projected, ref_projected.float().numpy(), tolerance))
    step("packing")
    rows = np.asarray(llava.gather_media(ours.params, ours_projected, plan.tap_index, plan.tap_weight))
    ids = np.asarray(inputs["input_ids"])
    if "pixel_values" in inputs:
        packed = ref.model.get_image_features(
            torch_inputs["pixel_values"], torch_inputs["image_sizes"], vision_feature_layer=layers,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
            batch_num_images=torch_inputs.get("batch_num_images")).pooler_output
        ref_rows = torch.cat(list(packed)).float().numpy()
        stages.append(_numeric_stage("packed image features", rows[ids == config.image_token_id], ref_rows, tolerance))
    if "pixel_values_videos" in inputs:
        packed = ref.model.get_video_features(
            torch_inputs["pixel_values_videos"], vision_feature_layer=layers,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
        ref_rows = packed.reshape(-1, packed.shape[-1]).float().numpy()
        stages.append(_numeric_stage("packed video features", rows[ids == config.video_token_id], ref_rows, tolerance))
    return stages


LOGITS_CHUNK = 256  # positions per logits block: [B, 256, V] float32 at a time on each side


def _compare_logits(ref, ours, inputs, torch_inputs, tolerance) -> Stage:
    """Logits of every position, block by block from each side's final hidden states.

    transformers' logits are its ``lm_head`` applied to ``model(...).last_hidden_state`` and ov_jax's are
    ``lm_head.lm_logits`` of ``hidden_states``, so comparing them :data:`LOGITS_CHUNK` positions at a time gives
    the same numbers as comparing the full ``[B, T, V]`` tensors without either side ever holding them.
    """
    import jax

    from ov_jax.modeling.lm_head import lm_logits

    ours_hidden = ours.hidden_states(**inputs)
    ref_hidden = ref.model(**torch_inputs).last_hidden_state
    logits = jax.jit(lm_logits)
    max_abs = scale = 0.0
    agree = 0
    for start in range(0, ours_hidden.shape[1], LOGITS_CHUNK):
        ours_block = np.asarray(logits(ours.params["text"], ours_hidden[:, start:start + LOGITS_CHUNK]))
        ref_block = ref.lm_head(ref_hidden[:, start:start + LOGITS_CHUNK]).float().numpy()
        if ours_block.shape != ref_block.shape:
            raise ValueError(f"logits shapes differ: ov_jax {ours_block.shape} vs transformers {ref_block.shape}")
        max_abs = max(max_abs, float(np.abs(ours_block.astype(np.float64) - ref_block).max()))
        scale = max(scale, float(np.abs(ref_block).max()))
        agree += int((ours_block.argmax(-1) == ref_block.argmax(-1)).sum())
    b, t = ours_hidden.shape[:2]
    max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
    shape = str((b, t, ref.lm_head.out_features))
    return Stage("logits", shape, max_abs, max_rel, agree / (b * t), max_abs <= tolerance)


def _compare_tokens(ref, ours, inputs, torch_inputs, max_new_tokens, stop_ids, pad_id, tolerance) -> Stage:
    """Greedy continuations of both; a first difference on a near-tie (in ov_jax's logits) still passes."""
    ref_out = ref.generate(**torch_inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                           pad_token_id=pad_id)
    ref_tokens = _until_stop(ref_out[0, inputs["input_ids"].shape[1]:].tolist(), stop_ids)
    ours_tokens = _until_stop(np.asarray(ours.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                                        stop_token_ids=stop_ids, pad_token_id=pad_id))[0].tolist(),
                              stop_ids)
    length = max(len(ref_tokens), len(ours_tokens))
    agree = sum(a == b for a, b in zip(ours_tokens, ref_tokens)) / length
    shape = f"{len(ours_tokens)} / {len(ref_tokens)} tokens"
    if ours_tokens == ref_tokens:
        return Stage("greedy tokens", shape, top1=agree, note="identical")
    first = next((i for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens)) if a != b),
                 min(len(ours_tokens), len(ref_tokens)))
    note = f"first difference at new token {first}"
    margin = _tie_margin(ours, inputs, ours_tokens, ref_tokens, first)
    if margin is not None and margin <= tolerance:
        return Stage("greedy tokens", shape, top1=agree, note=f"{note}: a near-tie (logit margin {margin:.1e})")
    return Stage("greedy tokens", shape, top1=agree, passed=False,
                 note=note + ("" if margin is None else f" (logit margin {margin:.1e})"))


def _tie_margin(ours, inputs, ours_tokens, ref_tokens, first) -> float | None:
    """ov_jax's logit of its own choice minus that of transformers' choice at the first difference."""
    if first >= min(len(ours_tokens), len(ref_tokens)):
        return None
    ids = np.asarray(inputs["input_ids"])
    prefix = np.concatenate([ids, np.asarray([ours_tokens[:first]], ids.dtype)], axis=1)
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    try:
        logits = np.asarray(ours(prefix, **media, logits_to_keep=1).logits)[0, -1]
    except ValueError:  # a generated token is a media placeholder: the prompt no longer matches the media
        return None
    return float(logits[ours_tokens[first]] - logits[ref_tokens[first]])
