"""Training: loss and gradients against transformers + torch `.backward()` (float32, tiny checkpoint)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from ov_jax import train  # noqa: E402
from ov_jax.model import LlavaOnevision  # noqa: E402
from train_helpers import in_torch_layout, mixed_batch, norm_relative, torch_loss_and_grads  # noqa: E402

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4  # per torch tensor (each layer on its own): |g_ours - g_torch|_F / |g_torch|_F


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    return ref, LlavaOnevision.from_pretrained(tiny_ckpt)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_loss_and_grads_match_transformers(pair, padding):
    """Anyres image, two-image sample, video and text rows in one batch; every gradient tensor compared in
    torch's layout (ours mapped by `ov_jax.export.hf_state_dict`)."""
    ref, ours = pair
    inputs, labels = mixed_batch(ours.config, np.random.default_rng(0), padding=padding)
    hf_loss, hf_grads = torch_loss_and_grads(ref, inputs, labels)
    loss, grads = train.loss_and_grad(ours, labels=labels, **inputs)
    assert abs(float(loss) - hf_loss) <= LOSS_TOL, (float(loss), hf_loss)
    assert jax.tree.structure(grads) == jax.tree.structure(ours.params)
    mine = in_torch_layout(ours.config, grads)
    assert mine.keys() == hf_grads.keys()
    # SigLIP has no RoPE, so softmax is invariant to the key bias: its exact gradient is 0 and both sides hold
    # only rounding noise (float64 torch: 2e-15), checked in absolute terms
    for name in [k for k in mine if k.endswith("self_attn.k_proj.bias") and k.startswith("vision.")]:
        assert np.linalg.norm(mine.pop(name)) <= 1e-5 and np.linalg.norm(hf_grads.pop(name)) <= 1e-5
    errors = {k: norm_relative(mine[k], hf_grads[k]) for k in hf_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, (worst, errors[worst])
    # the gradients are real: every tower receives signal (post_layernorm is unused by LLaVA-OneVision: zero)
    for name in ("vision.encoder.layers.0.self_attn.q_proj.weight", "projector.linear_1.weight", "image_newline",
                 "text.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert np.linalg.norm(hf_grads[name]) > 1e-3, name
    assert np.abs(mine["vision.post_layernorm.weight"]).max() == 0.0
