"""Attention backends on a GPU: cuDNN flash attention against the XLA reference, prefill shapes, bfloat16.

Two parts, each timed as the median of ``--repeats`` runs after a compile-and-warm-up run:
  * the attention op alone (`ov_jax.nn.attention.attention`) on the shapes prefill meets: the SigLIP tower
    (16 heads of 72, 729 tokens, bidirectional, a chunk of 10 tiles), the 0.5B decoder (14 query / 2 kv heads
    of 64) and the 7B decoder (28 / 4 heads of 128), causal, batch 2 with the second row left-padded by a
    quarter; the largest difference between the two backends' outputs is reported with each;
  * the whole prefill forward (`ov_jax.modeling.llava.hidden_states`, text prompt, 0.5B architecture with
    random weights) at 2,048 and 8,192 tokens.

    python benchmarks/bench_attention.py                 # prints a table, writes benchmarks/attention_results.json
    python benchmarks/bench_attention.py --repeats 5 --lengths 2048

Needs an NVIDIA GPU with cuDNN (``jax[cuda]``); elsewhere it stops with a one-line error. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

BACKENDS = ("xla", "cudnn")
# (name, query heads, kv heads, head dim, tokens, rows, causal)
OP_SHAPES = [
    ("siglip tower, 10 tiles", 16, 16, 72, 729, 10, False),
    ("0.5B decoder", 14, 2, 64, 2048, 2, True),
    ("0.5B decoder", 14, 2, 64, 8192, 2, True),
    ("7B decoder", 28, 4, 128, 8192, 2, True),
]


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_rows(repeats: int) -> list[dict]:
    from ov_jax.nn.attention import AttentionMeta, attention

    rows = []
    rng = np.random.default_rng(0)
    for name, nh, nkv, hd, t, b, causal in OP_SHAPES:
        q = jnp.asarray(rng.standard_normal((b, t, nh, hd)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((b, t, nkv, hd)), jnp.bfloat16) for _ in range(2))
        valid = jnp.asarray(np.arange(t)[None] >= np.array([[0]] + [[t // 4]] * (b - 1))) if causal else None
        outputs, row = {}, {"shape": name, "heads": f"{nh}/{nkv}x{hd}", "tokens": t, "rows": b, "causal": causal}
        for backend in BACKENDS:
            fn = jax.jit(lambda q, k, v, valid, backend=backend: attention(
                q, k, v, AttentionMeta(causal=causal, key_valid=valid), backend))
            row[f"{backend}_ms"] = 1e3 * timed(fn, q, k, v, valid, repeats=repeats)
            outputs[backend] = np.asarray(fn(q, k, v, valid), np.float32)
        keep = np.ones((b, t), bool) if valid is None else np.asarray(valid)
        row["max_abs_diff"] = float(np.abs(outputs["xla"][keep] - outputs["cudnn"][keep]).max())
        rows.append(row)
    return rows


def prefill_rows(lengths: list[int], repeats: int) -> list[dict]:
    from ov_jax.modeling import llava
    from ov_jax.params import random_params
    from ov_jax.presets import preset

    config = preset("0.5b")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_params(config))
    rows = []
    for t in lengths:
        ids = jnp.asarray(np.random.default_rng(t).integers(0, 150000, (1, t)), jnp.int32)
        mask, positions = jnp.ones((1, t), bool), jnp.arange(t, dtype=jnp.int32)[None]
        media = (jnp.zeros((0, 3, 384, 384)), jnp.zeros((1, t, 4), jnp.int32), jnp.zeros((1, t, 4)),
                 jnp.zeros((1, t), bool))
        row = {"tokens": t}
        for backend in BACKENDS:
            fn = jax.jit(lambda p, i, m, pos, *media, backend=backend: llava.hidden_states(
                p, i, m, pos, *media, config=config, dtype=jnp.bfloat16, attention=backend))
            row[f"{backend}_s"] = timed(fn, params, ids, mask, positions, *media, repeats=repeats)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "attention_results.json"))
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"error: cuDNN attention needs an NVIDIA GPU; jax runs on {jax.default_backend()!r}", file=sys.stderr)
        return 2
    ops, prefill = op_rows(args.repeats), prefill_rows(args.lengths, args.repeats)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| attention op | heads | tokens x rows | xla ms | cudnn ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in ops:
        print(f"| {r['shape']}{'' if r['causal'] else ' (bidirectional)'} | {r['heads']} | {r['tokens']} x {r['rows']} "
              f"| {r['xla_ms']:.2f} | {r['cudnn_ms']:.2f} | {r['xla_ms'] / r['cudnn_ms']:.2f}x | {r['max_abs_diff']:.1e} |")
    print("| 0.5B prefill (hidden states) | tokens | xla s | cudnn s | speed-up |")
    print("|---|---|---|---|---|")
    for r in prefill:
        print(f"| text prompt | {r['tokens']} | {r['xla_s']:.3f} | {r['cudnn_s']:.3f} | {r['xla_s'] / r['cudnn_s']:.2f}x |")
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ops": ops, "prefill": prefill},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
