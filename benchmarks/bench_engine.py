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
DECODE_NEW = {"float32": 48, "bfloat16": 24}
REPEATS = 2  # decode timings are the best of this many runs (the machine is shared)
# torch's bf16 GEMMs run at ~1.7 GFLOP/s on this AVX2 CPU (no bf16 units; its bf16 GEMV is fast): a 10-tile
# prefill would take hours, so transformers' bf16 prefill is not run.
HF_SKIP = {("bfloat16", "image"), ("bfloat16", "video")}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


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


def bench_config():
    """The 0.5B architecture (``OneVisionConfig()`` defaults), or the tiny test config with ``--preset tiny``
    (a seconds-long dry run of the whole script)."""
    from ov_jax.config import OneVisionConfig
    from ov_jax.presets import preset

    if os.environ.get("OV_BENCH_PRESET") == "tiny":
        return preset("tiny").replace(image_token_id=300, video_token_id=301)
    return OneVisionConfig()


def inputs(config, workload: str, batch: int = 1) -> dict:
    from ov_jax.geometry import image_tile_count, image_token_count, video_token_count

    rng = np.random.default_rng({"decode": 0, "image": 1, "video": 2}[workload] + 10 * batch)
    text = lambda n: rng.integers(1, min(100000, config.image_token_id), n)
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


def decode_rate(generate, batch: int, new: int) -> float:
    """Tokens/s of decoding alone: best-of-N time of ``new + 1`` tokens minus best-of-N time of 1 token."""
    first = min(timed(lambda: generate(1)) for _ in range(REPEATS))
    full = min(timed(lambda: generate(new + 1)) for _ in range(REPEATS))
    return batch * new / (full - first)


# --- ov_jax ---------------------------------------------------------------------------------------------------


def run_jax(dtype: str, workloads: list[str]) -> dict:
    import jax

    from ov_jax.engine import Buckets, Engine
    from ov_jax.params import random_params

    config = bench_config()
    np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
    params = jax.tree.map(jax.device_put, random_params(config, dtype=np_dtype))  # zero-copy on CPU
    engine = Engine(config, params, dtype, Buckets())
    out: dict = {"system": "ov_jax", "dtype": dtype, "buckets": {}}
    new = DECODE_NEW[dtype]
    if "decode" in workloads:
        for batch in (1, 8):
            req = inputs(config, "decode", batch)
            compiled = engine.warmup([batch], [engine.buckets.prompt_bucket(PROMPT_TEXT)], new + 1, media=False,
                                     streaming=True, progress=False)  # both decode loops
            out[f"compile_s_decode_b{batch}"] = sum(r.seconds for r in compiled)
            for loop in ("python", "device"):
                engine.loop = loop
                run = lambda n: engine.generate(**req, max_new_tokens=n, stop_token_ids=[])
                out[f"decode_tok_s_b{batch}_{loop}"] = decode_rate(run, batch, new)
            out[f"decode_tok_s_b{batch}"] = max(out[f"decode_tok_s_b{batch}_{loop}"] for loop in ("python", "device"))
        engine.loop = "device"
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

    from ov_jax.presets import to_hf_dict

    config = bench_config()
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

    new = DECODE_NEW[dtype]
    if "decode" in workloads:
        for batch in (1, 8):
            req = inputs(config, "decode", batch)
            generate(req, 2)  # first-call overheads (oneDNN primitive creation etc.)
            out[f"decode_tok_s_b{batch}"] = decode_rate(lambda n: generate(req, n), batch, new)
    for workload in ("image", "video"):
        if workload in workloads and (dtype, workload) not in HF_SKIP:
            req = inputs(config, workload)
            out[f"prefill_s_{workload}"] = timed(lambda: generate(req, 1))
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# --- driver ---------------------------------------------------------------------------------------------------


