"""Serving benchmark: `ov-jax serve` and `transformers serve` under 1, 4 and 16 concurrent clients, against sequential
``generate``.

One run measures, on one checkpoint (``--model DIR``, or ``--preset tiny`` / ``--preset 0.5b``: a random-weight
checkpoint of the tiny test config or of the 0.5B architecture, written in transformers' layout to a temporary
folder):

* per client count, for a cycle of text, one-image and video requests (``--mix``; greedy, fixed ``max_tokens``):
  completion tokens/s over the whole run and time to first token p50 / p95, streamed through the official
  ``openai`` client against a real server process: ``ov-jax serve`` (vision-feature cache off, so repeated media
  are not free) and ``transformers serve`` (``--device cpu --dtype float32 --continuous-batching``). The image is
  ``--image-size`` pixels square (one anyres tile besides the base), the video the first ``--video-frames``
  frames of the sample clip; both are local files, since transformers' ``load_video`` reads no data URIs;
* the same requests one after another through ``model.generate`` in this process (after the servers stopped);
* the stall a long prefill causes to a running decode: the longest gap between token deliveries of a row that is
  decoding while a video request (the whole 16-frame sample clip) or a long text prompt (3/4 of the largest prompt
  bucket) is prefilled, against the gap without it, with chunked text prefill (``Buckets.prefill_chunk``) and with
  each prompt prefilled in one call (scheduler, in process). ``--stall-only`` measures only this (no server),
  ``--no-stall`` all but this.

transformers serve needs ``accelerate`` and an importable ``torchvision`` (the LlavaOnevisionProcessor it loads
builds its video processor even for text requests); it reads a video's audio track too (it counts LLaVA-OneVision
as a multimodal LM), which needs ``torchcodec``; it offers continuous batching to text-only models only, so it
generates one request at a time. A request kind it cannot answer is left out of its rows, and the reason from its
log printed under the table (as is why it did not start, if it did not). ``--no-transformers-serve`` skips it.
Prompt buckets and cache lengths are derived from the workload's token counts unless given.

    python benchmarks/bench_serve.py --preset 0.5b             # everything (tens of minutes on a 2-core host)
    python benchmarks/bench_serve.py --preset 0.5b --no-stall  # the servers and sequential generate only
    python benchmarks/bench_serve.py --preset tiny --dry-run   # a quick check that the script works

``--dry-run`` shrinks everything (CI checks that the script runs). Prints a markdown table with the CPU's SIMD
flags; ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO))  # run from a checkout

from machine import cpu_info, cpu_line  # noqa: E402  (benchmarks/, the script's folder)

KINDS = ("text", "image", "video")
STALL_CACHE_MARGIN = 128  # stall cache slots past its largest prompt bucket
CB_FALLBACK = "does not support continuous batching"  # transformers serve's log line when it falls back


def make_checkpoint(preset: str, folder: pathlib.Path) -> str:
    """A random-weight checkpoint in transformers' layout (weights, tokenizer, processor configs, chat template):
    the tiny test config, or the 0.5B architecture (``ov_jax.presets`` "0.5b", float32, tied embeddings) whose
    tokenizer gets one filler entry per id the small BPE does not cover, so every sampled id decodes to text."""
    from ov_jax.presets import preset as named
    from ov_jax.tiny import make_tiny

    if preset == "tiny":
        return str(make_tiny(folder / "tiny"))
    config = named("0.5b")
    t, v = config.text, config.vision
    text = {k: getattr(t, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads")}
    vision = {k: getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads")}
    out = make_tiny(folder / "0.5b", tie_word_embeddings=config.tie_word_embeddings, text_overrides=text,
                    vision_overrides=vision)
    fill_vocab(out / "tokenizer.json", t.vocab_size)
    return str(out)


def fill_vocab(path: pathlib.Path, vocab_size: int) -> None:
    """Make the BPE vocab of ``tokenizer.json`` cover every id below ``vocab_size``: the added (special) tokens at
    their ids, and a plain ASCII entry for each other id it lacks. No merge produces the fillers and the special
    tokens are split off before the BPE runs, so encoding is unchanged; the added tokens keep their ids."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab.update({t["content"]: t["id"] for t in data["added_tokens"]})
    taken = set(vocab.values())
    for i in range(vocab_size):
        if i not in taken:
            name = f"\u0120w{i}"  # byte-level form of " w<i>"
            while name in vocab:
                name += "~"
            vocab[name] = i
    path.write_text(json.dumps(data))


