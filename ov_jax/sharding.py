"""Device meshes and the one logical-axis rules table, for inference and training alike.

Every weight axis is named in `ov_jax.params.param_specs` (``vocab``, ``embed``, ``heads`` …) and every
activation axis in :data:`ACTIVATION_AXES`. :data:`LOGICAL_RULES` maps those names to the mesh axes
``data``, ``fsdp`` and ``tensor``; :func:`resolve_spec` turns a (names, shape) pair into a
``PartitionSpec`` and never shards a dimension over mesh axes whose size does not divide it: that mesh
axis is dropped for that dimension (the dimension is replicated over it) and the fallback is reported.
This is what keeps a batch of 1 off a 32-way data axis and the 8 KV heads of 72B replicated on a 16-way
tensor axis, instead of failing or padding silently.

A mesh comes from :func:`make_mesh`: a ``jax.sharding.Mesh``, a string ``"data=2,tensor=4"`` (missing axes
have size 1, one axis may be ``-1`` = all remaining devices), a preset name from :data:`MESH_PRESETS`
(``configs/meshes/*.json`` are the same presets as files), or the path of such a json file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from ov_jax.config import OneVisionConfig
from ov_jax.params import LoraSpec, is_spec, param_specs

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axes, in priority order. Weights: embed over fsdp (FSDP/ZeRO-3 when fsdp > 1, a no-op
# for pure inference meshes), heads / kv_heads / mlp / vocab over tensor (Megatron-style: column-parallel
# q/k/v/gate/up/lm_head, row-parallel o/down). The vision tower follows the same pattern (its heads and MLP
# over tensor) and runs data-parallel over tiles, which are its batch. Activations: batch and tiles over the
# data-parallel axes; sequence axes are never sharded.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "tiles": ("data", "fsdp"),
    "length": (),
    "cache_length": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    "vision_embed": ("fsdp",),
    "vision_heads": ("tensor",),
    "vision_mlp": ("tensor",),
}

# Logical names of the engine's activations and of the KV cache ``[L, B, S, nkv, hd]``.
ACTIVATION_AXES: dict[str, tuple[str | None, ...]] = {
    "tokens": ("batch", "length"),  # input_ids, attention mask, positions  [B, T]
    "hidden": ("batch", "length", None),  # embeddings / hidden states  [B, T, H]
    "logits": ("batch", "length", "vocab"),  # [B, T, V]
    "taps": ("batch", "length", None),  # media-plan gather indices / weights  [B, T, 4]
    "tower_inputs": ("tiles", None, None, None),  # tiles and frames  [N, C, H, W]
    "tower_tokens": ("tiles", None, None),  # tower / projector output  [N, 729, D]
    "cache": ("layers", "batch", "cache_length", "kv_heads", "head_dim"),  # stacked [L, B, S, nkv, hd]
    "layer_cache": ("batch", "kv_heads", "cache_length", "head_dim"),  # one layer, heads-major [B, nkv, S, hd]
    "batch_vector": ("batch",),  # per-row scalars: lengths, finished flags, rng  [B]
}

# Mesh shapes per model size (see docs/SCALING.md for why). -1 = all remaining devices.
MESH_PRESETS: dict[str, dict[str, Any]] = {
    "0.5b-dp": {"mesh": {"data": -1}, "model": "0.5b",
                "description": "0.5B (1 GB bf16) fits every chip: pure data parallelism, weights replicated."},
    "7b-tp4": {"mesh": {"data": -1, "tensor": 4}, "model": "7b",
               "description": "7B: tensor=4 divides its 28 heads, 4 KV heads, 18944 MLP and 152128 vocab; "
                              "data takes the remaining devices (data=2 on 8 chips)."},
    "72b-tp8": {"mesh": {"data": -1, "tensor": 8}, "model": "72b",
                "description": "72B on 8xH100 / 8 chips with >= 32 GB: tensor=8 = its 8 KV heads, so the "
                               "KV cache is sharded too (18.2 GB bf16 weights per device)."},
    "72b-tp16": {"mesh": {"data": -1, "tensor": 16}, "model": "72b",
                 "description": "72B on 16 chips (v5e-16, v4-32): tensor=16 exceeds the 8 KV heads, which are "
                                "replicated (k/v weights and KV cache whole on every device)."},
    "72b-fsdp2-tp8": {"mesh": {"data": -1, "fsdp": 2, "tensor": 8}, "model": "72b",
                      "description": "72B on 16 chips keeping the KV cache sharded: tensor=8 over KV heads, "
                                     "fsdp=2 over the embed axis of the weights and the batch."},
}


class MeshError(ValueError):
    """A mesh description that cannot be built on the available devices."""


# --- meshes -------------------------------------------------------------------------------------------------


def parse_mesh_spec(text: str) -> dict[str, int]:
    """``"data=2,tensor=4"`` → ``{"data": 2, "fsdp": 1, "tensor": 4}`` (missing axes are 1)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise MeshError(f"mesh {text!r}: {part!r} is not 'axis=size' with axis one of {MESH_AXES}")
        if name in sizes:
            raise MeshError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh {text!r}: size {value.strip()!r} of axis {name!r} is not an integer") from None
    if not sizes:
        raise MeshError(f"mesh {text!r} names no axis; expected e.g. 'data=2,tensor=4'")
    return _complete(sizes, text)


