"""Multi-host start-up from flags / environment, and a real two-process CPU job running resumable batch inference
on a mesh that spans both processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ov_jax import distributed


@pytest.fixture
def init_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    return calls


def test_single_process_with_nothing_set_does_not_initialize(init_calls):
    assert distributed.maybe_initialize_distributed(environ={}) is False
    assert distributed.maybe_initialize_distributed("host:1234", 1, 0, environ={}) is False  # one process
    assert init_calls == []


def test_flags_and_environment_start_explicitly(init_calls):
    assert distributed.maybe_initialize_distributed("10.0.0.1:1234", 4, 2, environ={}) is True
    env = {"OV_JAX_COORDINATOR": "10.0.0.1:1234", "OV_JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.maybe_initialize_distributed(environ=env) is True
    # a flag overrides the environment
    assert distributed.maybe_initialize_distributed(process_id=1, environ=env) is True
    assert init_calls == [(("10.0.0.1:1234", 4, 2), {}), (("10.0.0.1:1234", 4, 3), {}), (("10.0.0.1:1234", 4, 1), {})]


@pytest.mark.parametrize("env, launcher", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "TPU"),
    ({"OV_JAX_DISTRIBUTED": "auto"}, None),
])
def test_multi_process_clusters_auto_detect(init_calls, env, launcher):
    assert distributed.maybe_initialize_distributed(environ=env) is True
    assert init_calls == [((), {})]


def test_single_task_clusters_and_opt_out_stay_single_process(init_calls):
    assert distributed.maybe_initialize_distributed(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is False
    assert distributed.maybe_initialize_distributed(
        environ={"TPU_WORKER_HOSTNAMES": "a,b", "OV_JAX_DISTRIBUTED": "off"}) is False
    assert init_calls == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="h:1", num_processes=2), r"missing \['process_id'\]"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "not in \\[0, num_processes=2\\)"),
    (dict(coordinator="h:1", num_processes="two", process_id=0), "num_processes must be an integer"),
])
def test_incomplete_settings_are_clear_errors(init_calls, kwargs, message):
    with pytest.raises(distributed.DistributedConfigError, match=message):
        distributed.maybe_initialize_distributed(**kwargs, environ={})
    assert init_calls == []


# --- two real processes ----------------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import functools, os, sys
    process_id, port, requests, results, stop_after = sys.argv[1:6]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from ov_jax.distributed import maybe_initialize_distributed
    assert maybe_initialize_distributed(f"localhost:{port}", 2, int(process_id))
    import jax
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from ov_jax import sharding as sh
    from ov_jax.batch_inference import run_batch_inference
    sys.path.insert(0, os.path.dirname(requests))
    from job import make_infer

    mesh = sh.make_mesh("data=2,tensor=4")  # data spans the two processes, tensor stays within each
    infer = make_infer(mesh, stop_after=int(stop_after))
    try:
        print(run_batch_inference(requests, results, infer, batch_size=3))
    except SystemExit:
        print("interrupted")
    """)

