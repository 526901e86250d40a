"""The ``ov-jax`` command end to end on a tiny checkpoint.

Every subcommand runs as a subprocess (``python -m ov_jax.cli``, what the console script calls), sharing one
tiny checkpoint and its converted copy (made by the CLI itself) and a persistent jax compilation cache.
Answers are checked against transformers' greedy ``generate`` and against ``model.generate`` with the same
sampling arguments; error paths must give exactly one ``error:`` line and exit status 2.
"""

import io
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
    """Subprocess environment: the repo importable, one CPU device, offline, a shared compilation cache (the
    README's switch, JAX_COMPILATION_CACHE_DIR alone)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_PERSISTENT_CACHE_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=str(workdir / "jax-cache"))
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


def test_generate_reads_the_prompt_from_stdin(workdir, converted_dir, cli_env, transformers_answer):
    """``--prompt-file -``: the prompt piped in (its final newline dropped) gives the --prompt answer."""
    result = subprocess.run([sys.executable, "-m", "ov_jax.cli", "generate", "--model", "tiny-converted", "--image",
                             SAMPLE_IMAGE, "--prompt-file", "-", "--max-new-tokens", "12"], input=PROMPT + "\n",
                            cwd=workdir, env=cli_env, capture_output=True, text=True, timeout=600)
    assert_ok(result)
    answer, stats = split_answer(result.stdout)
    assert answer == transformers_answer[1] and int(stats[3]) == transformers_answer[2]


def test_read_prompt_keeps_the_text_but_one_final_newline(tmp_path, monkeypatch):
    path = tmp_path / "prompt.txt"
    text = "Line one,\n\n  line two ünï 😀\t" + "x" * 200_000  # over argv's 128 KiB per-argument cap
    for ending in ("", "\n", "\r\n"):
        path.write_bytes((text + ending).encode())
        assert cli.read_prompt(None, str(path)) == text
    path.write_bytes((text + "\n\n").encode())
    assert cli.read_prompt(None, str(path)) == text + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((text + "\n").encode())))
    assert cli.read_prompt(None, "-") == text
    assert cli.read_prompt("as given\n", None) == "as given\n" and cli.read_prompt(None, None) is None


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


CACHE_PROBE = """
import collections, sys
from jax import monitoring
events = collections.Counter()
monitoring.register_event_listener(lambda event, **_: events.update([event.rpartition("/")[2]]))
from ov_jax.engine import Buckets, engine_for
from ov_jax.model import LlavaOnevision
engine = engine_for(LlavaOnevision.from_pretrained(sys.argv[1]), Buckets(batch=(1,), prompt=(32,), cache=(40,)))
engine.warmup(media=False, progress=False)
print(engine.compile_count, events["compile_requests_use_cache"], events["cache_hits"])
"""


def test_compilation_cache_dir_alone_reuses_every_executable(tmp_path, tiny_dir, cli_env):
    """The README's switch: with only JAX_COMPILATION_CACHE_DIR set, the first process writes every executable
    (the engine's and the loader's, sub-second ones included: jax alone writes only those that took over a second)
    and a second process loads every one of them from the cache."""
    cache = tmp_path / "cache"
    env = dict(cli_env, JAX_COMPILATION_CACHE_DIR=str(cache))
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tiny_dir)], env=env, capture_output=True,
                                text=True, timeout=600)
        assert_ok(result)
        runs.append((*map(int, result.stdout.split()), sorted(os.listdir(cache))))
    (engine_compiles, requests, first_hits, first_files), (_, requests_again, hits, files) = runs
    assert engine_compiles == 5 and requests >= engine_compiles and first_hits == 0
    assert len([f for f in first_files if f.endswith("-cache")]) == requests
    assert hits == requests_again == requests, f"{hits} of {requests_again} executables came from the cache"
    assert files == first_files


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


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_dir, converted_dir):
    """A folder of everything a user can get wrong: missing, looping and broken paths, directories where files
    belong, files that are not images / videos / UTF-8 / JSON, request files with each kind of bad line, and
    damaged copies of the tiny checkpoint."""
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "adir").mkdir()
    (d / "loop_a").symlink_to(d / "loop_b")
    (d / "loop_b").symlink_to(d / "loop_a")
    (d / "broken_link").symlink_to(d / "nowhere")
    (d / "garbage.png").write_bytes(b"this is not a png")
    (d / "empty.png").write_bytes(b"")
    (d / "broken.mp4").write_bytes(b"\x00" * 1000)
    (d / "not_utf8.txt").write_bytes(b"hi \xff there")
    (d / "blank.txt").write_text(" \n")
    (d / "file.txt").write_text("a plain file\n")
    (d / "mesh_bad.json").write_text("{")
    requests = {"req": b'{"id": "a", "prompt": "hi"}\n', "bad_utf8": b'{"id": "a", "prompt": "hi"}\n\xff\n',
                "bad_json": b'{"id": "a", "prompt": "hi"\n', "typo": b'{"id": "a", "prompt": "hi", "max_tokens": 3}\n',
                "zero": b'{"id": "a", "prompt": "hi", "max_new_tokens": 0}\n',
                "dup": b'{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "again"}\n', "empty": b""}
    for name, content in requests.items():
        (d / f"{name}.jsonl").write_bytes(content)
    (d / "req_link.jsonl").symlink_to(d / "req.jsonl")
    for name in ("ckpt_bad_config", "ckpt_truncated", "ckpt_no_weights"):
        shutil.copytree(tiny_dir, d / name)
    (d / "ckpt_bad_config" / "config.json").write_text("{")
    weights = d / "ckpt_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (d / "ckpt_no_weights" / "model.safetensors").unlink()
    damaged_files = {"ckpt_tokenizer_not_utf8": ("tokenizer.json", b'{"a": "\xff"}'),
                     "ckpt_tokenizer_not_json": ("tokenizer.json", b'{"a": '),
                     "ckpt_tokenizer_config_not_utf8": ("tokenizer_config.json", b"\xff"),
                     "ckpt_tokenizer_config_bad_token": ("tokenizer_config.json", b'{"eos_token": 5}'),
                     "ckpt_processor_config_bad_section": ("processor_config.json", b'{"image_processor": 5}'),
                     "ckpt_preprocessor_config_not_json": ("preprocessor_config.json", b"{"),
                     "ckpt_chat_template_not_utf8": ("chat_template.jinja", b"{{ \xff }}"),
                     "ckpt_chat_template_json_bad": ("chat_template.json", b'{"chat_template": 5}'),
                     "ckpt_generation_config_not_json": ("generation_config.json", b"{"),
                     "ckpt_garbage_weights": ("model.safetensors", b"garbage, not safetensors")}
    for name, (file, content) in damaged_files.items():
        shutil.copytree(tiny_dir, d / name)
        (d / name / file).write_bytes(content)
    shutil.copytree(converted_dir, d / "converted_damaged")
    chunk = max((p for p in (d / "converted_damaged").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:100])
    return d


GEN = ["generate", "--model", "{tiny}", "--prompt", "hi"]
BATCH = ["batch", "--model", "{tiny}", "--input", "req.jsonl", "--output", "out.jsonl"]
ERROR_WALK = [  # (argv, what the one error line must say); relative paths are in the bad_inputs folder
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (GEN + ["--bogus"], "unrecognized arguments: --bogus"),
    # generate: the checkpoint
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "checkpoint directory '/no/such/dir' does not exist"),
    (["generate", "--model", "./missing", "--prompt", "hi"], "checkpoint directory './missing' does not exist"),
    (["generate", "--model", "adir/missing", "--prompt", "hi"], "checkpoint directory 'adir/missing' does not exist"),
    (["generate", "--model", "loop_a", "--prompt", "hi"], "checkpoint directory 'loop_a' is a symlink loop"),
    (["generate", "--model", "broken_link", "--prompt", "hi"],
     "checkpoint directory 'broken_link' is a broken symlink"),
    (["generate", "--model", "file.txt", "--prompt", "hi"], "checkpoint path 'file.txt' is a file"),
    (["generate", "--model", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "--prompt", "x"],
     "no local directory 'llava-hf/llava-onevision-qwen2-0.5b-ov-hf' exists, and as a Hugging Face Hub id it cannot "
     "be fetched: HF_HUB_OFFLINE is set"),
    (["generate", "--model", "ckpt_bad_config", "--prompt", "hi"], "config.json is not valid JSON"),
    (["generate", "--model", "ckpt_truncated", "--prompt", "hi"], "cannot read safetensors file"),
    (["generate", "--model", "ckpt_no_weights", "--prompt", "hi"], "no model.safetensors or model.safetensors.index"),
    (["generate", "--model", "ckpt_garbage_weights", "--prompt", "hi"],
     "cannot read safetensors file ckpt_garbage_weights/model.safetensors"),
    (["generate", "--model", "ckpt_tokenizer_not_utf8", "--prompt", "hi"],
     "ckpt_tokenizer_not_utf8/tokenizer.json is not valid UTF-8 text (byte 0xff at offset 7"),
    (["generate", "--model", "ckpt_tokenizer_not_json", "--prompt", "hi"],
     "ckpt_tokenizer_not_json/tokenizer.json is not a tokenizer file the tokenizers library can read"),
    (["generate", "--model", "ckpt_tokenizer_config_not_utf8", "--prompt", "hi"],
     "ckpt_tokenizer_config_not_utf8/tokenizer_config.json is not valid UTF-8 text"),
    (["generate", "--model", "ckpt_tokenizer_config_bad_token", "--prompt", "hi"],
     "ckpt_tokenizer_config_bad_token/tokenizer_config.json: cannot read a special token from 5"),
    (["generate", "--model", "ckpt_processor_config_bad_section", "--prompt", "hi"],
     "ckpt_processor_config_bad_section/processor_config.json: 'image_processor' must be a JSON object, got int"),
    (["generate", "--model", "ckpt_preprocessor_config_not_json", "--prompt", "hi"],
     "ckpt_preprocessor_config_not_json/preprocessor_config.json is not valid JSON"),
    (["generate", "--model", "ckpt_chat_template_not_utf8", "--prompt", "hi"],
     "ckpt_chat_template_not_utf8/chat_template.jinja is not valid UTF-8 text"),
    (["generate", "--model", "ckpt_chat_template_json_bad", "--prompt", "hi"],
     "ckpt_chat_template_json_bad/chat_template.json: chat_template must be a string"),
    (["generate", "--model", "ckpt_generation_config_not_json", "--prompt", "hi"],
     "ckpt_generation_config_not_json/generation_config.json: not a valid generation config"),
    (["generate", "--model", "converted_damaged", "--prompt", "hi"], "convert it again"),
    # generate: media
    (GEN + ["--image", "/no/such.png"], "image '/no/such.png' does not exist"),
    (GEN + ["--image", "adir"], "image 'adir' is a directory, not a file"),
    (GEN + ["--image", "loop_a"], "image 'loop_a' is a symlink loop"),
    (GEN + ["--image", "broken_link"], "image 'broken_link' is a broken symlink"),
    (GEN + ["--image", "garbage.png"], "cannot read image 'garbage.png'"),
    (GEN + ["--image", "empty.png"], "cannot read image 'empty.png'"),
    (GEN + ["--video", "/no/such.mp4"], "video '/no/such.mp4' does not exist"),
    (GEN + ["--video", "adir"], "video 'adir' is a directory, not a file"),
    (GEN + ["--video", "broken.mp4"], "cannot read video 'broken.mp4'"),
    # generate: dtype, mesh, numbers
    (GEN + ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (GEN + ["--mesh", "data=2,model=4"], "'model=4' is not 'axis=size'"),
    (GEN + ["--mesh", "data=16"], "needs 16 devices but 8 are available"),
    (GEN + ["--mesh", "missing.json"], "mesh file 'missing.json' does not exist"),
    (GEN + ["--mesh", "mesh_bad.json"], "mesh file 'mesh_bad.json' is not valid JSON"),
    (GEN + ["--max-new-tokens", "x"], "argument --max-new-tokens: invalid int value: 'x'"),
    (GEN + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (GEN + ["--max-new-tokens", "100000"], "lower max_new_tokens"),
    (GEN + ["--num-frames", "0"], "--num-frames must be >= 1"),
    (GEN + ["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
    (GEN + ["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    (GEN + ["--top-p", "inf", "--temperature", "1"], "top_p must be"),
    (GEN + ["--top-p", "0.5"], "--top-p only filter sampled tokens"),
    (GEN + ["--top-k", "-1", "--temperature", "1"], "top_k must be an integer >= 0 (0 = off), got -1"),
    (GEN + ["--temperature", "1e-300"], "temperature must be > 0 when sampling"),
    (GEN + ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    # generate: the prompt
    (["generate", "--model", "{tiny}"], "one of the arguments --prompt --prompt-file is required"),
    (GEN + ["--prompt-file", "file.txt"], "argument --prompt-file: not allowed with argument --prompt"),
    (["generate", "--model", "{tiny}", "--prompt", " "], "--prompt is empty"),
    (["generate", "--model", "{tiny}", "--prompt", "hi \udcff"], "--prompt is not valid UTF-8 text"),
    (["generate", "--model", "{tiny}", "--prompt-file", "not_utf8.txt"],
     "prompt file 'not_utf8.txt' is not valid UTF-8 text (byte 0xff at offset 3"),
    (["generate", "--model", "{tiny}", "--prompt-file", "-"], "the prompt on stdin is not valid UTF-8 text"),
    (["generate", "--model", "{tiny}", "--prompt-file", "missing.txt"], "prompt file 'missing.txt' does not exist"),
    (["generate", "--model", "{tiny}", "--prompt-file", "adir"], "prompt file 'adir' is a directory"),
    (["generate", "--model", "{tiny}", "--prompt-file", "blank.txt"], "prompt file 'blank.txt' is empty"),
    # compare
    (["compare", "--model", "/no/such/checkpoint"], "checkpoint directory '/no/such/checkpoint' does not exist"),
    (["compare", "--model", "{tiny}", "--tolerance", "0"], "--tolerance must be > 0"),
    (["compare", "--model", "{tiny}", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["compare", "--model", "{tiny}", "--image", "adir"], "image 'adir' is a directory"),
    (["compare", "--model", "{tiny}", "--video", "broken.mp4"], "cannot read video 'broken.mp4'"),
    (["compare", "--model", "{tiny}", "--prompt-file", "not_utf8.txt"],
     "prompt file 'not_utf8.txt' is not valid UTF-8"),
    (["compare", "--model", "{converted}"], "which transformers cannot read"),
    (["compare", "--model", "ckpt_truncated"], "cannot read safetensors file ckpt_truncated/model.safetensors"),
    (["compare", "--model", "ckpt_garbage_weights"], "cannot read safetensors file ckpt_garbage_weights/"),
    (["compare", "--model", "ckpt_bad_config"], "ckpt_bad_config/config.json is not valid JSON"),
    # batch: numbers and flags
    (BATCH + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (BATCH + ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (BATCH + ["--num-frames", "0"], "--num-frames must be >= 1, got 0"),
    (BATCH + ["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (BATCH + ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (BATCH + ["--media-root", "missing"], "--media-root 'missing' does not exist"),
    (BATCH + ["--mesh", "bogus"], "mesh 'bogus' is neither"),
    (["batch", "--model", "./missing", "--input", "req.jsonl", "--output", "out.jsonl"],
     "checkpoint directory './missing' does not exist"),
    # batch: the output
    (BATCH[:-1] + ["req.jsonl"], "output 'req.jsonl' is the requests file 'req.jsonl'"),
    (BATCH[:-1] + ["req_link.jsonl"], "output 'req_link.jsonl' is the requests file 'req.jsonl'"),
    (BATCH[:-1] + ["adir"], "output 'adir' is a directory; give a file path"),
    (BATCH[:-1] + ["loop_a"], "output 'loop_a' is a symlink loop"),
    (BATCH[:-1] + ["file.txt/out.jsonl"], "output 'file.txt/out.jsonl' does not exist (a component of it is a file"),
    (BATCH[:-1] + ["file.txt"], "file.txt:1: results line is not a JSON object with an id"),
    (BATCH[:-1] + ["dup.jsonl"], "dup.jsonl:1: this is a request, not a result"),
    # batch: the requests
    (["batch", "--model", "{tiny}", "--input", "missing.jsonl", "--output", "out.jsonl"],
     "requests file 'missing.jsonl' does not exist"),
    (["batch", "--model", "{tiny}", "--input", "adir", "--output", "out.jsonl"], "requests file 'adir' is a directory"),
    (["batch", "--model", "{tiny}", "--input", "bad_utf8.jsonl", "--output", "out.jsonl"],
     "bad_utf8.jsonl:2: the line is not valid UTF-8 text"),
    (["batch", "--model", "{tiny}", "--input", "bad_json.jsonl", "--output", "out.jsonl"],
     "bad_json.jsonl:1: not valid JSON"),
    (["batch", "--model", "{tiny}", "--input", "typo.jsonl", "--output", "out.jsonl"],
     "typo.jsonl:1: unknown field(s) 'max_tokens'"),
    (["batch", "--model", "{tiny}", "--input", "zero.jsonl", "--output", "out.jsonl"],
     "zero.jsonl:1: 'max_new_tokens' must be an integer >= 1"),
    (["batch", "--model", "{tiny}", "--input", "dup.jsonl", "--output", "out.jsonl"],
     "dup.jsonl:2: id 'a' repeats line 1"),
    (["batch", "--model", "{tiny}", "--input", "empty.jsonl", "--output", "out.jsonl"], "empty.jsonl: no requests"),
    # make-tiny, convert, bench
    (["make-tiny", "{tiny}"], "already exists (an earlier make-tiny output)"),
    (["make-tiny", "out", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["make-tiny", "out", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["make-tiny", "out", "--seed", "-5"], "seed must be a non-negative integer, got -5"),
    (["convert", "./missing", "out", "--no-progress"], "checkpoint directory './missing' does not exist"),
    (["convert", "{tiny}", "out", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["convert", "{tiny}", "{converted}", "--no-progress"], "already exists"),
    (["convert", "ckpt_truncated", "out", "--no-progress"], "cannot read safetensors file ckpt_truncated/"),
    (["convert", "ckpt_garbage_weights", "out", "--no-progress"], "cannot read safetensors file ckpt_garbage_weights/"),
    (["make-tiny", "loop_a"], "refusing to write make-tiny output to loop_a: it is a symlink loop"),
    (["make-tiny", "broken_link"], "refusing to write make-tiny output to broken_link: it is a broken symlink"),
    (["convert", "{tiny}", "loop_a", "--no-progress"], "refusing to write convert output to loop_a: it is a symlink loop"),
    (["convert", "{tiny}", "broken_link", "--no-progress"],
     "refusing to write convert output to broken_link: it is a broken symlink"),
    (["bench", "--script", "nope.py"], "benchmark script 'nope.py' not found"),
]


@pytest.mark.parametrize("argv, expected", ERROR_WALK, ids=lambda v: " ".join(v)[:70] if isinstance(v, list) else None)
def test_every_bad_input_is_one_error_line(capsys, monkeypatch, bad_inputs, tiny_dir, converted_dir, argv, expected):
    """Each subcommand x each kind of bad argument or input: exit status 2, exactly one line ``error: ...`` that
    says what is wrong, no traceback, no "internal error", and nothing written (no output file, no new file)."""
    monkeypatch.chdir(bad_inputs)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi \xff\n")))
    before = sorted(p.name for p in bad_inputs.iterdir())
    argv = [a.format(tiny=tiny_dir, converted=converted_dir) for a in argv]
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own exit
        status = exit_.code
    out, err = capsys.readouterr()
    lines = visible_lines(err)
    assert status == cli.EXIT_ERROR, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err and "internal error" not in err and out == ""
    assert sorted(p.name for p in bad_inputs.iterdir()) == before


def test_subprocess_error_has_no_traceback(workdir, cli_env):
    result = ov_jax("generate", "--model", "./missing-dir", "--prompt", "hi", cwd=workdir, env=cli_env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: checkpoint directory './missing-dir' does not exist"


def help_text(capsys, command) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_one_set_of_defaults_shown_in_help(capsys):
    """generate, compare, batch and make-tiny default to float32 (the README's advice on CPU), and --help says so."""
    for command in ("generate", "compare", "batch", "make-tiny"):
        parser = cli.build_parser(command)
        args = parser.parse_known_args([command, "--model", "m", "--prompt", "x", "--input", "i", "--output", "o",
                                        "OUT"])[0]
        assert args.dtype == "float32", command
    batch = help_text(capsys, "batch")
    for shown in ("(default: float32)", "--batch-size BATCH_SIZE requests per generate call (default: 8)",
                  "(default: 128)", "frames sampled per video (default: 8)"):
        assert shown in batch
    assert "--max-new-tokens MAX_NEW_TOKENS answer length limit in tokens (default: 128)" in help_text(capsys,
                                                                                                      "generate")
    assert "--seed SEED weights seed (default: 0)" in help_text(capsys, "make-tiny")


def test_console_script_points_at_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ov-jax": "ov_jax.cli:main"}
    assert cli.SAMPLE_IMAGE.stat().st_size < 100_000 and cli.SAMPLE_VIDEO.stat().st_size < 100_000
