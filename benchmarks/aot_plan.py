"""72B / 7B memory plan without the hardware: AOT-compile prefill and decode from abstract shapes per mesh preset.

For each (model, mesh preset, target, workload) three bf16 steps are traced from ``jax.ShapeDtypeStruct``
inputs carrying the shardings of ``ov_jax.sharding``, lowered and compiled with
``jax.jit(...).trace(...).lower().compile()``, and ``compiled.memory_analysis()`` gives per-device bytes:
the vision tower + projector on one tile chunk (the engine's ``encode_tiles``), one request's prefill (the
engine's ``prefill``: prompt-length KV out) and one decode step against the donated cache, in the scan form
the engine uses today and in a loop-carry form that updates the cache in place.

Targets: TPU topologies (``v5e:4x4`` = v5e-16, ``v4:2x2x4`` = v4-32, ...) compiled by libtpu on this CPU machine
when ``libtpu`` is importable (``pip install 'jax[tpu]'``, or ``pip install --target DIR libtpu`` and
``PYTHONPATH=DIR``): the real TPU compiler and buffer assignment, no TPU needed; a plan that does not fit HBM
fails to compile and is reported with the temporaries it asked for. ``cpu``: the XLA CPU compiler with 16
simulated devices, a stand-in for GPU hosts. Its weight and KV columns are exact, but its temporaries are not
representative: XLA:CPU upcasts bf16 dot operands to f32 (f32 copies of weights) and fuses differently.

    PYTHONPATH=DIR python benchmarks/aot_plan.py --out docs/aot_plan.md

Slow (minutes; each compile holds the full HLO of the model) and not part of the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")  # silences libtpu's host probing; not used

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ov_jax import sharding as sh  # noqa: E402
from ov_jax.engine import steps  # noqa: E402
from ov_jax.modeling import llava, qwen2  # noqa: E402
from ov_jax.modeling.layers import rms_norm, rope_tables  # noqa: E402
from ov_jax.params import abstract_params  # noqa: E402
from ov_jax.presets import preset  # noqa: E402

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Workload:
    """Static shapes of one plan: the engine's buckets."""

    batch: int  # decode batch (prefill runs one request)
    prompt: int  # prefill token bucket (an anyres_max_9 image is up to ~7.4k tokens)
    cache: int  # KV cache slots per row
    tiles: int = 16  # vision tower chunk (tiles + frames per call)


# (model, mesh preset, target, devices, workload) — a target is "cpu" or a TPU topology name.
PLANS = [
    ("7b", "7b-tp4", "cpu", 8, Workload(batch=8, prompt=8192, cache=16384)),
    ("7b", "7b-tp4", "v5e:2x4", 8, Workload(batch=8, prompt=8192, cache=16384)),
    ("72b", "72b-tp8", "cpu", 8, Workload(batch=8, prompt=8192, cache=16384)),
    ("72b", "72b-tp8", "v4:2x2x2", 8, Workload(batch=8, prompt=8192, cache=16384)),
    ("72b", "72b-tp16", "cpu", 16, Workload(batch=1, prompt=8192, cache=16384)),
    ("72b", "72b-tp16", "v4:2x2x4", 16, Workload(batch=1, prompt=8192, cache=16384)),
    ("72b", "72b-tp16", "v5e:4x4", 16, Workload(batch=1, prompt=8192, cache=16384)),
    ("72b", "72b-tp16", "v5e:4x4", 16, Workload(batch=1, prompt=4096, cache=8192)),
    ("72b", "72b-fsdp2-tp8", "v5e:4x4", 16, Workload(batch=1, prompt=8192, cache=16384)),
    ("72b", "72b-fsdp2-tp8", "v5e:4x4", 16, Workload(batch=8, prompt=8192, cache=16384)),
]



def decoder_in_place(params, x, positions, key_valid, config, cache, write_index):
    """``qwen2.decoder`` with the cache in the layer loop's carry (``fori_loop`` + ``.at[i].set``) instead of
    scanned as xs → ys: XLA then updates the donated cache in place, where the scan form materialises a full
    second cache as a temporary (measured as the decode temp of "scan" vs "carry")."""
    t = x.shape[1]
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, x.dtype)
    meta = qwen2.decoder_meta(key_valid, t, write_index)

    def body(i, carry):
        h, ks, vs = carry
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        h, (k, v) = qwen2.decoder_layer(h, layer, cos, sin, meta, config, (ks[i], vs[i]), write_index)
        return h, ks.at[i].set(k), vs.at[i].set(v)

    x, ks, vs = jax.lax.fori_loop(0, config.num_hidden_layers, body, (x, cache.k, cache.v))
    return rms_norm(x, params["norm"], config.rms_norm_eps), qwen2.KVCache(ks, vs)