def _complete(sizes: Mapping[str, int], what: Any) -> dict[str, int]:
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"mesh {what!r}: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    out = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    bad = [a for a, n in out.items() if n == 0 or n < -1]
    if bad or list(out.values()).count(-1) > 1:
        raise MeshError(f"mesh {what!r}: sizes must be >= 1, with at most one -1 (= remaining devices)")
    return out


def mesh_shape_from(spec: str | Mapping[str, int] | os.PathLike) -> dict[str, int]:
    """Axis sizes (possibly one -1) from a string, a dict, a preset name or a json file."""
    if isinstance(spec, Mapping):
        return _complete(spec, dict(spec))
    text = os.fspath(spec)
    if text in MESH_PRESETS:
        return _complete(MESH_PRESETS[text]["mesh"], text)
    if text.endswith(".json"):
        try:
            with open(text) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise MeshError(f"mesh file {text!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise MeshError(f"mesh file {text!r} is not valid JSON: {e}") from None
        if not isinstance(data.get("mesh"), dict):
            raise MeshError(f"mesh file {text!r} has no 'mesh' object of axis sizes")
        return _complete(data["mesh"], text)
    if "=" not in text:
        raise MeshError(f"mesh {text!r} is neither 'axis=size,...', a .json file nor a preset "
                        f"({', '.join(sorted(MESH_PRESETS))})")
    return parse_mesh_spec(text)


def make_mesh(spec: Mesh | AbstractMesh | str | Mapping[str, int] | os.PathLike | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)`` over ``devices`` (default: all, every process).

    ``spec`` None means data parallelism over every device. The product of the sizes must equal the
    device count; ``tensor`` is the fastest-varying axis, so on a multi-host slice it stays within a
    host (``jax.make_mesh`` orders devices along the physical topology). Raises :class:`MeshError` for a bad
    spec or one that does not fit the devices (on CPU, naming the flag that simulates more).
    """
    if isinstance(spec, (Mesh, AbstractMesh)):
        missing = [a for a in spec.axis_names if a not in MESH_AXES]
        if missing:
            raise MeshError(f"mesh axes {spec.axis_names} include {missing}; allowed axes are {MESH_AXES}")
        return spec
    given = devices is not None
    devices = list(devices) if given else jax.devices()
    try:
        shape = mesh_shape(spec, len(devices))
    except MeshError as err:
        if given or jax.default_backend() != "cpu" or "devices but" not in str(err):
            raise
        raise MeshError(f"{err}; on CPU, simulate devices by setting "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N before running") from None
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # topology-aware ordering impossible: keep order
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def mesh_shape(spec: str | Mapping[str, int] | os.PathLike | None, num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` sizes of ``spec`` on ``num_devices`` devices (the -1 axis filled in)."""
    sizes = mesh_shape_from(spec if spec is not None else {"data": -1})
    known = math.prod(n for n in sizes.values() if n != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise MeshError(f"mesh {sizes}: the fixed axes ({known} devices) do not divide {num_devices} devices")
        sizes = {a: (num_devices // known if n == -1 else n) for a, n in sizes.items()}
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available "
                        "(use -1 for one axis to take the remaining devices)")
    return tuple(sizes[a] for a in MESH_AXES)


def abstract_mesh(spec: str | Mapping[str, int] | os.PathLike | None, num_devices: int) -> AbstractMesh:
    """A device-less mesh of ``spec`` on ``num_devices``: for planning shardings and bytes without hardware."""
    return AbstractMesh(mesh_shape(spec, num_devices), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def describe_mesh(mesh: Mesh | AbstractMesh) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.shape.items())


# --- logical axes → PartitionSpec ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A dimension left unsharded over ``mesh_axis`` because ``mesh_size`` does not divide ``size``."""

    where: str
    logical: str
    size: int
    mesh_axis: str
    mesh_size: int

    def __str__(self) -> str:
        return (f"{self.where}: {self.logical} ({self.size}) replicated over {self.mesh_axis}={self.mesh_size} "
                f"({self.mesh_size} does not divide {self.size})")


def resolve_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Mapping[str, Sequence[str]] | None = None, where: str = ""
                 ) -> tuple[PartitionSpec, list[Fallback]]:
    """``PartitionSpec`` for a tensor with logical ``axes`` and ``shape`` on ``mesh``.

    Per dimension, the rule's mesh axes are taken in order, skipping those of size 1, those already used
    by an earlier dimension (a mesh axis shards at most one dimension) and those whose size would not
    divide the dimension; the last case is returned as a :class:`Fallback`.
    """
    rules = LOGICAL_RULES if rules is None else rules
    if len(axes) != len(shape):
        raise ValueError(f"{where or 'tensor'}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    used: set[str] = set()
    entries: list[Any] = []
    fallbacks: list[Fallback] = []
    for name, size in zip(axes, shape):
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise KeyError(f"{where or 'tensor'}: logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        chosen: list[str] = []
        for mesh_axis in rules[name]:
            n = mesh.shape.get(mesh_axis, 1)  # a mesh without this axis acts as size 1
            if n == 1 or mesh_axis in used:
                continue
            if size % (math.prod(mesh.shape[a] for a in chosen) * n):
                fallbacks.append(Fallback(where, name, int(size), mesh_axis, n))
                continue
            chosen.append(mesh_axis)
        used.update(chosen)
        entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries), fallbacks


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int],
                   rules: Mapping[str, Sequence[str]] | None = None) -> NamedSharding:
    return NamedSharding(mesh, resolve_spec(axes, shape, mesh, rules)[0])


@dataclasses.dataclass
class ShardingPlan:
    """Per-leaf shardings of the params tree plus every replication fallback the rules had to take."""

    shardings: Any
    fallbacks: list[Fallback]

    def summary(self) -> str:
        if not self.fallbacks:
            return "every sharded axis divides its mesh axes"
        return "replicated instead of sharded:\n  " + "\n  ".join(str(f) for f in self.fallbacks)


def plan_param_shardings(config: OneVisionConfig, mesh: Mesh,
                         rules: Mapping[str, Sequence[str]] | None = None, lora: LoraSpec | None = None
                         ) -> ShardingPlan:
    """Shardings of every weight of ``config`` (and ``lora``'s adapters) on ``mesh``, with the fallbacks (e.g.
    KV heads < tensor)."""
    fallbacks: list[Fallback] = []

    def one(path, spec):
        pspec, fb = resolve_spec(spec.axes, spec.shape, mesh, rules, where=_path_name(path))
        fallbacks.extend(fb)
        return NamedSharding(mesh, pspec)

    tree = jax.tree_util.tree_map_with_path(one, param_specs(config, lora), is_leaf=is_spec)
    return ShardingPlan(tree, fallbacks)


def param_shardings(config: OneVisionConfig, mesh: Mesh | str,
                    rules: Mapping[str, Sequence[str]] | None = None, lora: LoraSpec | None = None) -> Any:
    """Tree of ``NamedSharding`` matching the params of ``config`` (what the loaders take as ``shardings=``)."""
    mesh = make_mesh(mesh)
    plan = plan_param_shardings(config, mesh, rules, lora)
    if plan.fallbacks:
        log.info("param shardings on %s: %s", describe_mesh(mesh), plan.summary())
    return plan.shardings


def shard_params(params: Any, config: OneVisionConfig, mesh: Mesh | str,
                 rules: Mapping[str, Sequence[str]] | None = None, lora: LoraSpec | None = None) -> Any:
    """Place an in-memory params tree on ``mesh`` (for params already on the host; loaders take shardings)."""
    shardings = param_shardings(config, mesh, rules, lora)
    return jax.tree.map(lambda x, s: put_global(x, s) if isinstance(x, np.ndarray) else jax.device_put(x, s),
                        params, shardings)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# --- activations and the KV cache ----------------------------------------------------------------------------


def activation_sharding(mesh: Mesh, kind: str | Sequence[str | None], shape: Sequence[int],
                        rules: Mapping[str, Sequence[str]] | None = None) -> NamedSharding:
    """Sharding of an engine activation: ``kind`` is a key of :data:`ACTIVATION_AXES` or logical names."""
    if isinstance(kind, str):
        if kind not in ACTIVATION_AXES:
            raise KeyError(f"unknown activation {kind!r}; known: {sorted(ACTIVATION_AXES)}")
        axes = ACTIVATION_AXES[kind]
    else:
        axes = tuple(kind)
    return named_sharding(mesh, axes, shape, rules)


def cache_sharding(config: OneVisionConfig, mesh: Mesh, batch: int, length: int,
                   rules: Mapping[str, Sequence[str]] | None = None) -> NamedSharding:
    """Sharding of one of the KV cache's ``k`` / ``v`` arrays ``[L, B, S, nkv, hd]``: batch over the data
    axes, KV heads over tensor (replicated when tensor does not divide them), layers and slots whole."""
    t = config.text
    shape = (t.num_hidden_layers, batch, length, t.num_key_value_heads, t.head_dim)
    return activation_sharding(mesh, "cache", shape, rules)


def kv_cache_shardings(config: OneVisionConfig, mesh: Mesh, batch: int, length: int, layout: str = "scanned",
                       rules: Mapping[str, Sequence[str]] | None = None) -> Any:
    """``KVCache`` of shardings for the engine's cache layouts: ``"scanned"`` (one stacked ``[L, B, S, nkv, hd]``
    array each for k and v) or ``"unrolled"`` (a tuple of per-layer heads-major ``[B, nkv, S, hd]`` arrays)."""
    from ov_jax.modeling.qwen2 import KVCache

    t = config.text
    if layout == "scanned":
        one = cache_sharding(config, mesh, batch, length, rules)
        return KVCache(one, one)
    if layout == "unrolled":
        one = activation_sharding(mesh, "layer_cache", (batch, t.num_key_value_heads, length, t.head_dim), rules)
        layers = (one,) * t.num_hidden_layers
        return KVCache(layers, layers)
    raise ValueError(f"unknown cache layout {layout!r}; expected 'scanned' or 'unrolled'")


def constrain(x: jax.Array, mesh: Mesh | AbstractMesh | None, kind: str | Sequence[str | None],
              rules: Mapping[str, Sequence[str]] | None = None) -> jax.Array:
    """``with_sharding_constraint`` by logical names inside jit; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, activation_sharding(mesh, kind, x.shape, rules))


def active_mesh() -> AbstractMesh | None:
    """The mesh made current with ``jax.set_mesh`` (as an abstract mesh), or None: the model's activation
    constraints (:func:`constrain`) apply only under one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def axis_multiple(mesh: Mesh | None, logical: str, rules: Mapping[str, Sequence[str]] | None = None) -> int:
    """Product of the mesh axes ``logical`` maps to: pad a batch / tile bucket to a multiple of this so the
    dimension is actually sharded (``axis_multiple(mesh, "tiles")`` for the vision tower's tile bucket)."""
    if mesh is None:
        return 1
    rules = LOGICAL_RULES if rules is None else rules
    return math.prod(mesh.shape.get(a, 1) for a in rules[logical])


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a params tree is placed on (None for single-device or host arrays; error if several)."""
    meshes = {id(x.sharding.mesh): x.sharding.mesh for x in jax.tree.leaves(tree)
              if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)}
    if len(meshes) > 1:
        raise MeshError("the params are placed on several different meshes")
    return next(iter(meshes.values()), None)


def spec(shape: Sequence[int], dtype: Any, mesh: Mesh | None, kind: str | Sequence[str | None] | None = None
         ) -> jax.ShapeDtypeStruct:
    """An abstract input for AOT compilation, sharded by logical ``kind`` when there is a mesh (``kind`` None:
    replicated over the mesh; without a mesh: no sharding, i.e. the default device)."""
    if kind is None:
        kind = (None,) * len(shape)
    sharding = None if mesh is None else activation_sharding(mesh, kind, shape)
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)


def conform(args: Any, shardings: Any) -> Any:
    """Move every array of ``args`` to its ``shardings`` leaf (no-op where it already is there); host arrays
    are placed with :func:`put_global`. Used to chain AOT executables whose output and input layouts differ.
    A ``None`` leaf (an argument the executable does not use, e.g. a weight pruned from the program) leaves
    its argument where it is: moving it would be wasted work, and on a multi-host mesh an impossible one."""
    def move(x, s):
        if s is None:
            return x
        if isinstance(x, jax.Array):
            return x if x.sharding == s else jax.device_put(x, s)
        return put_global(x, s) if isinstance(s, NamedSharding) else x

    return jax.tree.map(move, args, shardings)


def sharded_call(compiled: Any) -> Any:
    """Wrap an AOT-compiled executable so its arguments are first conformed to its input shardings."""
    in_shardings, _ = compiled.input_shardings

    def call(*args):
        return compiled(*conform(args, tuple(in_shardings)))

    call.compiled = compiled
    return call


def fetch(x: Any) -> np.ndarray:
    """A global array as numpy on every process (an all-gather when other hosts hold some of its shards).
    Multi-host: every process must call it, in the same order, like any collective."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from host data that every process holds in full; each process copies only the slices
    of its own devices (the multi-host way to feed a batch; equivalent to ``device_put`` on one host)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# --- memory accounting -----------------------------------------------------------------------------------------


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds for ``tree`` (arrays or ShapeDtypeStructs) placed with ``shardings``."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize, tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def total_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def write_mesh_presets(directory: str) -> list[str]:
    """Write :data:`MESH_PRESETS` as ``<directory>/<name>.json`` (``configs/meshes``; a test keeps them in sync)."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, preset in sorted(MESH_PRESETS.items()):
        file = os.path.join(directory, f"{name}.json")
        with open(file, "w") as f:
            json.dump(preset, f, indent=2)
            f.write("\n")
        written.append(file)
    return written


if __name__ == "__main__":
    import sys

    print("\n".join(write_mesh_presets(sys.argv[1] if len(sys.argv) > 1 else "configs/meshes")))
