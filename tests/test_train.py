"""Training: loss and gradients against transformers + torch (float32, tiny checkpoint), freezing, AdamW."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from ov_jax import train  # noqa: E402
from ov_jax.model import LlavaOnevision  # noqa: E402
from train_helpers import mixed_batch, norm_relative, torch_loss_and_grads  # noqa: E402

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4  # per tensor: |g_ours - g_torch|_F / |g_torch|_F


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    return ref, LlavaOnevision.from_pretrained(tiny_ckpt)


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_loss_and_grads_match_transformers(pair, padding):
    """Anyres image, two-image sample, video and text rows in one batch; every gradient tensor compared."""
    ref, ours = pair
    inputs, labels = mixed_batch(ours.config, np.random.default_rng(0), padding=padding)
    hf_loss, hf_grads = torch_loss_and_grads(ref, ours.config, inputs, labels)
    loss, grads = train.loss_and_grad(ours, labels=labels, **inputs)
    assert abs(float(loss) - hf_loss) <= LOSS_TOL, (float(loss), hf_loss)
    assert jax.tree.structure(grads) == jax.tree.structure(ours.params)
    ours_flat, hf_flat = _flat(grads), _flat(hf_grads)
    # SigLIP has no RoPE, so softmax is invariant to the key bias: its exact gradient is 0 and both sides hold
    # only rounding noise (float64 torch: 2e-15), checked in absolute terms
    zero = "['vision']['layers']['k']['bias']"
    assert np.linalg.norm(ours_flat.pop(zero)) <= 1e-5 and np.linalg.norm(hf_flat.pop(zero)) <= 1e-5
    errors = {k: norm_relative(ours_flat[k], hf_flat[k]) for k in hf_flat}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, (worst, errors[worst])
    # the gradients are real: every tower receives signal (post_ln is unused by LLaVA-OneVision: zero)
    for key in ("['vision']['layers']['q']['kernel']", "['projector']['linear_1']['kernel']", "['image_newline']",
                "['text']['layers']['down']['kernel']", "['text']['lm_head']['kernel']"):
        assert np.linalg.norm(hf_flat[key]) > 1e-3, key
    assert np.abs(ours_flat["['vision']['post_ln']['scale']"]).max() == 0.0