DECODERS = {"scan": qwen2.decoder, "carry": decoder_in_place}


def decode_step(params, cache, tokens, positions, key_valid, write_index, *, config, dtype, decoder="scan"):
    """One new token per row against the donated cache (the engine's scanned-layout step, minus sampling)."""
    embeds = qwen2.embed_tokens(params["text"], tokens, dtype)
    hidden, cache = DECODERS[decoder](params["text"], embeds, positions, key_valid, config.text, cache, write_index)
    return qwen2.lm_logits(params["text"], hidden)[:, 0], cache


def target_mesh(spec: str, target: str, devices: int) -> Mesh:
    if target == "cpu":
        return sh.make_mesh(spec, jax.devices("cpu")[:devices])
    from jax.experimental import topologies

    chips = {"chip_config_name": "megacore"} if target.startswith("v4") else {}  # one device per v4 chip
    topology = topologies.get_topology_desc(topology_name=target, platform="tpu", **chips)
    if len(topology.devices) != devices:
        raise ValueError(f"topology {target} has {len(topology.devices)} devices, the plan says {devices}")
    return sh.make_mesh(spec, topology.devices)


def _stats(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                           "temp_size_in_bytes", "generated_code_size_in_bytes")}
    peak = getattr(m, "peak_memory_in_bytes", None)
    out["peak_memory_in_bytes"] = int(peak) if peak else None
    out["fits"] = True
    return out


_OOM = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _compile(fn, args, out_shardings, donate) -> dict:
    """Compile and measure; a TPU compile that runs out of HBM is recorded as not fitting (with its need)."""
    start = time.perf_counter()
    try:
        compiled = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings).trace(*args).lower().compile()
        stats = _stats(compiled)
    except jax.errors.JaxRuntimeError as err:
        found = _OOM.search(str(err))
        if "RESOURCE_EXHAUSTED" not in str(err) or not found:
            raise
        stats = {"fits": False, "temp_size_in_bytes": int(float(found.group(1)) * (1 << 30)),
                 "hbm_bytes": int(float(found.group(2)) * (1 << 30)), "peak_memory_in_bytes": None}
    stats["compile_s"] = round(time.perf_counter() - start, 1)
    return stats


def plan(model: str, spec: str, target: str, devices: int, work: Workload, dtype=jnp.bfloat16) -> dict:
    config = preset(model)
    mesh = target_mesh(spec, target, devices)
    shardings = sh.param_shardings(config, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config, dtype), shardings)
    t, v = config.text, config.vision
    row = {"model": model, "mesh": spec, "shape": sh.describe_mesh(mesh), "target": target, "devices": devices,
           "device_kind": mesh.devices.flat[0].device_kind, "workload": dataclasses.asdict(work),
           "weights_per_device": sh.per_device_bytes(params, shardings), "weights_total": sh.total_bytes(params),
           "fallbacks": [str(f) for f in sh.plan_param_shardings(config, mesh).fallbacks]}
    spec_of = functools.partial(sh.spec, mesh=mesh)

    # vision tower + projector on one chunk of tiles, data-parallel over the chunk
    media = {"vision": params["vision"], "projector": params["projector"]}
    tiles = spec_of((work.tiles, v.num_channels, v.image_size, v.image_size), dtype=jnp.float32, kind="tower_inputs")
    row["encode"] = _compile(functools.partial(steps.encode_tiles, config=config, dtype=dtype), (media, tiles),
                             None, ())
    # prefill of one request: prompt-length KV out (the engine then moves it into the decode cache)
    n = work.prompt
    prompt_kv = sh.cache_sharding(config, mesh, 1, n)
    args = ({"text": params["text"]}, spec_of((1, n), dtype=jnp.int32, kind="tokens"),
            spec_of((1, n), dtype=jnp.bool_, kind="tokens"),
            spec_of((1, n, t.hidden_size), dtype=jnp.float32, kind="hidden"), spec_of((1, n), dtype=jnp.bool_, kind="tokens"))
    out = (sh.activation_sharding(mesh, ("batch", "vocab"), (1, t.vocab_size)), qwen2.KVCache(prompt_kv, prompt_kv))
    row["prefill"] = _compile(functools.partial(steps.prefill, config=config, dtype=dtype), args, out, ())
    row["prefill"]["cache_per_device"] = 2 * math.prod(prompt_kv.shard_shape(
        (t.num_hidden_layers, 1, n, t.num_key_value_heads, t.head_dim))) * jnp.dtype(dtype).itemsize
    # one decode step against the donated cache, scan form (as the engine today) and loop-carry form
    b, s = work.batch, work.cache
    cache_sharding = sh.cache_sharding(config, mesh, b, s)
    leaf = jax.ShapeDtypeStruct((t.num_hidden_layers, b, s, t.num_key_value_heads, t.head_dim), dtype,
                                sharding=cache_sharding)
    cache = qwen2.KVCache(leaf, leaf)
    args = (params, cache, spec_of((b, 1), dtype=jnp.int32, kind="tokens"), spec_of((b, 1), dtype=jnp.int32, kind="tokens"),
            spec_of((b, s), dtype=jnp.bool_, kind="tokens"), spec_of((), dtype=jnp.int32))
    out = (sh.activation_sharding(mesh, ("batch", "vocab"), (b, t.vocab_size)), qwen2.KVCache(cache_sharding, cache_sharding))
    for decoder in ("scan", "carry"):
        fn = functools.partial(decode_step, config=config, dtype=dtype, decoder=decoder)
        row[f"decode_{decoder}"] = _compile(fn, args, out, (1,))
        row[f"decode_{decoder}"]["cache_per_device"] = sh.per_device_bytes(cache, qwen2.KVCache(cache_sharding,
                                                                                                cache_sharding))
    for step in ("encode", "prefill", "decode_scan", "decode_carry"):
        x = row[step]
        print(f"  {model} {spec} {target} {step}: weights {row['weights_per_device'] / GB:.2f} GB, "
              f"temp {x['temp_size_in_bytes'] / GB:.2f} GB, fits {x['fits']} ({x['compile_s']} s)", flush=True)
    return row


