"""Quantization benchmark: decode tokens/s per weight format, ov_jax vs transformers eager, with rooflines.

One run measures, on the LLaVA-OneVision 0.5B architecture with random weights (or the tiny test architecture
with ``--preset tiny``, a seconds-long dry run), each format in its own process (so peak RSS is per format):
  * ov_jax's engine with float32, bfloat16, int8 and int4 weights (`ov_jax.nn.quant`; int4 group 128, or 64
    on the tiny preset), compute dtype float32 for float32 and bfloat16 otherwise;
  * transformers eager in float32 and bfloat16, and with torch's own CPU int8 path (dynamic quantization,
    ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` to qint8: int8 weights, activations
    quantized per call);
  * decode tokens/s at batch 1 and 8 (32-token text prompt, prefill excluded as in ``bench_engine.py``),
    peak RSS, and the memory-bandwidth roofline of each format: a numpy streaming read gives bytes/s,
    divided by the language model's weight bytes read per decoded token in that format.
Ratios are against transformers eager float32. The CPU's flags (AVX-512, AVX-512 BF16 / AMX units) are
printed: without bf16 units bfloat16 products are converted to float32 in software.

    python benchmarks/bench_quant.py                   # everything, writes benchmarks/quant_results.json
    python benchmarks/bench_quant.py --preset tiny     # dry run

Not a test. Needs torch + transformers besides ov_jax.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench_engine import (PROMPT_TEXT, bench_config, cpu_model, decode_rate, hf_model, inputs,  # noqa: E402
                          measure_bandwidth, peak_rss_gb)

FORMATS = {  # name: (system, weight format, compute dtype)
    "ov_jax float32": ("ov_jax", "float32", "float32"),
    "ov_jax bfloat16": ("ov_jax", "bfloat16", "bfloat16"),
    "ov_jax int8": ("ov_jax", "int8", "bfloat16"),
    "ov_jax int4": ("ov_jax", "int4", "bfloat16"),
    "transformers float32": ("transformers", "float32", "float32"),
    "transformers bfloat16": ("transformers", "bfloat16", "bfloat16"),
    "transformers int8 (torch dynamic)": ("transformers", "int8", "float32"),
}
BASELINE = "transformers float32"
NEW_TOKENS = 16
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> dict[str, bool]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    return {flag: flag in flags for flag in CPU_FLAGS}


def group_size(config) -> int:
    return 64 if config.text.hidden_size < 128 else 128


def quantized_config(config, weights: str):
    from ov_jax.config import QuantConfig

    if weights in ("int8", "int4"):
        return config.replace(quantization=QuantConfig(weights, group_size(config)))
    return config


def lm_bytes_per_token(config, weights: str) -> int:
    """Bytes of the language model's weights read per decoded token in this format: every decoder weight,
    the final norm and the lm_head (the embedding table when tied); scales included, embedding lookups not."""
    from ov_jax.params import param_specs

    specs = param_specs(quantized_config(config, weights))["text"]
    if not config.lm_head_tied:
        specs = {k: v for k, v in specs.items() if k != "embed"}
    float_size = 4 if weights == "float32" else 2
    return sum(int(np.prod(s.shape)) * (np.dtype(s.dtype).itemsize if s.dtype else float_size)
               for s in _leaves(specs))


def _leaves(tree):
    import jax

    from ov_jax.params import is_spec

    return jax.tree.leaves(tree, is_leaf=is_spec)


def run_ov_jax(weights: str, compute: str) -> dict:
    import jax

    from ov_jax.engine import Buckets, Engine
    from ov_jax.params import random_params

    config = quantized_config(bench_config(), weights)
    stored = np.float32 if weights == "float32" else jax.numpy.bfloat16
    params = jax.tree.map(jax.device_put, random_params(config, dtype=stored))
    engine = Engine(config, params, compute, Buckets())
    out = {}
    for batch in (1, 8):
        req = inputs(config, "decode", batch)
        engine.warmup([engine.buckets.prompt_bucket(PROMPT_TEXT)], NEW_TOKENS + 1, media=False, progress=False)
        run = lambda n: engine.generate(**req, max_new_tokens=n, stop_token_ids=[])
        out[f"decode_tok_s_b{batch}"] = decode_rate(run, batch, NEW_TOKENS)
    return out


def run_transformers(weights: str, compute: str) -> dict:
    import torch

    transform = None
    if weights == "int8":
        transform = lambda model: torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    config, generate, info = hf_model(compute, transform)
    out = {"threads": info["threads"]}
    for batch in (1, 8):
        req = inputs(config, "decode", batch)
        generate(req, 2)  # first-call overheads
        out[f"decode_tok_s_b{batch}"] = decode_rate(lambda n: generate(req, n), batch, NEW_TOKENS)
    return out


def child(name: str, preset: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--preset", preset]
    print("running", name, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    bw = results["bandwidth_gb_s"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in results["machine"]["cpu_flags"].items())
    lines = [f"CPU: {results['machine']['cpu']} ({results['machine']['cores']} cores); flags: {flags}",
             f"read bandwidth {bw:.1f} GB/s (numpy streaming sum); ratios against {BASELINE} eager", "",
             "| system / weights | GB read per token | roofline tok/s (batch 1) | decode tok/s b1 | b8 | "
             "b1 vs baseline | b8 vs baseline | b1 % of roofline | peak RSS GB |", "|---" * 9 + "|"]
    base = results["runs"].get(BASELINE, {})
    for name, run in results["runs"].items():
        gb = results["lm_bytes_per_token"][FORMATS[name][1]] / 1e9
        if "error" in run:
            lines.append(f"| {name} | {gb:.3f} | {bw / gb:.1f} | failed: {run['error']} | | | | | |")
            continue
        ratio = lambda b: (f"{run[f'decode_tok_s_b{b}'] / base[f'decode_tok_s_b{b}']:.2f}x"
                           if f"decode_tok_s_b{b}" in base else "-")
        lines.append(f"| {name} | {gb:.3f} | {bw / gb:.1f} | {run['decode_tok_s_b1']:.2f} | "
                     f"{run['decode_tok_s_b8']:.2f} | {ratio(1)} | {ratio(8)} | "
                     f"{run['decode_tok_s_b1'] / (bw / gb):.0%} | {run['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {list(FORMATS)}")
    parser.add_argument("--preset", choices=("0.5b", "tiny"), default="0.5b",
                        help="tiny: a quick dry run of the script on the tiny test architecture")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "quant_results.json"))
    parser.add_argument("--child", choices=list(FORMATS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["OV_BENCH_PRESET"] = args.preset
    if args.child:
        system, weights, compute = FORMATS[args.child]
        out = (run_ov_jax if system == "ov_jax" else run_transformers)(weights, compute)
        out["peak_rss_gb"] = peak_rss_gb()
        print(json.dumps(out))
        return
    names = [n for n in args.formats.split(",") if n]
    unknown = set(names) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats {sorted(unknown)}; known: {list(FORMATS)}")
    config = bench_config()
    results = {
        "preset": args.preset,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
                    "load_avg_at_start": os.getloadavg()},
        "bandwidth_gb_s": measure_bandwidth() / 1e9,
        "lm_bytes_per_token": {w: lm_bytes_per_token(config, w) for w in ("float32", "bfloat16", "int8", "int4")},
        "int4_group_size": group_size(config),
        "runs": {name: child(name, args.preset) for name in names},
    }
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    print(table(results), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
