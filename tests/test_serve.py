"""`ov-jax serve` as a real server process on 127.0.0.1, driven by the official ``openai`` client: greedy answers
equal ``model.generate``; concurrency, cancellation, bad requests, the queue bound, the feature cache, no
compilation after warm-up, graceful shutdown."""

import base64
import concurrent.futures
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from ov_jax.serve import wait_until_healthy

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "ov_jax" / "assets"
REPO = pathlib.Path(__file__).resolve().parents[1]
SERVER_FLAGS = ["--max-batch-size", "4", "--max-queue", "20", "--cache-length", "4160", "--prompt-buckets",
                "64,1024,4096", "--decode-steps", "4", "--served-model-name", "tiny"]
NEW = 12


def data_uri(path: pathlib.Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


IMAGE = data_uri(ASSETS / "sample.jpg", "image/jpeg")
VIDEO = data_uri(ASSETS / "sample.mp4", "video/mp4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *flags):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "ov_jax.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, timeout=300, process=proc)
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        raise RuntimeError(f"{err}: {proc.communicate()[0][-3000:]}") from None
    return proc, url


def stop_server(proc) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    proc, url = start_server(tiny_ckpt, *SERVER_FLAGS)
    yield url
    out = stop_server(proc)
    assert "Application shutdown complete" in out, out[-2000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing import LlavaOnevisionProcessor

    return LlavaOnevision.from_pretrained(tiny_ckpt), LlavaOnevisionProcessor.from_pretrained(tiny_ckpt)


def messages(text, images=(), video=None):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    if video:
        content.append({"type": "video_url", "video_url": {"url": video}})
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def expected(local, text, images=(), video=None, new=NEW):
    """``model.generate`` on the processor's inputs for the same conversation, decoded as the server does."""
    from ov_jax.processing.media import load_image

    model, processor = local
    content = [{"type": "image", "image": load_image(u)} for u in images]
    if video:
        path = ASSETS / "sample.mp4"
        content.append({"type": "video", "video": str(path)})
    conversation = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    tokens = model.generate(**inputs, max_new_tokens=new, do_sample=False)[0]
    stops = set(model.generation_config.eos_token_id)
    kept = []
    for t in tokens.tolist():
        kept.append(t)
        if t in stops:
            break
    return processor.decode(kept, skip_special_tokens=True), len(kept)


def ask(client, msgs, stream=False, **kwargs):
    kwargs = dict(dict(max_tokens=NEW, temperature=0), **kwargs)
    if not stream:
        out = client.chat.completions.create(model="tiny", messages=msgs, **kwargs)
        return out.choices[0].message.content, out.usage.completion_tokens
    chunks = client.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                            stream_options={"include_usage": True}, **kwargs)
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, usage


CASES = {
    "text": ("What is in the sky?", (), None),
    "image": ("Describe the image.", (IMAGE,), None),
    "images": ("Compare the two images.", (IMAGE, IMAGE), None),
    "video": ("What happens in the video?", (), VIDEO),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_answers_equal_generate(client, local, case, stream):
    want = expected(local, *CASES[case])
    assert ask(client, messages(*CASES[case]), stream=stream) == want


def test_sixteen_concurrent_requests_streamed_and_not_equal_generate(client, local, server):
    rng = np.random.default_rng(0)
    words = "sky tree river cat bright green house".split()
    jobs = []
    for i in range(16):
        text = " ".join(rng.choice(words, int(rng.integers(1, 12))))
        images = (IMAGE,) if i % 4 == 1 else ()
        jobs.append((text, images, bool(i % 2), int(rng.integers(3, 20))))
    compiled = httpx.get(server + "/health").json()["compilations"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda j: ask(client, messages(j[0], j[1]), stream=j[2], max_tokens=j[3]), jobs))
    for (text, images, _, new), answer in zip(jobs, answers):
        assert answer == expected(local, text, images, new=new)
    # prompts of random sizes, with and without images, joined and left the batch: nothing compiled
    assert httpx.get(server + "/health").json()["compilations"] == compiled


def test_bad_requests_get_a_clear_4xx_while_good_ones_complete(client, local, server):
    good = [("Tell me about rivers", 15), ("A cat", 9), ("green house tree", 12)]
    bad = [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, "messages"),  # over the cache
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "messages"),
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good_futures = [pool.submit(ask, client, messages(t), max_tokens=n) for t, n in good]
        bad_futures = [pool.submit(httpx.post, server + "/v1/chat/completions", json=b, timeout=120) for b, _ in bad]
        for (body, field), future in zip(bad, bad_futures):
            response = future.result()
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == field and error["type"] == "invalid_request_error", error
            assert error["message"]
        for (text, n), future in zip(good, good_futures):
            assert future.result() == expected(local, text, new=n)
    assert httpx.post(server + "/v1/chat/completions", content=b"{not json", timeout=30).status_code == 400
    local_path = messages("x", (str(ASSETS / "sample.jpg"),))
    response = httpx.post(server + "/v1/chat/completions", json={"messages": local_path}, timeout=30)
    assert response.status_code == 400 and "--allow-local-media" in response.json()["error"]["message"]


