"""SigLIP vision tower as LLaVA-OneVision uses it: selected hidden state(s), no post-layernorm.

Only the layers up to the deepest selected one are computed (REFERENCE_NOTES §2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ov_jax.config import OneVisionConfig
from ov_jax.modeling.layers import gelu_tanh, layer_norm, remat_layer
from ov_jax.nn.attention import AttentionMeta, attention
from ov_jax.nn.linear import linear
from ov_jax.sharding import active_mesh, constrain


def patch_embed(params: dict, pixels: jax.Array, config: OneVisionConfig, dtype) -> jax.Array:
    """``pixels [N, C, 384, 384]`` (NCHW, as the processor emits) → tokens ``[N, 729, Dv]``.

    The 14×14 stride-14 conv only sees the top-left 378×378 pixels; it is done as one matmul over
    patches flattened in (ky, kx, c) order, matching the HWIO kernel.
    """
    v = config.vision
    p, s = v.patch_size, v.patches_per_side
    n = pixels.shape[0]
    x = pixels[:, :, : s * p, : s * p].astype(dtype)
    x = x.reshape(n, v.num_channels, s, p, s, p).transpose(0, 2, 4, 3, 5, 1)
    x = x.reshape(n, s * s, p, p, v.num_channels)
    x = linear(x, params["patch_embed"], n_in=3)
    return x + params["pos_embed"].astype(dtype)


def encoder_layer(x: jax.Array, lp: dict, eps: float, attention_backend: str = "xla") -> jax.Array:
    """Pre-LN block: bidirectional attention (``attention_backend``, `ov_jax.nn.backends`), then tanh-GELU MLP,
    all projections with bias."""
    h = layer_norm(x, lp["ln1"], eps)
    q, k, v = (linear(h, lp[name]) for name in ("q", "k", "v"))
    x = x + linear(attention(q, k, v, AttentionMeta(), attention_backend), lp["o"], n_in=2)
    h = layer_norm(x, lp["ln2"], eps)
    return x + linear(gelu_tanh(linear(h, lp["fc1"])), lp["fc2"])


def vision_features(params: dict, pixels: jax.Array, config: OneVisionConfig, dtype=jnp.float32,
                    attention: str = "xla", *, remat: str | None = None) -> jax.Array:
    """Selected hidden state(s) of the tower: ``[N, 729, Dv · len(feature_layers)]``.

    ``attention``: a resolved backend name (`ov_jax.nn.backends`), e.g. ``"cpu"``. ``remat``: a
    `layers.REMAT_POLICIES` name for the layer scan. Tokens are constrained to the rules table's
    ``tower_tokens`` sharding when a mesh is active."""
    eps = config.vision.layer_norm_eps
    used = config.vision_layers_used
    layers = params["layers"]
    if used < config.vision.num_hidden_layers:
        layers = jax.tree.map(lambda a: a[:used], layers)
    mesh = active_mesh()
    x = constrain(patch_embed(params, pixels, config, dtype), mesh, "tower_tokens")

    def layer(h, lp):
        return constrain(encoder_layer(h, lp, eps, attention), mesh, "tower_tokens")

    wanted = config.feature_layers
    if wanted == (used,):
        x, _ = jax.lax.scan(remat_layer(lambda h, lp: (layer(h, lp), None), remat), x, layers)
        return x
    _, hidden = jax.lax.scan(remat_layer(lambda h, lp: (layer(h, lp),) * 2, remat), x, layers)
    states = jnp.concatenate([x[None], hidden], axis=0)  # index i = output of layer i (0 = embeddings)
    return jnp.concatenate([states[i] for i in wanted], axis=-1)
