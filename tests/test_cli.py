"""The ``ov-jax`` command end to end on a tiny checkpoint.

Every subcommand runs as a subprocess (``python -m ov_jax.cli``, what the console script calls), sharing one
tiny checkpoint and its converted copy (made by the CLI itself) and a persistent jax compilation cache.
Answers are checked against transformers' greedy ``generate`` and against ``model.generate`` with the same
sampling arguments; error paths must give exactly one ``error:`` line and exit status 2.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ov_jax import cli
from ov_jax.processing.chat import single_turn

REPO = Path(__file__).resolve().parent.parent
SAMPLE_IMAGE = str(cli.SAMPLE_IMAGE)
SAMPLE_VIDEO = str(cli.SAMPLE_VIDEO)
PROMPT = "What is shown in this image?"
STATS_LINE = re.compile(r"^\[(\d+) tokens in [\d.]+ s: ([\d.]+|n/a) tokens/s decode, first token after [\d.]+ s; "
                        r"prompt (\d+) tokens\]$")
STAGES = ["processor input_ids", "processor pixel_values", "processor pixel_values_videos", "vision features",
          "projector", "packed image features", "packed video features", "logits", "greedy tokens"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def cli_env(workdir):
    """Subprocess environment: the repo importable, one CPU device, offline, a shared compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=str(workdir / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def ov_jax(*args, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "ov_jax.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture(scope="session")
def tiny_dir(workdir, cli_env):
    result = ov_jax("make-tiny", "tiny", cwd=workdir, env=cli_env)
    assert_ok(result)
    assert "wrote a tiny random-weight" in result.stdout
    return workdir / "tiny"


@pytest.fixture(scope="session")
def converted_dir(workdir, tiny_dir, cli_env):
    result = ov_jax("convert", "tiny", "tiny-converted", cwd=workdir, env=cli_env)
    assert_ok(result)
    assert result.stdout.startswith(f"wrote {workdir / 'tiny-converted'} (41 leaves")
    assert "converting tiny" in result.stderr  # the tqdm bar
    return workdir / "tiny-converted"


def split_answer(stdout: str) -> tuple[str, re.Match]:
    """The streamed answer and the final tokens/s line."""
    answer, _, last = stdout.rstrip("\n").rpartition("\n")
    stats = STATS_LINE.match(last)
    assert stats, f"no tokens/s line at the end of:\n{stdout}"
    return answer, stats


@pytest.fixture(scope="session")
def transformers_answer(tiny_dir):
    """transformers' greedy answer (token ids up to the stop token, and its text) for the sample-image prompt."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from ov_jax.compare import reference_processor

    processor = reference_processor(tiny_dir)
    messages = single_turn(PROMPT, [Image.open(SAMPLE_IMAGE).convert("RGB")])
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir).eval()
    stop = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    new = new[:new.index(stop) + 1] if stop in new else new
    return new, processor.decode([t for t in new if t != stop], skip_special_tokens=True), inputs["input_ids"].shape[1]


# ------------------------------------------------------------------------------------- make-tiny, convert


def test_make_tiny_writes_a_complete_checkpoint(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "processor_config.json", "generation_config.json"} <= names
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "llava_onevision"


def test_convert_output_loads_to_the_same_params(tiny_dir, converted_dir):
    import jax

    from ov_jax.model import LlavaOnevision

    source, converted = LlavaOnevision.from_pretrained(tiny_dir), LlavaOnevision.from_pretrained(converted_dir)
    assert jax.tree.structure(source.params) == jax.tree.structure(converted.params)
    for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(converted.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------- generate


def test_generate_streams_transformers_greedy_answer(workdir, converted_dir, cli_env, transformers_answer):
    """The README demo: the converted checkpoint (a relative path), the shipped sample image, greedy."""
    tokens, text, prompt_length = transformers_answer
    result = ov_jax("generate", "--model", "tiny-converted", "--image", SAMPLE_IMAGE, "--prompt", PROMPT,
                    "--max-new-tokens", 12, cwd=workdir, env=cli_env)
    assert_ok(result)
    answer, stats = split_answer(result.stdout)
    assert answer == text
    assert (int(stats[1]), int(stats[3])) == (len(tokens), prompt_length)
    assert "loading: 3/3" in result.stderr and "compiling buckets" in result.stderr  # tqdm bars


def test_generate_on_a_mesh_gives_the_unsharded_answer(workdir, converted_dir, cli_env, transformers_answer):
    env = dict(cli_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = ov_jax("generate", "--model", converted_dir, "--image", SAMPLE_IMAGE, "--prompt", PROMPT,
                    "--max-new-tokens", 12, "--mesh", "data=2,tensor=4", cwd=workdir, env=env)
    assert_ok(result)
    assert split_answer(result.stdout)[0] == transformers_answer[1]


def test_generate_multi_image_video_sampling_matches_the_api(workdir, tiny_dir, cli_env):
    """Two images (multi-image mode) and a 2-frame video, sampled: the CLI passes every argument through."""
    sampling = dict(temperature=0.8, top_p=0.9, top_k=40, seed=3)
    result = ov_jax("generate", "--model", tiny_dir, "--image", SAMPLE_IMAGE, "--image", SAMPLE_IMAGE,
                    "--video", SAMPLE_VIDEO, "--num-frames", 2, "--prompt", "Compare them.", "--max-new-tokens", 10,
                    *[a for k, v in sampling.items() for a in (f"--{k.replace('_', '-')}", v)],
                    cwd=workdir, env=cli_env)
    assert_ok(result)
    answer, stats = split_answer(result.stdout)

    from ov_jax.model import LlavaOnevision
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.from_pretrained(tiny_dir)
    images = cli.load_images([SAMPLE_IMAGE, SAMPLE_IMAGE])
    inputs = processor.apply_chat_template(single_turn("Compare them.", images, SAMPLE_VIDEO),
                                           add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=2)
    assert inputs["batch_num_images"].tolist() == [2] and inputs["pixel_values_videos"].shape[1] == 2
    tokens = LlavaOnevision.from_pretrained(tiny_dir).generate(**inputs, max_new_tokens=10, do_sample=True,
                                                                **sampling)[0].tolist()
    stop = processor.tokenizer.token_to_id("<|im_end|>")
    tokens = tokens[:tokens.index(stop) + 1] if stop in tokens else tokens
    assert int(stats[1]) == len(tokens) and int(stats[3]) == inputs["input_ids"].shape[1]
    assert answer == processor.decode([t for t in tokens if t != stop], skip_special_tokens=True)


def test_readme_python_example_runs(converted_dir, cli_env):
    """The README's Python block, verbatim but for the model id (the tiny converted checkpoint)."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Python\n.*?```python\n(.*?)```", readme, re.S)[1]
    hub_id = 'model_id = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"'
    assert hub_id in block
    code = block.replace(hub_id, f"model_id = {str(converted_dir)!r}")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env, capture_output=True, text=True,
                            timeout=600)
    assert_ok(result)
    assert result.stdout.strip()


# ----------------------------------------------------------------------------------------------- compare


def parse_table(stdout: str) -> dict[str, dict]:
    rows = {}
    for line in stdout.splitlines():
        name = next((s for s in STAGES if line.startswith(s + " ")), None)
        if name:
            cells = re.split(r"\s{2,}", line[len(name):].strip())
            rows[name] = dict(zip(["shape", "max_abs", "max_rel", "top1", "status", "note"], cells))
    return rows


def test_compare_converted_copy_passes_at_1e_4(workdir, tiny_dir, converted_dir, cli_env):
    """Image + video through both implementations; the JAX side loads the converted copy."""
    result = ov_jax("compare", "--model", "tiny", "--jax-model", "tiny-converted", "--image", SAMPLE_IMAGE,
                    "--video", SAMPLE_VIDEO, "--num-frames", 2, "--tolerance", "1e-4", "--max-new-tokens", 6,
                    cwd=workdir, env=cli_env)
    assert_ok(result)
    rows = parse_table(result.stdout)
    assert list(rows) == STAGES
    assert rows["processor input_ids"]["note"].startswith("identical")
    assert float(rows["processor pixel_values"]["max_abs"]) == 0.0
    assert rows["processor pixel_values_videos"]["status"] == "info"
    for name in STAGES[3:-1]:
        assert rows[name]["status"] == "ok" and float(rows[name]["max_abs"]) <= 1e-4, (name, rows[name])
    assert rows["logits"]["top1"] == "100.00%"
    assert rows["greedy tokens"]["note"] == "identical"
    assert "PASS: every stage within max abs diff 0.0001" in result.stdout


def test_compare_exits_1_when_one_weight_is_perturbed(workdir, tiny_dir, cli_env):
    """One projector bias entry +0.01 on the JAX side: the tower still agrees, the projector onward fail."""
    from safetensors.numpy import load_file, save_file

    perturbed = workdir / "tiny-perturbed"
    shutil.copytree(tiny_dir, perturbed, dirs_exist_ok=True)
    tensors = load_file(perturbed / "model.safetensors")
    tensors["multi_modal_projector.linear_2.bias"][0] += 0.01
    save_file(tensors, perturbed / "model.safetensors", metadata={"format": "pt"})
    result = ov_jax("compare", "--model", "tiny", "--jax-model", perturbed, "--image", SAMPLE_IMAGE,
                    "--max-new-tokens", 0, cwd=workdir, env=cli_env)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = parse_table(result.stdout)
    assert rows["vision features"]["status"] == "ok"
    assert rows["projector"]["status"] == "FAIL" and abs(float(rows["projector"]["max_abs"]) - 0.01) < 1e-5
    assert rows["packed image features"]["status"] == "FAIL"
    assert "greedy tokens" not in rows
    assert result.stdout.rstrip().endswith("FAIL: projector, packed image features, logits over max abs diff 0.001")


# ------------------------------------------------------------------------------------------ batch, bench


def test_batch_answers_a_jsonl(workdir, converted_dir, cli_env, transformers_answer):
    """An image request and a text request in one batch; the image row's answer is transformers' greedy one."""
    requests = workdir / "requests.jsonl"
    requests.write_text(json.dumps({"id": "img", "prompt": PROMPT, "images": [SAMPLE_IMAGE]}) + "\n"
                        + json.dumps({"id": "txt", "prompt": "Tell me a story."}) + "\n")
    answers = workdir / "answers.jsonl"
    result = ov_jax("batch", "--model", "tiny-converted", "--input", requests, "--output", answers,
                    "--dtype", "float32", "--max-new-tokens", 6, "--batch-size", 2, cwd=workdir, env=cli_env)
    assert_ok(result)
    assert "2 requests: 0 already done, 2 answered, 0 failed" in result.stdout
    records = {r["id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.from_pretrained(converted_dir)
    stop = processor.tokenizer.token_to_id("<|im_end|>")
    expected = processor.decode([t for t in transformers_answer[0][:6] if t != stop], skip_special_tokens=True)
    assert records["img"]["answer"] == expected and isinstance(records["txt"]["answer"], str)


def test_bench_runs_a_benchmark_script(workdir, cli_env):
    result = ov_jax("bench", "--script", "aot_plan.py", "--", "--help", cwd=workdir, env=cli_env, timeout=300)
    assert_ok(result)
    assert "benchmarks/aot_plan.py --help" in result.stderr and "usage:" in result.stdout


def test_bench_runs_the_engine_benchmark_dry_run(workdir, cli_env):
    """The default script, bench_engine.py, on its tiny preset (the real run is the 0.5B architecture)."""
    script = cli.BENCHMARKS / "bench_engine.py"
    if not script.is_file() or "--preset" not in script.read_text():
        pytest.skip("benchmarks/bench_engine.py with its --preset tiny dry run is not in this checkout yet")
    out = workdir / "bench.json"
    result = ov_jax("bench", "--", "--preset", "tiny", "--systems", "ov_jax", "--dtypes", "float32",
                    "--workloads", "decode", "--out", out, cwd=workdir, env=cli_env)
    assert_ok(result)
    assert "benchmarks/bench_engine.py --preset tiny" in result.stderr
    run = json.loads(out.read_text())["runs"]["float32"]["ov_jax"]
    assert run["decode_tok_s_b1"] > 0 and run["decode_tok_s_b8"] > 0
    assert "| decode tok/s, batch 1" in result.stdout


@pytest.mark.slow
def test_bench_decode_on_the_0_5b_architecture(tmp_path, cli_env):
    """The real benchmark, ov_jax only, decode only (the 0.5B architecture: minutes on 2 cores)."""
    out = tmp_path / "results.json"
    result = ov_jax("bench", "--", "--systems", "ov_jax", "--dtypes", "float32", "--workloads", "decode", "--out", out,
                    cwd=tmp_path, env=cli_env, timeout=1800)
    assert_ok(result)
    run = json.loads(out.read_text())["runs"]["float32"]["ov_jax"]
    assert run["decode_tok_s_b1"] > 0 and run["decode_tok_s_b8"] > 0


# ------------------------------------------------------------------------------------------- error paths


def visible_lines(text: str) -> list[str]:
    """What a terminal shows: per line, the text after the last carriage return (tqdm bars redraw with \\r)."""
    return [shown for line in text.split("\n") if (shown := line.rpartition("\r")[2].strip())]


def one_error_line(capsys, argv) -> str:
    assert cli.main(argv) == cli.EXIT_ERROR
    out, err = capsys.readouterr()
    lines = visible_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    return lines[0]


@pytest.fixture
def garbage_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png")
    return path


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "checkpoint directory '/no/such/dir' does not exist"),
    (["generate", "--model", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "--prompt", "x"], "pass its local directory"),
    (["generate", "--model", "m", "--image", "/no/such.png", "--prompt", "hi"], "image '/no/such.png' does not exist"),
    (["generate", "--model", "m", "--image", "GARBAGE", "--prompt", "hi"], "cannot read image"),
    (["generate", "--model", "m", "--video", "/no/such.mp4", "--prompt", "hi"], "video '/no/such.mp4' does not exist"),
    (["generate", "--model", "m", "--prompt", "hi", "--mesh", "data=2,model=4"], "'model=4' is not 'axis=size'"),
    (["generate", "--model", "m", "--prompt", "hi", "--mesh", "data=16"], "needs 16 devices but 8 are available"),
    (["generate", "--model", "m", "--prompt", "hi", "--top-p", "0.5"], "--top-p only filter sampled tokens"),
    (["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["compare", "--model", "/no/such/checkpoint"], "does not exist"),
    (["bench", "--script", "nope.py"], "benchmark script 'nope.py' not found"),
])
def test_bad_input_is_one_line(capsys, garbage_image, argv, expected):
    argv = [str(garbage_image) if a == "GARBAGE" else a for a in argv]
    assert expected in one_error_line(capsys, argv)


def test_errors_after_loading_started_are_one_line(capsys, tiny_dir, tmp_path):
    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"\x00" * 1000)
    base = ["generate", "--model", str(tiny_dir), "--prompt", "hi"]
    assert "cannot read video" in one_error_line(capsys, base + ["--video", str(broken_video)])
    assert "lower max_new_tokens" in one_error_line(capsys, base + ["--max-new-tokens", "100000"])


def test_existing_outputs_are_refused(capsys, tiny_dir, converted_dir):
    assert "already exists (an earlier make-tiny output)" in one_error_line(capsys, ["make-tiny", str(tiny_dir)])
    assert "already exists" in one_error_line(capsys, ["convert", str(tiny_dir), str(converted_dir), "--no-progress"])


def test_compare_refuses_a_converted_reference(capsys, converted_dir):
    assert "which transformers cannot read" in one_error_line(capsys, ["compare", "--model", str(converted_dir)])


def test_subprocess_error_has_no_traceback(workdir, cli_env):
    result = ov_jax("generate", "--model", "./missing-dir", "--prompt", "hi", cwd=workdir, env=cli_env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: checkpoint directory './missing-dir' does not exist"


def test_console_script_points_at_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ov-jax": "ov_jax.cli:main"}
    assert cli.SAMPLE_IMAGE.stat().st_size < 100_000 and cli.SAMPLE_VIDEO.stat().st_size < 100_000
