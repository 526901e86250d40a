"""`ov-jax serve` as a two-process CPU job (`jax.distributed`, 4 simulated devices per process, a mesh spanning
both): process 0 serves HTTP, process 1 follows its steps (`ov_jax.serve.lockstep`). Greedy answers through the
official ``openai`` client equal single-process ``model.generate``, and SIGINT to process 0 ends both."""

import concurrent.futures
import os
import signal
import subprocess
import sys

import pytest

from ov_jax.serve import wait_until_healthy

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_serve import IMAGE, REPO, ask, expected, free_port, messages  # noqa: E402

CASES = [("What is in the sky?", (), None), ("Describe the image.", (IMAGE,), None)]


@pytest.mark.slow  # two jax processes start, connect, compile and serve: ~1-2 min on 2 shared cores
def test_two_process_server_answers_as_one_process_generate_and_shuts_down(tmp_path):
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing import LlavaOnevisionProcessor
    from ov_jax.tiny import make_tiny

    checkpoint = make_tiny(tmp_path / "ckpt", text_overrides={"num_attention_heads": 8},
                           vision_overrides={"num_attention_heads": 4})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    flags = ["--model", str(checkpoint), "--port", str(port), "--coordinator", f"127.0.0.1:{free_port()}",
             "--num-processes", "2", "--mesh", "data=2,tensor=4", "--max-batch-size", "2", "--cache-length", "2080",
             "--prompt-buckets", "32,2048", "--decode-steps", "4", "--served-model-name", "tiny"]
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "ov_jax.cli", "serve", *flags, "--process-id", str(i)],
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]

    def output(i: int) -> str:
        logs[i].seek(0)
        return logs[i].read()

    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout=300, process=procs[0])
        assert procs[1].poll() is None, output(1)[-3000:]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)
        with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:  # both rows decode together
            answers = list(pool.map(lambda case, stream: ask(client, messages(*case), stream=stream),
                                    CASES, [True, False]))
        procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=90) for p in procs]  # the follower exits on process 0's shutdown broadcast
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # process 0 ends as the one-process server does on SIGINT (graceful shutdown, then the CLI's "interrupted")
    assert codes == [130, 0], (output(0)[-3000:], output(1)[-3000:])
    assert "Application shutdown complete" in output(0)
    assert "process 1 of 2: following process 0's serving steps" in output(1)
    assert "process 1: process 0 shut down" in output(1) and "Uvicorn running" not in output(1)

    local = LlavaOnevision.from_pretrained(checkpoint), LlavaOnevisionProcessor.from_pretrained(checkpoint)
    assert answers == [expected(local, *case) for case in CASES]
    assert answers[0] != answers[1] and all(n > 0 for _, n in answers)
