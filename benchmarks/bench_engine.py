"""Engine benchmark: the LLaVA-OneVision 0.5B architecture with random weights, ov_jax vs transformers eager.

One run measures, per dtype, on identical inputs (same seeds) in separate processes (so peak RSS is per system):
  * decode tokens/s at batch 1 and 8 (a 32-token text prompt; ``(t(N+1 new) - t(1 new))`` so prefill is excluded),
    for the engine with both decode loops (jitted Python-driven step and ``lax.while_loop``);
  * prefill time (prompt → first token) for an 899x1024 image (10 tiles, 6567 tokens) and an 8-frame video;
  * peak RSS and, for the engine, compile time (AOT warm-up of exactly the buckets used);
  * the memory-bandwidth roofline: a numpy streaming read over all cores gives bytes/s, divided by the
    language model's weight bytes read per decoded token (all decoder weights plus the lm_head).

    python benchmarks/bench_engine.py                          # everything, writes benchmarks/results.json
    python benchmarks/bench_engine.py --dtypes float32 --workloads decode   # a subset

Not a test. Needs torch + transformers (the reference) besides ov_jax.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

WORKLOADS = ("decode", "image", "video")
IMAGE_SIZE = (899, 1024)
VIDEO_FRAMES = 8
PROMPT_TEXT = 32
DECODE_NEW = {"float32": 64, "bfloat16": 16}
HF_DECODE_NEW = {"float32": 64, "bfloat16": 4}
# transformers' bf16 matmuls run at ~1 GFLOP/s on this AVX2 CPU (no bf16 units): a 10-tile prefill would take hours.
HF_SKIP = {("bfloat16", "image"), ("bfloat16", "video")}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def measure_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Streaming read bandwidth (bytes/s): one numpy sum per core over its slice of a large array, best of N."""
    data = np.ones(int(gigabytes * 1e9) // 8)
    parts = np.array_split(data, os.cpu_count() or 1)
    best = 0.0
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def lm_bytes_per_token(config, itemsize: int) -> int:
    """Decoder weights + final norm + lm_head (the embedding matrix when tied); embedding lookups are negligible."""
    from ov_jax.params import abstract_params, count_params

    text = abstract_params(config)["text"]
    n = count_params(text)
    if not config.lm_head_tied:
        n -= count_params({"embed": text["embed"]})
    return n * itemsize


# --- inputs (identical for both systems) ----------------------------------------------------------------------


def inputs(config, workload: str, batch: int = 1) -> dict:
    from ov_jax.geometry import image_tile_count, image_token_count, video_token_count

    rng = np.random.default_rng({"decode": 0, "image": 1, "video": 2}[workload] + 10 * batch)
    text = lambda n: rng.integers(1000, 100000, n)
    if workload == "decode":
        return dict(input_ids=np.stack([text(PROMPT_TEXT) for _ in range(batch)]))
    if workload == "image":
        h, w = IMAGE_SIZE
        n = image_token_count(h, w, config.image_grid_pinpoints)
        tiles = image_tile_count(h, w, config.image_grid_pinpoints)
        ids = np.r_[text(5), [config.image_token_id] * n, text(11)][None]
        pixels = rng.standard_normal((1, tiles, 3, 384, 384)).astype(np.float32)
        return dict(input_ids=ids, pixel_values=pixels, image_sizes=np.array([IMAGE_SIZE]))
    ids = np.r_[text(5), [config.video_token_id] * video_token_count(VIDEO_FRAMES), text(11)][None]
    frames = rng.standard_normal((1, VIDEO_FRAMES, 3, 384, 384)).astype(np.float32)
    return dict(input_ids=ids, pixel_values_videos=frames)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- ov_jax ---------------------------------------------------------------------------------------------------


def run_jax(dtype: str, workloads: list[str]) -> dict:
    import jax

    from ov_jax.config import OneVisionConfig
    from ov_jax.engine import Buckets, Engine
    from ov_jax.params import random_params

    config = OneVisionConfig()
    np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
    params = jax.tree.map(jax.device_put, random_params(config, dtype=np_dtype))  # zero-copy on CPU
    engine = Engine(config, params, dtype, Buckets())
    out: dict = {"system": "ov_jax", "dtype": dtype, "buckets": {}}
    new = DECODE_NEW[dtype]
    if "decode" in workloads:
        for batch in (1, 8):
            req = inputs(config, "decode", batch)
            compiled = engine.warmup([batch], [engine.buckets.prompt_bucket(PROMPT_TEXT)], new + 1, media=False,
                                     progress=False)
            engine.loop = "device"
            compiled += engine.warmup([batch], [engine.buckets.prompt_bucket(PROMPT_TEXT)], new + 1, media=False,
                                      progress=False)
            out[f"compile_s_decode_b{batch}"] = sum(r.seconds for r in compiled)
            for loop in ("python", "device"):
                engine.loop = loop
                first = timed(lambda: engine.generate(**req, max_new_tokens=1, stop_token_ids=[]))
                full = timed(lambda: engine.generate(**req, max_new_tokens=new + 1, stop_token_ids=[]))
                out[f"decode_tok_s_b{batch}_{loop}"] = batch * new / (full - first)
            out[f"decode_tok_s_b{batch}"] = max(out[f"decode_tok_s_b{batch}_{loop}"] for loop in ("python", "device"))
        engine.loop = "python"
    for workload in ("image", "video"):
        if workload not in workloads:
            continue
        req = inputs(config, workload)
        t = engine.buckets.prompt_bucket(req["input_ids"].shape[1])
        compiled = engine.warmup([1], [t], 1, progress=False)
        out[f"compile_s_{workload}"] = sum(r.seconds for r in compiled)
        out["buckets"][workload] = {"tokens": int(req["input_ids"].shape[1]), "prompt_bucket": t}
        out[f"prefill_s_{workload}"] = timed(lambda: engine.generate(**req, max_new_tokens=1))
    out["compile_s_total"] = sum(r.seconds for r in engine.compile_log)
    out["compiled"] = [(r.name, list(r.key), round(r.seconds, 2)) for r in engine.compile_log]
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# --- transformers ---------------------------------------------------------------------------------------------


def run_hf(dtype: str, workloads: list[str]) -> dict:
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ov_jax.config import OneVisionConfig
    from ov_jax.presets import to_hf_dict

    config = OneVisionConfig()
    torch.manual_seed(0)
    hf_config = LlavaOnevisionConfig(**to_hf_dict(config))
    hf_config._attn_implementation = "eager"
    model = LlavaOnevisionForConditionalGeneration(hf_config).eval().to(getattr(torch, dtype))
    out: dict = {"system": "transformers", "dtype": dtype, "threads": torch.get_num_threads()}

    def generate(req, new):
        tensors = {k: torch.tensor(v) for k, v in req.items()}
        if "pixel_values" in tensors:
            tensors["pixel_values"] = tensors["pixel_values"].to(getattr(torch, dtype))
        if "pixel_values_videos" in tensors:
            tensors["pixel_values_videos"] = tensors["pixel_values_videos"].to(getattr(torch, dtype))
        with torch.inference_mode():
            model.generate(**tensors, attention_mask=torch.ones_like(tensors["input_ids"]), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

    new = HF_DECODE_NEW[dtype]
    if "decode" in workloads:
        for batch in (1, 8):
            req = inputs(config, "decode", batch)
            generate(req, 2)  # first-call overheads
            first = timed(lambda: generate(req, 1))
            full = timed(lambda: generate(req, new + 1))
            out[f"decode_tok_s_b{batch}"] = batch * new / (full - first)
    for workload in ("image", "video"):
        if workload in workloads and (dtype, workload) not in HF_SKIP:
            req = inputs(config, workload)
            out[f"prefill_s_{workload}"] = timed(lambda: generate(req, 1))
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# --- driver ---------------------------------------------------------------------------------------------------


def child(system: str, dtype: str, workloads: list[str]) -> dict:
    """Run one system in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--child", system, "--dtypes", dtype, "--workloads", ",".join(workloads)]
    print("running", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return {"system": system, "dtype": dtype, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def table(results: dict) -> str:
    bw = results["bandwidth_gb_s"]
    lines = [f"read bandwidth {bw:.1f} GB/s (numpy, {os.cpu_count()} threads)", "",
             "| metric | dtype | ov_jax | transformers | ov_jax / transformers |", "|---|---|---|---|---|"]
    for dtype, runs in results["runs"].items():
        ours, ref = runs.get("ov_jax", {}), runs.get("transformers", {})
        roof = bw * 1e9 / results["lm_bytes_per_token"][dtype]
        for batch in (1, 8):
            key = f"decode_tok_s_b{batch}"
            if key in ours or key in ref:
                loops = " / ".join(f"{ours.get(f'{key}_{lp}', 0):.2f}" for lp in ("python", "device"))
                lines.append(f"| decode tok/s, batch {batch} (python / device loop: {loops}) | {dtype} | "
                             f"{ours.get(key, 0):.2f} | {ref.get(key, 0):.2f} | {ratio(ours.get(key), ref.get(key))} |")
        if "decode_tok_s_b1" in ours:
            lines.append(f"| batch-1 roofline tok/s ({results['lm_bytes_per_token'][dtype] / 1e9:.2f} GB/token) | "
                         f"{dtype} | {roof:.2f} | | ov_jax at {ours['decode_tok_s_b1'] / roof:.0%} |")
        for workload in ("image", "video"):
            key = f"prefill_s_{workload}"
            if key in ours or key in ref:
                speedup = ratio(ref.get(key), ours.get(key))
                lines.append(f"| prefill s, {workload} | {dtype} | {ours.get(key, 0):.1f} | "
                             f"{ref.get(key, 'skipped') if key not in ref else f'{ref[key]:.1f}'} | {speedup} |")
        lines.append(f"| peak RSS GB | {dtype} | {ours.get('peak_rss_gb', 0):.2f} | {ref.get('peak_rss_gb', 0):.2f} | |")
        lines.append(f"| compile s (all buckets used) | {dtype} | {ours.get('compile_s_total', 0):.1f} | 0 | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default="ov_jax,transformers")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.json"))
    parser.add_argument("--child", choices=("ov_jax", "transformers"))
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {WORKLOADS}")
    if args.child:
        run = run_jax if args.child == "ov_jax" else run_hf
        print(json.dumps(run(args.dtypes, workloads)))
        return

    from ov_jax.config import OneVisionConfig

    config = OneVisionConfig()
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "uname": " ".join(platform.uname()),
                    "load_avg_at_start": os.getloadavg()},
        "bandwidth_gb_s": measure_bandwidth() / 1e9,
        "lm_bytes_per_token": {d: lm_bytes_per_token(config, 4 if d == "float32" else 2)
                               for d in args.dtypes.split(",")},
        "runs": {},
    }
    for dtype in args.dtypes.split(","):
        results["runs"][dtype] = {s: child(s, dtype, workloads) for s in args.systems.split(",")}
        print(table(results), flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