def make_media(folder: pathlib.Path, image_size: int, frames: int) -> dict[str, str]:
    """An ``image_size``² JPEG of the sample image and an mp4 of the sample clip's first ``frames`` frames."""
    import av
    from PIL import Image

    image = folder / "image.jpg"
    Image.open(ASSETS / "sample.jpg").convert("RGB").resize((image_size, image_size)).save(image, quality=90)
    with av.open(str(ASSETS / "sample.mp4")) as source:
        arrays = [f.to_ndarray(format="rgb24") for _, f in zip(range(frames), source.decode(video=0))]
    if len(arrays) < frames:
        raise ValueError(f"the sample clip has {len(arrays)} frames, fewer than --video-frames {frames}")
    video = folder / "video.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.height, stream.width = arrays[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in arrays:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        out.mux(stream.encode())
    return {"image": str(image), "video": str(video)}


def message(kind: str, media: dict[str, str], i: int) -> list[dict]:
    """One user turn of ``kind`` (text / image / video) in the OpenAI chat form, media as local paths."""
    part = {"image": [{"type": "image_url", "image_url": {"url": media["image"]}}],
            "video": [{"type": "video_url", "video_url": {"url": media["video"]}}]}.get(kind, [])
    return [{"role": "user", "content": part + [{"type": "text", "text": f"Describe item {i}."}]}]


def workload(mix: list[str], count: int, media: dict[str, str]) -> list[tuple[str, list]]:
    """``count`` (kind, messages) pairs cycling through ``mix``."""
    return [(mix[i % len(mix)], message(mix[i % len(mix)], media, i)) for i in range(count)]


def processor_inputs(processor, messages: list) -> dict:
    """``messages`` (OpenAI form, local media paths) through the ov_jax processor."""
    from ov_jax.processing.media import load_image

    content = []
    for part in messages[0]["content"]:
        if part["type"] == "image_url":
            content.append({"type": "image", "image": load_image(part["image_url"]["url"])})
        elif part["type"] == "video_url":
            content.append({"type": "video", "video": part["video_url"]["url"]})
        else:
            content.append(part)
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)


def bucket(tokens: int) -> int:
    """A prompt bucket for ``tokens``: a multiple of 64, of 512 above 512 (whole prefill chunks)."""
    step = 64 if tokens <= 512 else 512
    return -(-tokens // step) * step


def prompt_tokens(processor, media: dict[str, str]) -> dict[str, int]:
    """Prompt tokens per request kind, and of the stall's video (the whole sample clip)."""
    counts = {k: int(processor_inputs(processor, message(k, media, 10**6))["input_ids"].shape[1]) for k in KINDS}
    stall = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "video", "video": str(ASSETS / "sample.mp4")}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True)
    counts["stall video"] = int(stall["input_ids"].shape[1])
    return counts


def start_ov_jax(model: str, flags: list[str], log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "ov_jax.cli", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", model, "--allow-local-media", "--feature-cache-mb", "0",
                             *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def start_transformers(model: str, log) -> tuple[subprocess.Popen, str]:
    """``transformers serve MODEL`` (the model preloaded) on CPU in float32, continuous batching requested."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
                             model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype",
                             "float32", "--continuous-batching"], stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_error(log, since: int = 0) -> str:
    """The last exception a server log names after character ``since``, with the lines of its message (else the
    log's last line)."""
    import re

    log.flush()
    text = pathlib.Path(log.name).read_text(errors="replace")[since:]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if re.match(r"[\w.]*(Error|Exception)\b", line)]
    if not starts:
        return lines[-1][:300] if lines else "(empty log)"
    return " ".join(lines[starts[-1]:starts[-1] + 3])[:400]


def stream_one(client, model: str, messages: list, max_tokens: int, frames: int, usage_option: bool):
    """(time to the first content token s, completion tokens) of one streamed greedy request."""
    start = time.perf_counter()
    first, tokens = None, 0
    extra = {"stream_options": {"include_usage": True}} if usage_option else {}
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, extra_body={"chat_template_kwargs": {"num_frames": frames}},
                                            **extra)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - start), tokens


