"""The parameter tree: one declaration of every weight's shape and logical axes.

Params are a plain nested dict of arrays (a pytree). This module declares, per leaf, its shape and
the logical name of each axis; sharding (`ov_jax.sharding`), loading (`ov_jax.loading`), random
initialisation and abstract 72B planning all read the same declaration. A weight is a plain array or a
dict of arrays (``kernel``, ``bias``, LoRA adapters; later quantized values + scales): code that uses a
weight goes through `ov_jax.nn.linear`, and every key of such a dict is declared here (with
``lora=LoraSpec(...)`` for adapters), so sharding, orbax and the tree check handle it unchanged.

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

Quantization (``config.quantization``, `ov_jax.nn.quant`): every quantized weight dict holds integer
``kernel`` values (int8 ``[*in, *out]``; int4 as uint8 ``[*in[:-1], in[-1]/2, *out]``, two values per byte
along the last input axis) and a float ``kernel_scale [L?, G, *out]`` (``G`` groups of the flattened input,
1 for int8; the group axis is replicated, the output axes shard as the kernel's); int4 adds the zero points
``kernel_zero``, shaped, sharded and typed as the scale. ``text.embed`` becomes ``{"kernel": [V, H or H/2],
"kernel_scale": [V, G]}`` (groups along H; int4 with ``kernel_zero [V, G]``).

LoRA (``param_specs(config, lora=LoraSpec(rank, alpha, targets))``): every weight dict whose dotted path
(e.g. ``text.layers.q``) matches ``targets`` also holds ``lora_a [L?, *in, r]`` (input axes as the kernel's),
``lora_b [L?, r, *out]`` (output axes as the kernel's) and ``lora_scale [L?]`` (= alpha / rank).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ov_jax.config import OneVisionConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axis names of one weight. ``n_in``: for a kernel, how many of its axes (after the
    leading ``layers`` axis, if any) are input axes contracted with the activations; the rest are outputs."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_in: int = 1
    dtype: str | None = None  # a fixed storage dtype (quantized values); None = the params' float dtype

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r"""LoRA adapters: ``rank`` r, ``alpha`` (the update is scaled by alpha / r) and ``targets``, a regular
    expression that must match the whole dotted path of a weight dict (``re.fullmatch``), e.g.
    ``r"text\.layers\.(q|k|v|o|gate|up|down)"`` for every linear of the language model."""

    rank: int
    alpha: float
    targets: str

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(f"LoRA targets {self.targets!r} is not a regular expression: {err}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


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

    o = {"kernel": ParamSpec((layers, heads, head_dim, dim), ("layers", heads_ax, "head_dim", embed_ax), n_in=2)}
    if o_bias:
        o["bias"] = ParamSpec((layers, dim), ("layers", embed_ax))
    return {"q": proj(heads), "k": proj(kv_heads), "v": proj(kv_heads), "o": o}


def param_specs(config: OneVisionConfig, lora: LoraSpec | None = None) -> dict[str, Any]:
    """Nested dict of :class:`ParamSpec` mirroring the params tree for ``config`` (with ``lora``'s adapters)."""
    v, t = config.vision, config.text
    lv, lt = v.num_hidden_layers, t.num_hidden_layers
    p = v.patch_size
    vision = {
        "patch_embed": {
            "kernel": ParamSpec((p, p, v.num_channels, v.hidden_size), (None, None, None, "vision_embed"), n_in=3),
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
    specs = {
        "vision": vision,
        "projector": projector,
        "image_newline": ParamSpec((t.hidden_size,), ("embed",)),
        "text": text,
    }
    stored = specs
    if config.quantization is not None:
        from ov_jax.nn.quant import quantized_specs

        stored = quantized_specs(specs, config.quantization)
    return stored if lora is None else _with_lora(stored, lora, specs)


def weight_paths(specs: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every weight dict (one holding a ``kernel``) of a spec or params tree, by dotted path."""
    found = {}
    for key, value in specs.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            if "kernel" in value:
                found[path] = value
            else:
                found.update(weight_paths(value, path))
    return found


def lora_targets(specs: dict[str, Any], lora: LoraSpec) -> list[str]:
    """Dotted paths of the weight dicts ``lora.targets`` selects; an error when it selects none."""
    paths = weight_paths(specs)
    chosen = [p for p in paths if re.fullmatch(lora.targets, p)]
    if not chosen:
        raise ValueError(f"LoRA targets {lora.targets!r} match no weight (a regex must match a whole weight path); "
                         f"weights are: {', '.join(sorted(paths))}")
    return chosen


def _adapter_specs(kernel: ParamSpec, rank: int) -> dict[str, ParamSpec]:
    stacked = kernel.axes[0] == "layers"
    lead = 1 if stacked else 0
    split = lead + kernel.n_in
    pre, pre_ax = kernel.shape[:lead], kernel.axes[:lead]
    return {
        "lora_a": ParamSpec(kernel.shape[:split] + (rank,), kernel.axes[:split] + (None,), n_in=kernel.n_in),
        "lora_b": ParamSpec(pre + (rank,) + kernel.shape[split:], pre_ax + (None,) + kernel.axes[split:]),
        "lora_scale": ParamSpec(pre, pre_ax),
    }


def _with_lora(specs: dict[str, Any], lora: LoraSpec, float_specs: dict[str, Any]) -> dict[str, Any]:
    """``specs`` with adapters on the weights ``lora`` selects, shaped as the weights' float form in
    ``float_specs`` (an int4 kernel packs two values per byte: its stored shape is not the weight's)."""
    out = jax.tree.map(lambda s: s, specs, is_leaf=is_spec)  # a copy of the dict structure
    for path in lora_targets(specs, lora):
        node, weight = out, float_specs
        for key in path.split("."):
            node, weight = node[key], weight[key]
        node.update(_adapter_specs(weight["kernel"] if isinstance(weight, dict) else weight, lora.rank))
    return out


def check_tree(params: Params, config: OneVisionConfig, lora: LoraSpec | None = None) -> None:
    """Raise ``ValueError`` if ``params`` does not have exactly the declared leaves and shapes (and the declared
    dtype where one is fixed: quantized values)."""
    specs = param_specs(config, lora)
    want = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)}
    have = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {k}" for k in want.keys() - have.keys()]
    problems += [f"unexpected {k}" for k in have.keys() - want.keys()]
    problems += [f"{k}: shape {have[k]} != {want[k]}" for k in want.keys() & have.keys() if have[k] != want[k]]
    fixed = {jax.tree_util.keystr(p): jnp.dtype(s.dtype)
             for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec) if s.dtype}
    stored = {jax.tree_util.keystr(p): jnp.dtype(x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    problems += [f"{k}: dtype {stored[k]} != {fixed[k]}" for k in fixed.keys() & stored.keys() if stored[k] != fixed[k]]
    if problems:
        raise ValueError("params do not match the config: " + "; ".join(sorted(problems)))


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(config: OneVisionConfig, dtype: Any = jnp.float32, lora: LoraSpec | None = None) -> Params:
    """``jax.ShapeDtypeStruct`` tree: for AOT compilation and memory planning without weights."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype or dtype), param_specs(config, lora),
                        is_leaf=is_spec)


def logical_axes(config: OneVisionConfig, lora: LoraSpec | None = None) -> Params:
    """Tree of logical axis-name tuples, same structure as the params."""
    return jax.tree.map(lambda s: s.axes, param_specs(config, lora), is_leaf=is_spec)


def random_params(config: OneVisionConfig, seed: int = 0, dtype: Any = np.float32, scale: float = 0.02) -> Params:
    """Random host (numpy) weights: norms near 1, small biases. For benchmarks and shape tests only.
    A quantized ``config`` gets the quantized form of the same random float weights."""
    if config.quantization is not None:
        from ov_jax.nn.quant import quantize_params

        return quantize_params(random_params(config.replace(quantization=None), seed, dtype, scale),
                               config.replace(quantization=None), config.quantization)[0]
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
