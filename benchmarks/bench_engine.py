"""Engine benchmark: the LLaVA-OneVision 0.5B architecture with random weights, ov_jax vs transformers eager.

One run measures, per dtype, on identical inputs (same seeds) in separate processes (so peak RSS is per system):
  * decode tokens/s at batch 1 and 8 (a 32-token text prompt; ``(t(N+1 new) - t(1 new))`` so prefill is excluded),
    for the engine streamed (a token callback) and not (both run the same device-loop decode chunks). Decode is measured
    in paired rounds: both systems stay loaded (one process each) and take turns, so every round's speed-up
    compares the two under the same machine state (a shared host's memory bandwidth drifts by 2x over minutes);
    the table gives the median over rounds and the range of the per-round speed-ups;
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
ROUNDS = 5  # paired decode rounds (each: one rate per system, batch and loop)
REPEATS = 2  # within a round, a rate uses the best of this many timings (drops one-off stalls)
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


def jax_engine(dtype: str):
    import jax

    from ov_jax.engine import Buckets, Engine
    from ov_jax.params import random_params

    config = bench_config()
    np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
    params = jax.tree.map(jax.device_put, random_params(config, dtype=np_dtype))  # zero-copy on CPU
    return config, Engine(config, params, dtype, Buckets())


def jax_decoder(dtype: str):
    """The engine warmed up for the decode workload; returns ``(measure(batch) -> {loop: tok/s}, info)``."""
    config, engine = jax_engine(dtype)
    new = DECODE_NEW[dtype]
    info: dict = {"system": "ov_jax", "dtype": dtype, "default_loop": "device"}
    requests = {}
    for batch in (1, 8):
        requests[batch] = inputs(config, "decode", batch)
        compiled = engine.warmup([engine.buckets.prompt_bucket(PROMPT_TEXT)], new + 1, media=False, progress=False)
        info[f"compile_s_decode_b{batch}"] = sum(r.seconds for r in compiled)

    def measure(batch: int) -> dict:
        rates = {}
        for loop, streamer in (("stream", lambda tokens: None), ("device", None)):
            run = lambda n: engine.generate(**requests[batch], max_new_tokens=n, stop_token_ids=[], streamer=streamer)
            rates[loop] = decode_rate(run, batch, new)
        return rates

    info["compile_s_total"] = sum(r.seconds for r in engine.compile_log)
    info["compiled"] = [(r.name, list(r.key), round(r.seconds, 2)) for r in engine.compile_log]
    return measure, info


def run_jax(dtype: str, workloads: list[str]) -> dict:
    """The prefill workloads (decode runs paired, see :func:`serve`)."""
    config, engine = jax_engine(dtype)
    out: dict = {"system": "ov_jax", "dtype": dtype, "buckets": {}}
    for workload in workloads:
        req = inputs(config, workload)
        t = engine.buckets.prompt_bucket(req["input_ids"].shape[1])
        compiled = engine.warmup([t], 1, progress=False)
        out[f"compile_s_{workload}"] = sum(r.seconds for r in compiled)
        out["buckets"][workload] = {"tokens": int(req["input_ids"].shape[1]), "prompt_bucket": t}
        out[f"prefill_s_{workload}"] = timed(lambda: engine.generate(**req, max_new_tokens=1))
    out["compile_s_total"] = sum(r.seconds for r in engine.compile_log)
    out["compiled"] = [(r.name, list(r.key), round(r.seconds, 2)) for r in engine.compile_log]
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# --- transformers ---------------------------------------------------------------------------------------------


def hf_model(dtype: str, transform=None):
    """transformers' model on the benchmark architecture (passed through ``transform`` when given, e.g. torch's
    dynamic quantization) and ``generate(request, new_tokens)`` for it."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ov_jax.presets import to_hf_dict

    config = bench_config()
    torch.manual_seed(0)
    hf_config = LlavaOnevisionConfig(**to_hf_dict(config))
    hf_config._attn_implementation = "eager"
    model = LlavaOnevisionForConditionalGeneration(hf_config).eval().to(getattr(torch, dtype))
    if transform is not None:
        model = transform(model)

    def generate(req, new):
        tensors = {k: torch.tensor(v) for k, v in req.items()}
        if "pixel_values" in tensors:
            tensors["pixel_values"] = tensors["pixel_values"].to(getattr(torch, dtype))
        if "pixel_values_videos" in tensors:
            tensors["pixel_values_videos"] = tensors["pixel_values_videos"].to(getattr(torch, dtype))
        with torch.inference_mode():
            model.generate(**tensors, attention_mask=torch.ones_like(tensors["input_ids"]), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

    return config, generate, {"system": "transformers", "dtype": dtype, "threads": torch.get_num_threads()}


def hf_decoder(dtype: str):
    config, generate, info = hf_model(dtype)
    requests = {batch: inputs(config, "decode", batch) for batch in (1, 8)}
    for req in requests.values():
        generate(req, 2)  # first-call overheads (oneDNN primitive creation etc.)
    new = DECODE_NEW[dtype]
    return (lambda batch: {"eager": decode_rate(lambda n: generate(requests[batch], n), batch, new)}), info


def run_hf(dtype: str, workloads: list[str]) -> dict:
    config, generate, out = hf_model(dtype)
    for workload in workloads:
        if (dtype, workload) not in HF_SKIP:
            req = inputs(config, workload)
            out[f"prefill_s_{workload}"] = timed(lambda: generate(req, 1))
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def serve(system: str, dtype: str) -> None:
    """Decode server for the paired rounds: build and warm up, then answer one stdin line (a batch size) at a
    time with that batch's decode rates; protocol lines on stdout start with ``@@``."""
    measure, info = (jax_decoder if system == "ov_jax" else hf_decoder)(dtype)
    print("@@" + json.dumps(info), flush=True)
    for line in sys.stdin:
        print("@@" + json.dumps(measure(int(line))), flush=True)
    print("@@" + json.dumps({"peak_rss_gb": peak_rss_gb()}), flush=True)


# --- driver ---------------------------------------------------------------------------------------------------


def child_command(system: str, dtype: str, mode: str, workload: str = "decode") -> list[str]:
    return [sys.executable, __file__, mode, system, "--dtypes", dtype, "--workloads", workload,
            "--preset", os.environ["OV_BENCH_PRESET"]]


def child(system: str, dtype: str, workload: str) -> dict:
    """Run one system on one prefill workload in a fresh process; its last stdout line is the JSON result."""
    cmd = child_command(system, dtype, "--child", workload)
    print("running", " ".join(cmd[2:]), flush=True)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_avg"] = {workload: [round(load, 2), round(os.getloadavg()[0], 2)]}
    return result


class DecodeServer:
    """One system's :func:`serve` process."""

    def __init__(self, system: str, dtype: str):
        cmd = child_command(system, dtype, "--serve")
        print("starting", " ".join(cmd[2:]), flush=True)
        self.system = system
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"the {self.system} decode server exited (code {self.proc.wait()}); see its stderr above")

    def measure(self, batch: int) -> dict:
        self.proc.stdin.write(f"{batch}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        self.proc.stdin.close()
        final = self._reply()
        self.proc.wait()
        return final


def paired_decode(systems: list[str], dtype: str, rounds: int, bytes_per_token: int) -> tuple[dict, dict]:
    """Both systems loaded at once, taking turns (the order alternates per round); per system the median
    tok/s over rounds, per batch the per-round speed-ups (ov_jax's default loop over transformers), and
    ov_jax's batch-1 fraction of each round's roofline (bandwidth / ``bytes_per_token``)."""
    servers = [DecodeServer(system, dtype) for system in systems]  # started one after the other (no overlap)
    rates: dict = {server.system: {} for server in servers}
    bandwidth = []
    for r in range(rounds):
        bandwidth.append(measure_bandwidth(repeats=3) / 1e9)
        for batch in (1, 8):
            for server in (servers if r % 2 == 0 else servers[::-1]):
                for loop, rate in server.measure(batch).items():
                    rates[server.system].setdefault(f"b{batch}_{loop}", []).append(rate)
        print(f"round {r + 1}/{rounds}: bandwidth {bandwidth[-1]:.1f} GB/s, " + ", ".join(
            f"{system} {key} {values[-1]:.2f}" for system, by in rates.items() for key, values in by.items()),
            flush=True)
    runs = {}
    for server in servers:
        run = runs[server.system] = dict(server.info)
        run.update(server.close())
        run["decode_rounds"] = rates[server.system]
        for key, values in rates[server.system].items():
            run[f"decode_tok_s_{key.replace('_eager', '')}"] = float(np.median(values))
        if server.system == "ov_jax":
            for batch in (1, 8):
                run[f"decode_tok_s_b{batch}"] = run[f"decode_tok_s_b{batch}_{run['default_loop']}"]
    paired = {"bandwidth_gb_s": bandwidth}
    if {"ov_jax", "transformers"} <= set(rates):
        for batch in (1, 8):
            ours = rates["ov_jax"][f"b{batch}_{runs['ov_jax']['default_loop']}"]
            ratios = [a / b for a, b in zip(ours, rates["transformers"][f"b{batch}_eager"])]
            paired[f"speedup_b{batch}"] = {"median": float(np.median(ratios)), "min": min(ratios),
                                           "max": max(ratios), "rounds": ratios}
    if "ov_jax" in rates:
        ours = rates["ov_jax"][f"b1_{runs['ov_jax']['default_loop']}"]
        fractions = [rate / (bw * 1e9 / bytes_per_token) for rate, bw in zip(ours, bandwidth)]
        paired["roofline_fraction_b1"] = {"median": float(np.median(fractions)), "rounds": fractions}
    return runs, paired


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
    lines = [f"read bandwidth {bw:.1f} GB/s at the start (numpy streaming sum, {os.cpu_count()} threads)", "",
             "| metric | dtype | ov_jax | transformers | speed-up |", "|---|---|---|---|---|"]
    fmt = lambda run, key, f: f.format(run[key]) if key in run else "not run"
    for dtype, runs in results["runs"].items():
        ours, ref = runs.get("ov_jax", {}), runs.get("transformers", {})
        paired = results.get("paired", {}).get(dtype, {})
        gb_per_token = results["lm_bytes_per_token"][dtype] / 1e9
        for batch in (1, 8):
            key = f"decode_tok_s_b{batch}"
            if key in ours or key in ref:
                loops = " / ".join(fmt(ours, f"{key}_{loop}", "{:.2f}") for loop in ("stream", "device"))
                ratio = paired.get(f"speedup_b{batch}")
                ratio = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "-"
                lines.append(f"| decode tok/s, batch {batch}, median of {len(paired['bandwidth_gb_s'])} rounds "
                             f"(ov_jax streamed / not streamed: {loops}) | {dtype} | {fmt(ours, key, '{:.2f}')} | "
                             f"{fmt(ref, key, '{:.2f}')} | {ratio} |")
        if "roofline_fraction_b1" in paired:
            bws = paired["bandwidth_gb_s"]
            lines.append(f"| batch-1 roofline tok/s ({gb_per_token:.2f} GB read per token; bandwidth "
                         f"{min(bws):.1f}-{max(bws):.1f} GB/s over the rounds) | {dtype} | "
                         f"{np.median(bws) / gb_per_token:.2f} | | ov_jax at "
                         f"{paired['roofline_fraction_b1']['median']:.0%} (per-round median) |")
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
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="paired decode rounds")
    parser.add_argument("--child", choices=("ov_jax", "transformers"))
    parser.add_argument("--serve", choices=("ov_jax", "transformers"))
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
    if args.serve:
        serve(args.serve, args.dtypes)
        return
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

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
        "paired": {},
    }
    systems = args.systems.split(",")
    for dtype in args.dtypes.split(","):
        runs = results["runs"][dtype] = {s: {} for s in systems}
        if "decode" in workloads:
            decode_runs, results["paired"][dtype] = paired_decode(systems, dtype, args.rounds,
                                                                  results["lm_bytes_per_token"][dtype])
            for system, run in decode_runs.items():
                merge(runs[system], run)
        for workload in (w for w in workloads if w != "decode"):
            for system in systems:  # back to back (similar machine load)
                merge(runs[system], child(system, dtype, workload))
        print(table(results), flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