def summary(system: str, clients, kinds, times: list[float], tokens: int, elapsed: float) -> dict:
    ttft = np.array(times)
    return {"system": system, "clients": clients, "requests": len(times), "kinds": ",".join(kinds),
            "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95))}


def serve_rows(system: str, start, model: str, runs: list[tuple[int, list]], max_tokens: int, frames: int,
               log) -> tuple[list[dict], list[str]]:
    """Rows per client count for the server ``start(log)`` launches (stopped before returning). A request kind whose
    first request fails is left out of the rows, and a note says which and why (the server's log)."""
    import openai

    from ov_jax.serve import wait_until_healthy

    def log_size() -> int:
        log.flush()
        return len(pathlib.Path(log.name).read_text(errors="replace"))

    def connect(url):  # a fresh connection pool: a server that failed a request may have closed the connection
        return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)

    proc, url = start(log)
    try:
        try:
            wait_until_healthy(url, timeout=1800, process=proc)
        except (RuntimeError, TimeoutError) as err:
            return [], [f"{system}: not run: {err}; its log ends: {last_error(log)}"]
        usage_option = system == "ov-jax serve"  # transformers serve rejects stream_options; sends usage anyway
        notes, failed = [], set()
        for kind in dict.fromkeys(k for _, requests in runs for k, _ in requests):  # first use, outside the timing
            since = log_size()
            try:
                first = next(m for _, requests in runs for k, m in requests if k == kind)
                stream_one(connect(url), model, first, max_tokens, frames, usage_option)
            except openai.OpenAIError as err:
                failed.add(kind)
                time.sleep(2)  # the server logs the traceback after answering
                notes.append(f"{system}: {kind} requests not run: {type(err).__name__}: {str(err)[:200]}; its log: "
                             f"{last_error(log, since)}")
        if failed:  # time a server that has not failed a request
            stop(proc)
            proc, url = start(log)
            wait_until_healthy(url, timeout=1800, process=proc)
        client = connect(url)
        rows = []
        for clients, requests in runs:
            requests = [(k, m) for k, m in requests if k not in failed]
            if not requests:
                continue
            begin = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(lambda r: stream_one(client, model, r[1], max_tokens, frames, usage_option),
                                        requests))
            rows.append(summary(system, clients, [k for k in KINDS if k in {k for k, _ in requests}],
                                [r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - begin))
    finally:
        stop(proc)
    if system == "transformers serve":
        log.seek(0)
        notes += [f"transformers serve --continuous-batching: {line.strip()}" for line in log
                  if CB_FALLBACK in line][:1]
    return rows, notes


def stop(proc) -> None:
    """SIGINT (both servers shut down on it), then kill after 120 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sequential_generate(model, processor, requests: list, max_tokens: int, buckets) -> dict:
    """The requests one after another through ``model.generate`` (greedy); TTFT = the first streamed token."""
    from ov_jax.engine import engine_for

    engine_for(model, buckets)
    prepared = [(kind, processor_inputs(processor, m)) for kind, m in requests]
    for kind in KINDS:  # compile outside the timing
        for k, x in prepared:
            if k == kind:
                model.generate(**x, max_new_tokens=max_tokens, do_sample=False)
                break
    tokens, ttft = 0, []
    start = time.perf_counter()
    for _, x in prepared:
        t0, first = time.perf_counter(), []
        out = model.generate(**x, max_new_tokens=max_tokens, do_sample=False,
                             streamer=lambda step: first or first.append(time.perf_counter() - t0))
        ttft.append(first[0])
        tokens += out.shape[1]
    return summary("sequential generate", 1, [k for k in KINDS if k in {k for k, _ in prepared}], ttft, tokens,
                   time.perf_counter() - start)


def long_text(processor, tokens: int) -> dict:
    """Processor inputs of a text-only chat turn of about ``tokens`` prompt tokens."""
    def inputs(sentences):
        text = " ".join(f"Item {i} of the list is a river, a tree or a house." for i in range(sentences))
        return processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)

    per_sentence = (inputs(20)["input_ids"].shape[1] - inputs(10)["input_ids"].shape[1]) / 10
    return inputs(max(int(tokens / per_sentence) - 5, 1))


def prefill_stall(model, processor, buckets, cache_length: int, alone_chunks: int) -> dict:
    """Longest gap between deliveries to a decoding row: alone (over ``alone_chunks`` decode chunks), and while a
    video or a long text prompt is prefilled, with the buckets' chunked text prefill and with every prompt bucket
    prefilled in one call (scheduler, in process). The decoding row may fill its whole cache row, so it is still
    decoding when the other request's prefill ends."""
    import dataclasses

    from ov_jax.engine import Request, Scheduler, engine_for
    from ov_jax.engine.scheduler import MediaJob

    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Go on."}]}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)
    video = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "video", "video": str(ASSETS / "sample.mp4")}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True)
    largest = max(t for t in buckets.prompt if t <= cache_length - 1)
    long = long_text(processor, largest * 3 // 4)

    def request(engine, inputs, new=None):
        kw = {k: inputs[k] for k in ("pixel_values_videos",) if k in inputs}
        (row,) = engine.prepare(inputs["input_ids"], inputs["attention_mask"], **kw)
        new = new or cache_length - row.prompt_length + 1
        gen = model.generation_config.merged(max_new_tokens=new, eos_token_id=[])
        media = MediaJob(row.tower_inputs) if len(row.tower_inputs) else None
        return Request(row, engine.row_settings(gen, new), media=media)

    def longest_gap(scheduler, joining_inputs) -> tuple[float, float]:
        """The longest gap and the joining request's time to first token (0 alone)."""
        engine = scheduler.engine
        running = scheduler.submit(request(engine, text))
        while not running.tokens:
            scheduler.work()
        joining = scheduler.submit(request(engine, joining_inputs, 2)) if joining_inputs is not None else None
        last, gap = time.perf_counter(), 0.0
        seen, chunks = len(running.tokens), 0
        while not joining.finished if joining is not None else chunks < alone_chunks:
            scheduler.work()
            chunks += 1
            if len(running.tokens) > seen:
                now = time.perf_counter()
                gap, last, seen = max(gap, now - last), now, len(running.tokens)
        if running.finished:
            raise RuntimeError("the decoding row ended before the prefill did; use a longer --cache-length")
        scheduler.cancel(running)
        while scheduler.work():
            pass
        return gap, joining.first_token_at - joining.submitted_at if joining is not None else 0.0

    out = {"video_prompt_tokens": int(video["input_ids"].shape[1]),
           "text_prompt_tokens": int(long["input_ids"].shape[1]), "prefill_chunk": buckets.prefill_chunk}
    one_call = dataclasses.replace(buckets, prefill_chunk=max(buckets.prompt))
    for label, b in (("", buckets), ("_one_call", one_call)):
        scheduler = Scheduler(engine_for(model, b), cache_length)
        longest_gap(scheduler, video)  # compile
        longest_gap(scheduler, long)
        if not label:
            out["decode_gap_s_alone"] = longest_gap(scheduler, None)[0]
        for kind, inputs in (("video", video), ("text", long)):
            out[f"decode_gap_s_{kind}_prefill{label}"], out[f"ttft_s_{kind}{label}"] = longest_gap(scheduler, inputs)
    return out


def ratio(row: dict, other: dict | None, key: str) -> str:
    if other is None:
        return ""
    if other["kinds"] != row["kinds"] or other["requests"] != row["requests"]:
        return "n/a (other mix)"  # the same requests only: a 3-request cycle is not the 16-request one
    return f"{row[key] / other[key]:.2f}x"


def table(results: dict) -> str:
    rows = results["rows"]
    by = {(r["system"], r["clients"]): r for r in rows}
    sequential = by.get(("sequential generate", 1))
    header = ["| system | clients | requests | kinds | completion tok/s | TTFT p50 s | TTFT p95 s | tok/s ÷ "
              "transformers serve | TTFT p50 ÷ transformers serve | tok/s ÷ sequential generate |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines = header if rows else []
    for r in rows:
        ours = r["system"] == "ov-jax serve"
        theirs = by.get(("transformers serve", r["clients"])) if ours else None
        lines.append(f"| {r['system']} | {r['clients']} | {r['requests']} | {r['kinds']} | {r['tok_s']:.2f} | "
                     f"{r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {ratio(r, theirs, 'tok_s')} | "
                     f"{ratio(r, theirs, 'ttft_p50')} | {ratio(r, sequential if ours else None, 'tok_s')} |")
    counts = ", ".join(f"{k} {n}" for k, n in results["prompt_tokens"].items())
    lines += ["", cpu_line(results["cpu"]), f"prompt tokens: {counts}; max_tokens {results['max_tokens']}",
              *results["notes"]]
    if "stall" not in results:
        return "\n".join(lines)
    stall = results["stall"]
    lines.append(f"\nlongest gap between a running row's tokens: {stall['decode_gap_s_alone']:.3f} s alone, "
                 f"{stall['decode_gap_s_video_prefill']:.3f} s while a {stall['video_prompt_tokens']}-token video "
                 f"prompt is prefilled ({stall['decode_gap_s_video_prefill_one_call']:.3f} s with its text prefill in "
                 f"one call), {stall['decode_gap_s_text_prefill']:.3f} s while a {stall['text_prompt_tokens']}-token "
                 f"text prompt is prefilled in {stall['prefill_chunk']}-slot chunks "
                 f"({stall['decode_gap_s_text_prefill_one_call']:.3f} s in one call); their time to first token "
                 f"{stall['ttft_s_video']:.2f} s and {stall['ttft_s_text']:.2f} s "
                 f"({stall['ttft_s_video_one_call']:.2f} s and {stall['ttft_s_text_one_call']:.2f} s in one call)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory (transformers layout)")
    source.add_argument("--preset", choices=["tiny", "0.5b"],
                        help="a random-weight checkpoint (tiny test config / 0.5B architecture) in a temporary folder")
    parser.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    parser.add_argument("--requests", default="3,4,16",
                        help="requests per client count: one number, or one per --clients entry (default 3,4,16)")
    parser.add_argument("--mix", default="text,image,video,text,text,text,text,text",
                        help="request kinds, cycled (default: one image and one video per 8 requests)")
    parser.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request (default 16)")
    parser.add_argument("--image-size", type=int, default=384, help="image side in pixels (default 384: 2 tiles)")
    parser.add_argument("--video-frames", type=int, default=2, help="video frames (default 2)")
    parser.add_argument("--cache-length", type=int, help="ov-jax KV slots per row (default: from the workload)")
    parser.add_argument("--prompt-buckets", help="ov-jax prompt buckets (default: from the workload's token counts)")
    parser.add_argument("--no-transformers-serve", action="store_true", help="skip the transformers serve leg")
    parser.add_argument("--dry-run", action="store_true", help="3 requests, clients 1 and 2, 4 tokens")
    parser.add_argument("--stall-only", action="store_true", help="measure only the prefill stall (no server)")
    parser.add_argument("--no-stall", action="store_true", help="skip the prefill stall measurement")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    mix = args.mix.split(",")
    if args.dry_run:
        clients, counts, args.max_tokens = [1, 2], [3], 4
    if len(counts) == 1:
        counts *= len(clients)
    if len(counts) != len(clients) or set(mix) - set(KINDS):
        parser.error(f"--requests needs one number or one per --clients entry; --mix kinds are {KINDS}")
    from ov_jax.engine import Buckets
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing import LlavaOnevisionProcessor

    results = {"cpu": cpu_info(), "max_tokens": args.max_tokens, "rows": [], "notes": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        model_dir = make_checkpoint(args.preset, folder) if args.preset else args.model
        media = make_media(folder, args.image_size, args.video_frames)
        processor = LlavaOnevisionProcessor.from_pretrained(model_dir)
        results["prompt_tokens"] = tokens = prompt_tokens(processor, media)
        workload_kinds = set(mix[:max(counts)])
        prompts = sorted({bucket(tokens[k]) for k in workload_kinds})
        if args.prompt_buckets:
            prompts = sorted(int(t) for t in args.prompt_buckets.split(","))
        cache = args.cache_length or bucket(max(prompts) + args.max_tokens)
        stall_prompts = sorted({*prompts, bucket(tokens["stall video"])})
        stall_cache = max(args.cache_length or 0, bucket(max(stall_prompts) + STALL_CACHE_MARGIN))
        runs = [(c, workload(mix, n, media)) for c, n in zip(clients, counts)]
        flags = ["--max-batch-size", str(max(clients)), "--max-queue", str(max(counts) + 1), "--cache-length",
                 str(cache), "--prompt-buckets", ",".join(map(str, prompts))]
        legs = [] if args.stall_only else [("ov-jax serve", lambda log: start_ov_jax(model_dir, flags, log))]
        if not (args.stall_only or args.no_transformers_serve):
            legs.append(("transformers serve", lambda log: start_transformers(model_dir, log)))
        for system, start in legs:
            with open(folder / f"{system.split()[0]}.log", "w+") as log:
                rows, notes = serve_rows(system, start, model_dir, runs, args.max_tokens, args.video_frames, log)
            results["rows"] += rows
            results["notes"] += notes
        model = LlavaOnevision.from_pretrained(model_dir)
        if not args.stall_only:
            buckets = Buckets(batch=(max(clients),), prompt=tuple(prompts), cache=(cache,))
            results["rows"].append(sequential_generate(model, processor, max(runs, key=lambda r: len(r[1]))[1],
                                                       args.max_tokens, buckets))
        if args.no_stall:
            return report(results, args.out)
        stall_buckets = Buckets(batch=(max(clients),), prompt=tuple(stall_prompts), cache=(stall_cache,))
        results["stall"] = prefill_stall(model, processor, stall_buckets, stall_cache, 6 if args.dry_run else 16)
    return report(results, args.out)


def report(results: dict, out: str | None) -> int:
    print(table(results))
    if out:
        pathlib.Path(out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
