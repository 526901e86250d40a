"""The parameter tree: one declaration of every weight's shape and logical axes.

Params are a plain nested dict of arrays (a pytree). This module declares, per leaf, its shape and
the logical name of each axis; sharding (`ov_jax.sharding`), loading (`ov_jax.loading`), random
initialisation and abstract 72B planning all read the same declaration. Leaves are plain arrays today
and may become quantized arrays later (int8/int4 weight-only): code that consumes params goes
through the helpers in `ov_jax.modeling.layers`.

Layout (``L`` stacked layers, scanned over):
  vision.patch_embed.kernel [14,14,C,Dv] (HWIO)   .bias [Dv]
  vision.pos_embed [729,Dv]
  vision.layers.{ln1,ln2}.{scale,bias} [L,Dv]
  vision.layers.{q,k,v}.kernel [L,Dv,h,hd] .bias [L,h,hd];  o.kernel [L,h,hd,Dv] .bias [L,Dv]
  vision.layers.fc1.kernel [L,Dv,F] .bias [L,F];  fc2.kernel [L,F,Dv] .bias [L,Dv]
  vision.post_ln.{scale,bias} [Dv]   (kept for round trips; LLaVA-OneVision does not use it)
  projector.linear_1.kernel [Dv*k,H] .bias [H];  projector.linear_2.kernel [H,H] .bias [H]
  image_newline [H]
  text.embed [V,H]
  text.layers.{input_norm,post_norm}.scale [L,H]
  text.layers.q.kernel [L,H,nh,hd] .bias [L,nh,hd];  k,v: [L,H,nkv,hd] / [L,nkv,hd];  o.kernel [L,nh,hd,H]
  text.layers.{gate,up}.kernel [L,H,I];  down.kernel [L,I,H]
  text.norm.scale [H]
  text.lm_head.kernel [H,V]   (absent when the checkpoint ties it to text.embed)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axis names of one weight."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _dense(n_in: int, n_out: int, ax_in: str, ax_out: str, *, layers: int | None = None, bias: bool = True):
    pre = (layers,) if layers else ()
    pre_ax = ("layers",) if layers else ()
    d = {"kernel": ParamSpec(pre + (n_in, n_out), pre_ax + (ax_in, ax_out))}
    if bias:
        d["bias"] = ParamSpec(pre + (n_out,), pre_ax + (ax_out,))
    return d


def _norm(dim: int, ax: str, *, layers: int | None = None, bias: bool) -> dict[str, ParamSpec]:
    pre = (layers,) if layers else ()
    pre_ax = ("layers",) if layers else ()
    d = {"scale": ParamSpec(pre + (dim,), pre_ax + (ax,))}
    if bias:
        d["bias"] = ParamSpec(pre + (dim,), pre_ax + (ax,))
    return d


def _attention(dim: int, heads: int, kv_heads: int, head_dim: int, layers: int, *, embed_ax: str,
               heads_ax: str, kv_ax: str, o_bias: bool) -> dict[str, Any]:
    def proj(n):
        ax = heads_ax if n == heads else kv_ax
        return {
            "kernel": ParamSpec((layers, dim, n, head_dim), ("layers", embed_ax, ax, "head_dim")),
            "bias": ParamSpec((layers, n, head_dim), ("layers", ax, "head_dim")),
        }

    o = {"kernel": ParamSpec((layers, heads, head_dim, dim), ("layers", heads_ax, "head_dim", embed_ax))}
    if o_bias:
        o["bias"] = ParamSpec((layers, dim), ("layers", embed_ax))
    return {"q": proj(heads), "k": proj(kv_heads), "v": proj(kv_heads), "o": o}


def param_specs(config: OneVisionConfig) -> dict[str, Any]:
    """Nested dict of :class:`ParamSpec` mirroring the params tree for ``config``."""
    v, t = config.vision, config.text
    lv, lt = v.num_hidden_layers, t.num_hidden_layers
    p = v.patch_size
    vision = {
        "patch_embed": {
            "kernel": ParamSpec((p, p, v.num_channels, v.hidden_size), (None, None, None, "vision_embed")),
            "bias": ParamSpec((v.hidden_size,), ("vision_embed",)),
        },
        "pos_embed": ParamSpec((v.num_patches, v.hidden_size), (None, "vision_embed")),
        "layers": {
            "ln1": _norm(v.hidden_size, "vision_embed", layers=lv, bias=True),
            **_attention(v.hidden_size, v.num_attention_heads, v.num_attention_heads, v.head_dim, lv,
                         embed_ax="vision_embed", heads_ax="vision_heads", kv_ax="vision_heads", o_bias=True),
            "ln2": _norm(v.hidden_size, "vision_embed", layers=lv, bias=True),
            "fc1": _dense(v.hidden_size, v.intermediate_size, "vision_embed", "vision_mlp", layers=lv),
            "fc2": _dense(v.intermediate_size, v.hidden_size, "vision_mlp", "vision_embed", layers=lv),
        },
        "post_ln": _norm(v.hidden_size, "vision_embed", bias=True),
    }
    bias = config.multimodal_projector_bias
    projector = {
        "linear_1": _dense(config.projector_in_dim, t.hidden_size, "vision_embed", "mlp", bias=bias),
        "linear_2": _dense(t.hidden_size, t.hidden_size, "mlp", "embed", bias=bias),
    }
    text = {
        "embed": ParamSpec((t.vocab_size, t.hidden_size), ("vocab", "embed")),
        "layers": {
            "input_norm": _norm(t.hidden_size, "embed", layers=lt, bias=False),
            **_attention(t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, lt,
                         embed_ax="embed", heads_ax="heads", kv_ax="kv_heads", o_bias=False),
            "post_norm": _norm(t.hidden_size, "embed", layers=lt, bias=False),
            "gate": _dense(t.hidden_size, t.intermediate_size, "embed", "mlp", layers=lt, bias=False),
            "up": _dense(t.hidden_size, t.intermediate_size, "embed", "mlp", layers=lt, bias=False),
            "down": _dense(t.intermediate_size, t.hidden_size, "mlp", "embed", layers=lt, bias=False),
        },
        "norm": _norm(t.hidden_size, "embed", bias=False),
    }
    if not config.lm_head_tied:
        text["lm_head"] = {"kernel": ParamSpec((t.hidden_size, t.vocab_size), ("embed", "vocab"))}
    return {
        "vision": vision,
        "projector": projector,
        "image_newline": ParamSpec((t.hidden_size,), ("embed",)),
        "text": text,
    }


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(config: OneVisionConfig, dtype: Any = jnp.float32) -> Params:
    """``jax.ShapeDtypeStruct`` tree: for AOT compilation and memory planning without weights."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(config), is_leaf=is_spec)


def logical_axes(config: OneVisionConfig) -> Params:
    """Tree of logical axis-name tuples, same structure as the params."""
    return jax.tree.map(lambda s: s.axes, param_specs(config), is_leaf=is_spec)


def random_params(config: OneVisionConfig, seed: int = 0, dtype: Any = np.float32, scale: float = 0.02) -> Params:
    """Random host (numpy) weights: norms near 1, small biases. For benchmarks and shape tests only."""
    rng = np.random.default_rng(seed)

    def init(path, spec: ParamSpec):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            x = 1.0 + 0.1 * rng.standard_normal(spec.shape, dtype=np.float32)
        else:
            x = scale * rng.standard_normal(spec.shape, dtype=np.float32)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(init, param_specs(config), is_leaf=is_spec)


def count_params(tree: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