def child(system: str, dtype: str, workload: str) -> dict:
    """Run one system on one workload in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--child", system, "--dtypes", dtype, "--workloads", workload,
           "--preset", os.environ["OV_BENCH_PRESET"]]
    print("running", " ".join(cmd[2:]), flush=True)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_avg"] = {workload: [round(load, 2), round(os.getloadavg()[0], 2)]}
    return result


def merge(total: dict, part: dict) -> dict:
    """Combine one system's per-workload results: peak RSS is the max, compile times add up."""
    for key, value in part.items():
        if key == "peak_rss_gb":
            total[key] = max(total.get(key, 0.0), value)
        elif key in ("compile_s_total",):
            total[key] = total.get(key, 0.0) + value
        elif isinstance(value, dict):
            total.setdefault(key, {}).update(value)
        elif isinstance(value, list) and key in total:
            total[key] = total[key] + value
        else:
            total[key] = value
    return total


def speedup(ours, reference, higher_is_better: bool) -> str:
    if not ours or not reference:
        return "-"
    return f"{(ours / reference if higher_is_better else reference / ours):.2f}x"


def table(results: dict) -> str:
    """Markdown table of every measured number, with ov_jax's speed-up over transformers."""
    bw = results["bandwidth_gb_s"]
    lines = [f"read bandwidth {bw:.1f} GB/s (numpy streaming sum, {os.cpu_count()} threads)", "",
             "| metric | dtype | ov_jax | transformers | speed-up |", "|---|---|---|---|---|"]
    fmt = lambda run, key, f: f.format(run[key]) if key in run else "not run"
    for dtype, runs in results["runs"].items():
        ours, ref = runs.get("ov_jax", {}), runs.get("transformers", {})
        gb_per_token = results["lm_bytes_per_token"][dtype] / 1e9
        for batch in (1, 8):
            key = f"decode_tok_s_b{batch}"
            if key in ours or key in ref:
                loops = " / ".join(fmt(ours, f"{key}_{loop}", "{:.2f}") for loop in ("python", "device"))
                lines.append(f"| decode tok/s, batch {batch} (ov_jax python / device loop: {loops}) | {dtype} | "
                             f"{fmt(ours, key, '{:.2f}')} | {fmt(ref, key, '{:.2f}')} | "
                             f"{speedup(ours.get(key), ref.get(key), True)} |")
        if "decode_tok_s_b1" in ours:
            roof = bw / gb_per_token
            lines.append(f"| batch-1 roofline tok/s ({gb_per_token:.2f} GB read per token) | {dtype} | {roof:.2f} | "
                         f"| ov_jax at {ours['decode_tok_s_b1'] / roof:.0%} |")
        for workload in ("image", "video"):
            key = f"prefill_s_{workload}"
            if key in ours or key in ref:
                lines.append(f"| prefill s, {workload} | {dtype} | {fmt(ours, key, '{:.1f}')} | "
                             f"{fmt(ref, key, '{:.1f}')} | {speedup(ours.get(key), ref.get(key), False)} |")
        lines.append(f"| peak RSS GB | {dtype} | {fmt(ours, 'peak_rss_gb', '{:.2f}')} | "
                     f"{fmt(ref, 'peak_rss_gb', '{:.2f}')} | |")
        lines.append(f"| compile s (every bucket used) | {dtype} | {fmt(ours, 'compile_s_total', '{:.1f}')} | - | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default="ov_jax,transformers")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.json"))
    parser.add_argument("--child", choices=("ov_jax", "transformers"))
    parser.add_argument("--preset", choices=("0.5b", "tiny"), default="0.5b",
                        help="tiny: a quick dry run of the script on the tiny test architecture")
    args = parser.parse_args(argv)
    os.environ["OV_BENCH_PRESET"] = args.preset
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {WORKLOADS}")
    if args.child:
        run = run_jax if args.child == "ov_jax" else run_hf
        print(json.dumps(run(args.dtypes, workloads)))
        return

    config = bench_config()
    results = {
        "preset": args.preset,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "uname": " ".join(platform.uname()),
                    "load_avg_at_start": os.getloadavg()},
        "bandwidth_gb_s": measure_bandwidth() / 1e9,
        "lm_bytes_per_token": {d: lm_bytes_per_token(config, 4 if d == "float32" else 2)
                               for d in args.dtypes.split(",")},
        "runs": {},
    }
    for dtype in args.dtypes.split(","):  # per workload, the systems run back to back (similar machine load)
        runs = results["runs"][dtype] = {s: {} for s in args.systems.split(",")}
        for workload in workloads:
            for system in runs:
                merge(runs[system], child(system, dtype, workload))
        print(table(results), flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