def wait_idle(server, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(server + "/health").json()
        if health["running"] == 0 and health["queued"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_a_disconnecting_client_cancels_its_request_and_frees_its_slot(client, server):
    assert wait_idle(server)
    body = {"messages": messages("Tell a long story"), "max_tokens": 4000, "stream": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert httpx.get(server + "/health").json()["running"] == 1
    assert wait_idle(server, 30), "the disconnected request kept its slot"


def test_queue_bound_answers_429_with_an_openai_error(server):
    assert wait_idle(server)
    body = {"messages": messages("Tell a long story"), "max_tokens": 300, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(lambda _: httpx.post(server + "/v1/chat/completions", json=body, timeout=600),
                                  range(40)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 20, codes
    error = next(r for r in responses if r.status_code == 429).json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "queue is full" in error["message"]


def test_feature_cache_hits_on_a_repeated_image_and_metrics_report(client, local, server):
    before = httpx.get(server + "/health").json()["feature_cache"]
    other = data_uri(ASSETS / "sample.jpg", "image/jpeg").replace("image/jpeg", "image/jpg")  # same pixels
    first = ask(client, messages("Describe the image.", (other,)))
    second = ask(client, messages("What colour dominates?", (other,)))
    after = httpx.get(server + "/health").json()["feature_cache"]
    assert after["hits"] >= before["hits"] + 1
    assert first == expected(local, "Describe the image.", (IMAGE,))
    assert second == expected(local, "What colour dominates?", (IMAGE,))
    metrics = httpx.get(server + "/metrics").text
    for name in ("ov_jax_queue_length", "ov_jax_running_rows", "ov_jax_decode_tokens_per_second",
                 "ov_jax_time_to_first_token_seconds_count", "ov_jax_feature_cache_hits"):
        assert name in metrics
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_a_device_error_fails_its_requests_with_500_and_the_server_keeps_serving(tiny_ckpt, local, fail_next_call):
    """A decode call that raises (injected in an in-process server) fails the running request: 500 with a
    ``server_error`` body, or an error event ending its stream; the next request is answered as before."""
    from fastapi.testclient import TestClient

    from ov_jax.model import LlavaOnevision
    from ov_jax.serve.app import ServeOptions, Service, create_app

    options = ServeOptions(model=str(tiny_ckpt), max_batch_size=2, cache_length=96, prompt_buckets=(64,),
                           decode_steps=4, warmup=False, served_name="tiny")
    service = Service(LlavaOnevision.from_pretrained(tiny_ckpt), local[1], options)
    want = expected(local, "A cat")
    with TestClient(create_app(service)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0, http_client=http)
        assert ask(client, messages("A cat")) == want
        fail_next_call(service.engine, "_decode")
        with pytest.raises(openai.InternalServerError) as failed:
            ask(client, messages("A cat"))
        assert failed.value.status_code == 500
        error = failed.value.body
        assert error["type"] == "server_error" and "injected _decode failure" in error["message"]
        fail_next_call(service.engine, "_decode")
        with pytest.raises(openai.APIError, match="injected _decode failure"):
            ask(client, messages("A cat"), stream=True)
        assert service.scheduler.running == 0
        assert ask(client, messages("A cat")) == want
        assert ask(client, messages("A cat"), stream=True) == want
        assert 'ov_jax_requests_total{outcome="error"} 2.0' in http.get("/metrics").text


@pytest.mark.parametrize("flags, message", [
    (["--model", "/nonexistent/checkpoint"], "/nonexistent/checkpoint"),
    (["--model", "x", "--max-batch-size", "0"], "--max-batch-size"),
    (["--model", "x", "--prompt-buckets", "64,abc"], "--prompt-buckets"),
])
def test_bad_serve_arguments_are_one_error_line(flags, message):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "ov_jax.cli", "serve", *flags], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(("error:", "ov-jax serve: error:")) and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_wait_until_healthy_names_an_exited_server_and_times_out():
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    exited.wait(timeout=60)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RuntimeError, match="exited with status 3"):
        wait_until_healthy(url, timeout=30, process=exited)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer 200 within 0.3 s"):
        wait_until_healthy(url, timeout=0.3, interval=0.1)
    assert time.monotonic() - start < 5