def _gb(x) -> str:
    return "–" if x is None else f"{x / GB:.2f}"


def markdown(rows: list[dict]) -> str:
    """One row per plan: per-device bytes of weights, KV cache and compiler temporaries, and whether it fits."""
    head = ("| model | mesh | target | workload | weights | encode temp | prefill KV · temp · peak | "
            "decode KV | decode temp · peak (scan) | decode temp · peak (carry) |\n" + "|---" * 10 + "|\n")
    lines = []

    def cell(x, kv=False):
        if not x["fits"]:
            return f"**does not fit**: needs {_gb(x['temp_size_in_bytes'])} > {_gb(x['hbm_bytes'])} HBM"
        return f"{_gb(x['temp_size_in_bytes'])} · {_gb(x['peak_memory_in_bytes'])}"

    for r in rows:
        w, p = r["workload"], r["prefill"]
        target = f"CPU x{r['devices']} (stand-in)" if r["target"] == "cpu" else f"{r['target']} ({r['device_kind']})"
        lines.append(
            f"| {r['model']} | {r['mesh']} ({r['shape']}) | {target} | B={w['batch']} S={w['cache']} T={w['prompt']} "
            f"| {_gb(r['weights_per_device'])} | {cell(r['encode'])} | {_gb(p['cache_per_device'])} · {cell(p)} | "
            f"{_gb(r['decode_carry']['cache_per_device'])} | {cell(r['decode_scan'])} | {cell(r['decode_carry'])} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="7b,72b")
    parser.add_argument("--targets", default="all", help="'all', 'cpu', 'tpu' or a comma list of targets")
    parser.add_argument("--json", default=None, help="write the raw rows here")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--table-from", nargs="+", metavar="JSON", help="only print the table of earlier --json runs")
    args = parser.parse_args(argv)
    if args.table_from:
        rows = [row for file in args.table_from for row in json.load(open(file))]
        print(markdown(rows))
        return
    models = args.models.split(",")
    try:
        import libtpu  # noqa: F401
        have_tpu = True
    except ImportError:
        have_tpu = False
        print("libtpu not importable: TPU topologies skipped (see the module docstring)")
    rows = []
    for model, spec, target, devices, work in PLANS:
        wanted = (args.targets == "all" or target in args.targets.split(",")
                  or (args.targets == "tpu" and target != "cpu") or (args.targets == "cpu" and target == "cpu"))
        if model not in models or not wanted or (target != "cpu" and not have_tpu):
            continue
        rows.append(plan(model, spec, target, devices, work))
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