JOB = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from ov_jax import sharding as sh
    from ov_jax.config import OneVisionConfig, TextConfig, VisionConfig
    from ov_jax.modeling import llava
    from ov_jax.params import random_params

    CONFIG = OneVisionConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
        tie_word_embeddings=False)
    ROWS, LENGTH = 4, 16

    def tokens(records):
        ids, mask = np.zeros((ROWS, LENGTH), np.int32), np.zeros((ROWS, LENGTH), bool)
        for row, record in enumerate(records):
            t = [ord(c) % 250 + 1 for c in record["prompt"]][-LENGTH:]
            ids[row, LENGTH - len(t):], mask[row, LENGTH - len(t):] = t, True
        mask[len(records):, -1] = True  # padding rows: one dummy token
        return ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)

    def make_infer(mesh, stop_after=-1):
        params = random_params(CONFIG, seed=3)
        if mesh is not None:
            params = sh.shard_params(params, CONFIG, mesh)
        forward = jax.jit(functools.partial(llava.forward, config=CONFIG, dtype=jnp.float32))
        batches = []

        def infer(records):
            if len(batches) == stop_after:
                raise SystemExit()
            batches.append(len(records))
            ids, mask, pos = tokens(records)
            empty = (np.zeros((0, 3, 384, 384), np.float32), np.zeros((ROWS, LENGTH, 4), np.int32),
                     np.zeros((ROWS, LENGTH, 4), np.float32), np.zeros((ROWS, LENGTH), bool))
            args = (ids, mask, pos) + empty
            if mesh is not None:
                kinds = ("tokens", "tokens", "tokens", "tower_inputs", "taps", "taps", "tokens")
                args = [sh.put_global(a, sh.activation_sharding(mesh, k, a.shape)) for k, a in zip(kinds, args)]
            logits = forward(params, *args)
            best = jax.jit(lambda l: jnp.argmax(l[:, -1], -1))(logits)
            if mesh is not None:
                best = multihost_utils.process_allgather(best, tiled=True)
            return [int(b) for b in np.asarray(best)[:len(records)]]

        return infer
    """)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path, requests, results, stop_after):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(port), str(requests), str(results),
                               str(stop_after)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.mark.slow  # two jax processes start, connect and compile twice: ~30 s on 2 shared cores
def test_two_process_batch_inference_on_a_spanning_mesh_resumes(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    prompts = [f"prompt number {i} " + "xyz"[: i % 3] for i in range(10)]
    requests.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))

    first = _run_two_processes(tmp_path, requests, results, stop_after=2)
    assert all("interrupted" in out for out in first)
    assert [r["id"] for r in map(json.loads, results.read_text().splitlines())] == list(range(6))
    second = _run_two_processes(tmp_path, requests, results, stop_after=-1)
    assert all("6 already done, 4 answered, 0 failed" in out for out in second), second[0][-2000:]

    sys.path.insert(0, str(tmp_path))
    try:
        from job import make_infer
    finally:
        sys.path.remove(str(tmp_path))
    reference = make_infer(None)  # one process, unsharded
    expected = [a for i in range(0, 10, 3) for a in reference([{"prompt": p} for p in prompts[i:i + 3]])]
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert written == [{"id": i, "answer": a} for i, a in enumerate(expected)]
    assert len(set(expected)) > 1
    assert np.all(np.array(expected) >= 0)


GENERATE_WORKER = textwrap.dedent("""
    import json, os, sys
    process_id, port, checkpoint, mesh = sys.argv[1:5]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from ov_jax.distributed import maybe_initialize_distributed
    assert maybe_initialize_distributed(f"localhost:{port}", 2, int(process_id))
    import numpy as np
    from ov_jax.engine import Buckets, engine_for
    from ov_jax.model import LlavaOnevision
    model = LlavaOnevision.from_pretrained(checkpoint, mesh=mesh)
    engine_for(model, Buckets(batch=(4,), prompt=(32,), cache=(64,)))
    ids = np.random.default_rng(0).integers(1, 200, (4, 20))
    print("TOKENS", json.dumps(model.generate(ids, max_new_tokens=6, stop_token_ids=[]).tolist()))
    """)


@pytest.mark.slow  # two jax processes load, compile and generate: ~40 s per mesh on 2 shared cores
@pytest.mark.parametrize("mesh", ["data=1,tensor=8", "data=2,tensor=4"])
def test_two_process_generate_matches_one_process(tmp_path, mesh):
    engine = pytest.importorskip("ov_jax.engine")
    if "mesh" not in __import__("inspect").signature(engine.Engine).parameters:
        pytest.skip("the engine does not take a mesh yet")
    from ov_jax.model import LlavaOnevision
    from ov_jax.tiny import make_tiny

    checkpoint = make_tiny(tmp_path / "ckpt", text_overrides={"num_attention_heads": 8},
                           vision_overrides={"num_attention_heads": 4})
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-c", GENERATE_WORKER, str(i), str(port), str(checkpoint), mesh],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    tokens = []
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        tokens.append(json.loads(out.split("TOKENS ")[-1].splitlines()[0]))

    model = LlavaOnevision.from_pretrained(checkpoint)
    engine.engine_for(model, engine.Buckets(batch=(4,), prompt=(32,), cache=(64,)))
    ids = np.random.default_rng(0).integers(1, 200, (4, 20))
    reference = model.generate(ids, max_new_tokens=6, stop_token_ids=[]).tolist()
    assert tokens[0] == tokens[1] == reference
