"""Serving benchmark: `ov-jax serve` under 1, 4 and 16 concurrent clients against sequential ``generate``.

One run measures, on one checkpoint (``--model DIR``, or ``--preset tiny``: a random tiny checkpoint written to a
temporary folder):

* per client count, for a mix of text, one-image and video requests (greedy, fixed ``max_tokens``): completion
  tokens/s over the whole run and time to first token p50 / p95, streamed through the official ``openai``
  client against a real server process;
* the same requests one after another through ``model.generate`` in this process (after the server stopped);
* the stall a long video prefill causes to a running decode: the longest gap between token deliveries of a row
  that is decoding while a video request is prefilled, against the gap without it (scheduler, in process).

``--dry-run`` shrinks everything (CI checks that the script runs). Prints a markdown table; ``--out`` writes the
numbers as JSON.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = REPO / "ov_jax" / "assets"


def data_uri(path: pathlib.Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def workload(count: int) -> list[dict]:
    """``count`` chat messages cycling text / one image / video."""
    image, video = data_uri(ASSETS / "sample.jpg", "image/jpeg"), data_uri(ASSETS / "sample.mp4", "video/mp4")
    kinds = [[], [{"type": "image_url", "image_url": {"url": image}}],
             [{"type": "video_url", "video_url": {"url": video}}]]
    return [[{"role": "user", "content": kinds[i % 3] + [{"type": "text", "text": f"Describe item {i}."}]}]
            for i in range(count)]


def start_server(model: str, flags: list[str]) -> tuple[subprocess.Popen, str]:
    from ov_jax.serve import wait_until_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "ov_jax.cli", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "bench", *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, timeout=600, process=proc)
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        log.seek(0)
        raise RuntimeError(f"{err}:\n{log.read()[-3000:]}") from None
    return proc, url


def run_clients(url: str, requests: list, clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(messages):
        start = time.perf_counter()
        first, tokens = None, 0
        stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first if first is not None else time.perf_counter() - start, tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, requests))
    elapsed = time.perf_counter() - start
    ttft = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(requests), "tokens": tokens, "seconds": elapsed,
            "tok_s": tokens / elapsed, "ttft_p50": float(np.percentile(ttft, 50)),
            "ttft_p95": float(np.percentile(ttft, 95))}


def sequential_generate(model_dir: str, requests: list, max_tokens: int, buckets) -> dict:
    from ov_jax.engine import engine_for
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing import LlavaOnevisionProcessor
    from ov_jax.processing.media import load_image

    model = LlavaOnevision.from_pretrained(model_dir)
    processor = LlavaOnevisionProcessor.from_pretrained(model_dir)
    engine_for(model, buckets)
    tmp = tempfile.NamedTemporaryFile(suffix=".mp4", delete=False)
    tmp.write((ASSETS / "sample.mp4").read_bytes())
    tmp.close()

    def inputs(messages):
        content = []
        for part in messages[0]["content"]:
            if part["type"] == "image_url":
                content.append({"type": "image", "image": load_image(part["image_url"]["url"])})
            elif part["type"] == "video_url":
                content.append({"type": "video", "video": tmp.name})
            else:
                content.append(part)
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)

    prepared = [inputs(m) for m in requests]
    for kind in prepared[:3]:  # compile outside the timing
        model.generate(**kind, max_new_tokens=max_tokens, do_sample=False)
    start, tokens, ttft = time.perf_counter(), 0, []
    for x in prepared:
        t0 = time.perf_counter()
        model.generate(**x, max_new_tokens=1, do_sample=False)
        ttft.append(time.perf_counter() - t0)
        out = model.generate(**x, max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1]
    elapsed = time.perf_counter() - start - sum(ttft)  # the max_new_tokens=1 probes are not part of the run
    os.unlink(tmp.name)
    return {"clients": "sequential generate", "requests": len(prepared), "tokens": tokens, "seconds": elapsed,
            "tok_s": tokens / elapsed, "ttft_p50": float(np.percentile(ttft, 50)),
            "ttft_p95": float(np.percentile(ttft, 95))}, model, processor


def video_stall(model, processor, buckets, cache_length: int, decode_tokens: int) -> dict:
    """Longest gap between deliveries to a decoding row, without and with a video prefilled meanwhile."""
    from ov_jax.engine import Request, Scheduler, engine_for
    from ov_jax.engine.scheduler import MediaJob

    engine = engine_for(model, buckets)
    scheduler = Scheduler(engine, cache_length)
    gen = model.generation_config.merged(max_new_tokens=decode_tokens, eos_token_id=[])
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Go on."}]}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)
    video = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "video", "video": str(ASSETS / "sample.mp4")}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True)

    def request(inputs, new):
        kw = {k: inputs[k] for k in ("pixel_values_videos",) if k in inputs}
        (row,) = engine.prepare(inputs["input_ids"], inputs["attention_mask"], **kw, generation_config=gen)
        media = MediaJob(row.tower_inputs) if len(row.tower_inputs) else None
        return Request(row, engine.row_settings(gen, new), media=media)

    def longest_gap(with_video: bool) -> float:
        running = scheduler.submit(request(text, decode_tokens))
        while not running.tokens:
            scheduler.work()
        joining = scheduler.submit(request(video, 2)) if with_video else None
        last, gap = time.perf_counter(), 0.0
        seen = len(running.tokens)
        while not running.finished and (joining is None or not joining.finished):
            scheduler.work()
            if len(running.tokens) > seen:
                now = time.perf_counter()
                gap, last, seen = max(gap, now - last), now, len(running.tokens)
        scheduler.cancel(running)
        while scheduler.work():
            pass
        return gap

    longest_gap(True)  # compile
    return {"decode_gap_s_alone": longest_gap(False), "decode_gap_s_video_prefill": longest_gap(True),
            "video_prompt_tokens": int(video["input_ids"].shape[1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory (transformers layout or converted)")
    source.add_argument("--preset", choices=["tiny"], help="tiny: a random tiny checkpoint in a temporary folder")
    parser.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=32, help="requests per client count (default 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (default 32)")
    parser.add_argument("--cache-length", type=int, default=4160)
    parser.add_argument("--prompt-buckets", default="64,1024,4096")
    parser.add_argument("--dry-run", action="store_true", help="2 requests, clients 1 and 2, 4 tokens")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    if args.dry_run:
        clients, args.requests, args.max_tokens = [1, 2], 3, 4
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.preset == "tiny":
            from ov_jax.tiny import make_tiny

            model_dir = str(make_tiny(pathlib.Path(tmp) / "tiny"))
        flags = ["--max-batch-size", str(max(clients)), "--max-queue", str(args.requests + 1), "--cache-length",
                 str(args.cache_length), "--prompt-buckets", args.prompt_buckets]
        proc, url = start_server(model_dir, flags)
        try:
            requests = workload(args.requests)
            run_clients(url, requests[:3], 1, args.max_tokens)  # first use of each kind, outside the timing
            rows = [run_clients(url, requests, c, args.max_tokens) for c in clients]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        from ov_jax.engine import Buckets

        buckets = Buckets(batch=(max(clients),), prompt=tuple(int(t) for t in args.prompt_buckets.split(",")),
                          cache=(args.cache_length,))
        sequential, model, processor = sequential_generate(model_dir, requests, args.max_tokens, buckets)
        rows.append(sequential)
        stall = video_stall(model, processor, buckets, args.cache_length, 48 if args.dry_run else 128)
    lines = ["| clients | requests | completion tok/s | TTFT p50 s | TTFT p95 s |", "|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} |"
              for r in rows]
    lines.append(f"\nlongest gap between a running row's tokens: {stall['decode_gap_s_alone']:.3f} s alone, "
                 f"{stall['decode_gap_s_video_prefill']:.3f} s while a {stall['video_prompt_tokens']}-token video "
                 "prompt is prefilled")
    print("\n".join(lines))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"rows": rows, "stall": stall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
