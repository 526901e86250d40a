"""Shared test set-up: 8 simulated CPU devices (set before jax starts) and tiny checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- tiny random checkpoints (ov_jax.tiny), built once per test session -------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path to a tiny random LLaVA-OneVision checkpoint (transformers layout, separate lm_head)."""
    from ov_jax.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_ckpt_tied(tmp_path_factory):
    """Like ``tiny_ckpt`` but with ``tie_word_embeddings=True`` (no lm_head in the file, as the 0.5B)."""
    from ov_jax.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt_tied"), tie_word_embeddings=True)


def reference_processor(path):
    """The transformers 5.24 reference processor (images + text) for a checkpoint directory.

    Use this instead of ``AutoProcessor.from_pretrained(path)``: without torchvision (our CPU setup),
    ``AutoProcessor`` raises ImportError because ``LlavaOnevisionVideoProcessor`` requires torchvision, and
    ``LlavaOnevisionProcessor(video_processor=None, ...)`` fails its class check. This subclass drops the
    ``video_processor`` argument, so ``from_pretrained`` reads everything else exactly as ``AutoProcessor``
    would: ``AutoImageProcessor`` picks ``LlavaOnevisionImageProcessorPil`` (the PIL/NumPy backend that is
    the reference for this port), the tokenizer is ``Qwen2Tokenizer`` from tokenizer.json, and
    num_image_tokens / vision_feature_select_strategy / vision_aspect_ratio / chat template come from the
    checkpoint. Calls with ``videos=`` are not supported (the reference video processor needs torchvision).
    """
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                             chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)

    return LlavaOnevisionImageTextProcessor.from_pretrained(path)
