"""The ``ov-jax`` command: make a tiny checkpoint, convert, generate, cross-check against PyTorch, benchmark.

    ov-jax make-tiny OUT
    ov-jax convert SRC DST [--dtype bfloat16] [--quantize int8|int4 [--group-size N] [--int8-weights v,o|none]]
    ov-jax generate --model M [--image P ...] [--video P --num-frames N] (--prompt TEXT | --prompt-file PATH) [...]
    ov-jax compare --model M [--image P ...] [--video P] [--prompt TEXT] [--dtype D] [--tolerance X]
    ov-jax batch --model M --input requests.jsonl --output answers.jsonl [--mesh ...]
    ov-jax finetune --model M --data train.jsonl --output RUN [--lora-rank R] [--steps N ...] [--resume]
    ov-jax export RUN OUT [--overwrite]
    ov-jax bench [-- benchmark options ...]

Every bad input, a bad flag included, ends in one line ``error: ...`` on stderr and exit status 2 (set
``OV_JAX_TRACEBACK=1`` to see the traceback instead); ``compare`` exits 1 when a stage is over its tolerance.
Heavy imports (jax, torch) happen inside the subcommands, so ``ov-jax --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Sequence

from ov_jax.paths import read_prompt

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2
ASSETS = pathlib.Path(__file__).parent / "assets"
SAMPLE_IMAGE = ASSETS / "sample.jpg"
SAMPLE_VIDEO = ASSETS / "sample.mp4"
BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A command-line value that cannot work (reported as one line, like every other bad input)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] \
                or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error: ...`` line (exit 2) like every other bad input, and every
    option's help shows its default."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------- inputs


def load_images(sources: Sequence[str]) -> list:
    """Load every image now (paths, http(s) URLs or base64, as the processor reads them), so a bad one fails
    before any model is loaded."""
    from ov_jax.processing.media import load_image

    return [load_image(source) for source in sources]


def check_video(path: str) -> str:
    """``path`` if PyAV can open it as a video: a broken file fails here, in one line, before the decoders
    (which print their own native errors) ever see it."""
    from ov_jax.processing.video import check_video_file

    return check_video_file(path)


# ----------------------------------------------------------------------------------------- make-tiny


def run_make_tiny(args: argparse.Namespace) -> int:
    from ov_jax.tiny import make_tiny

    out = make_tiny(args.out, seed=args.seed, tie_word_embeddings=args.tied, dtype=args.dtype,
                    overwrite=args.overwrite)
    print(f"wrote a tiny random-weight LLaVA-OneVision checkpoint to {out} (transformers layout, {args.dtype}"
          f"{', tied embeddings' if args.tied else ''}); its answers are random text")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- convert


def run_convert(args: argparse.Namespace) -> int:
    from convert.convert_checkpoint import run

    return EXIT_OK if run(args) == 0 else EXIT_ERROR


# ------------------------------------------------------------------------------------------ generate


def _steps_bar(total: int, desc: str):
    """A tqdm bar over a few named steps (the current one shown as its postfix); it clears itself when closed,
    so an error raised while it runs is still the only line left on the terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False,
                bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")


def _check_generate_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_frames < 1:
        raise UsageError(f"--num-frames must be >= 1, got {args.num_frames}")
    from ov_jax.generation import GenerationConfig

    overrides = sampling_overrides(args)
    GenerationConfig().merged(**overrides)  # a bad value is named before anything loads
    _check_filters_apply(args, overrides["do_sample"])
    if args.video is not None:
        check_video(args.video)
    args.prompt = read_prompt(args.prompt, args.prompt_file)


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``generate`` keywords from the sampling flags; unset flags stay ``None`` (the checkpoint's defaults).
    ``--temperature 0`` means greedy, a positive temperature samples with it."""
    greedy = args.temperature == 0
    return {"do_sample": None if args.temperature is None else not greedy,
            "temperature": None if greedy else args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def _check_filters_apply(args: argparse.Namespace, do_sample: bool | None) -> None:
    """``--top-k`` / ``--top-p`` only filter sampled tokens: refuse them on a greedy run (``None``: not known yet,
    the checkpoint's generation config decides)."""
    given = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k)) if value is not None]
    if given and do_sample is False:
        raise UsageError(f"{' and '.join(given)} only filter sampled tokens, and this run is greedy (--temperature 0 "
                         "or the checkpoint's generation config): add --temperature T (T > 0) to sample")


def run_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    images = load_images(args.image)
    from ov_jax.sharding import make_mesh

    mesh = None if args.mesh is None else make_mesh(args.mesh)
    from ov_jax.hub import resolve_checkpoint

    model_dir = resolve_checkpoint(args.model)

    from ov_jax.model import LlavaOnevision
    from ov_jax.processing.chat import single_turn
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    with _steps_bar(3, "loading") as bar:
        bar.set_postfix_str("tokenizer and processor")
        processor = LlavaOnevisionProcessor.from_pretrained(model_dir)
        bar.update()
        bar.set_postfix_str("images and video")
        frames = {"num_frames": args.num_frames} if args.video is not None else {}
        inputs = processor.apply_chat_template(single_turn(args.prompt, images, args.video),
                                               add_generation_prompt=True, tokenize=True, return_dict=True, **frames)
        bar.update()
        bar.set_postfix_str(f"weights ({args.dtype}{'' if mesh is None else ', mesh ' + args.mesh})")
        model = LlavaOnevision.from_pretrained(model_dir, dtype=args.dtype, mesh=mesh)
        bar.update()
        bar.set_postfix_str("done")

    from ov_jax.engine import engine_for
    from ov_jax.engine.streaming import TextStreamer

    overrides = sampling_overrides(args)
    generation = model.generation_config.merged(max_new_tokens=args.max_new_tokens, **overrides)
    _check_filters_apply(args, generation.do_sample)
    prompt_length = inputs["input_ids"].shape[1]
    engine_for(model).warmup_request(inputs["input_ids"], args.max_new_tokens,
                                     media="pixel_values" in inputs or "pixel_values_videos" in inputs,
                                     allow_beyond_max_positions=args.allow_beyond_max_positions)

    streamer = TextStreamer(processor, generation.eos_token_id)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=args.max_new_tokens, seed=args.seed, streamer=streamer,
                   allow_beyond_max_positions=args.allow_beyond_max_positions, **overrides)
    elapsed = time.perf_counter() - start
    first = (streamer.first_token_time or start) - start
    decode = f"{(streamer.count - 1) / (elapsed - first):.1f}" if streamer.count > 1 and elapsed > first else "n/a"
    print(f"[{streamer.count} tokens in {elapsed:.2f} s: {decode} tokens/s decode, first token after "
          f"{first:.2f} s; prompt {prompt_length} tokens]", flush=True)
    return EXIT_OK


# ------------------------------------------------------------------------------------------- compare


def run_compare(args: argparse.Namespace) -> int:
    from ov_jax import compare

    if args.video is not None:
        check_video(args.video)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.tolerance is not None and not args.tolerance > 0:
        raise UsageError(f"--tolerance must be > 0, got {args.tolerance}")
    result = compare.compare(
        args.model, jax_model=args.jax_model, images=load_images(args.image), video=args.video,
        prompt=read_prompt(args.prompt, args.prompt_file),
        num_frames=args.num_frames, dtype=args.dtype, tolerance=args.tolerance, max_new_tokens=args.max_new_tokens)
    print(result.table(), flush=True)
    return EXIT_OK if result.passed else EXIT_MISMATCH


# --------------------------------------------------------------------------------------------- batch


def run_batch(args: argparse.Namespace) -> int:
    """Resumable batch inference over a jsonl (`ov_jax.batch_inference`), multi-host when asked."""
    from ov_jax.batch_inference import check_arguments, run_from_args

    check_arguments(args)
    if args.mesh is not None and not args.coordinator and not os.environ.get("OV_JAX_COORDINATOR"):
        from ov_jax.sharding import make_mesh

        make_mesh(args.mesh)  # a bad mesh is reported before the model loads
    print(run_from_args(args), flush=True)
    return EXIT_OK


# ------------------------------------------------------------------------------------ finetune / export


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune into a run directory (`ov_jax.train.runs.finetune`); flags left out keep their defaults (or,
    with --resume, the run's saved settings)."""
    from ov_jax.train.runs import RunConfig, finetune, run_settings

    given = {name: value for name, value in vars(args).items()
             if name in RunConfig.__dataclass_fields__ and value is not None}
    config = run_settings(args.output, resume=args.resume, **given)
    result = finetune(args.output, config, resume=args.resume, overwrite=args.overwrite)
    last = result.metrics[-1] if result.metrics else None
    summary = f"step {last['step']}, loss {last['loss']:.4f}" if last else "nothing left to run"
    print(f"{result.directory}: {summary}; export it with: ov-jax export {args.output} OUT", flush=True)
    return EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    from ov_jax.train.runs import export

    out = export(args.run, args.out, overwrite=args.overwrite)
    print(f"wrote a transformers checkpoint to {out}", flush=True)
    return EXIT_OK


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``finetune`` flags; every setting defaults to None here, so only the flags given reach the library."""
    parser.add_argument("--model", help="base checkpoint directory, converted directory or hub id")
    parser.add_argument("--data", help="training jsonl: one {\"messages\": [...]} conversation per line")
    parser.add_argument("--output", required=True, metavar="RUN", help="run directory (checkpoints, metrics)")
    parser.add_argument("--media-root", help="folder relative media paths start from (default: the jsonl's)")
    parser.add_argument("--freeze", help="comma-separated presets (vision_tower, projector, language_model, "
                                         "image_newline) or regexes over params paths")
    parser.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the weights")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha: updates scaled by alpha / rank (default 16)")
    parser.add_argument("--lora-targets", metavar="REGEX",
                        help="weights that get adapters: comma-separated presets (language_model, projector, "
                             "vision_tower) or regexes over weight paths such as text\\.layers\\.(q|v) "
                             "(default language_model)")
    parser.add_argument("--lora-dropout", type=float, help="dropout on the adapters' inputs (default 0)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    parser.add_argument("--batch-size", type=int, help="rows per micro-batch (default 1)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    parser.add_argument("--learning-rate", type=float, help="peak AdamW learning rate (default 1e-5)")
    parser.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay (default 0)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    parser.add_argument("--max-length", type=int, help="tokens per row, vision tokens included (default 4096); "
                                                       "longer samples are skipped and reported")
    parser.add_argument("--num-frames", type=int, help="frames sampled per video (default 8)")
    parser.add_argument("--packing", action="store_const", const=True,
                        help="pack several samples into each row (segment ids)")
    parser.add_argument("--mesh", help="device mesh, e.g. fsdp=4,tensor=2, a preset name or a mesh .json file")
    parser.add_argument("--dtype", dest="compute_dtype", choices=DTYPES,
                        help="compute dtype (params stay float32; default float32)")
    parser.add_argument("--attention", help="attention backend: auto, xla, cpu, cudnn (GPU, bfloat16 / float16) or "
                                            "splash (TPU) (default auto: cpu on CPU, cudnn or xla on GPU, splash on TPU)")
    parser.add_argument("--remat", help="activation checkpointing for both layer scans: none, full, dots_saveable "
                                        "or dots_with_no_batch_dims_saveable (default none; full fits a float32 "
                                        "0.5B full fine-tune in ~16 GB)")
    parser.add_argument("--seed", type=int, help="data order and RNG seed (default 0)")
    parser.add_argument("--save-every", type=int, help="checkpoint interval in steps (default 50)")
    parser.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")


# --------------------------------------------------------------------------------------------- bench


def run_bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    script = BENCHMARKS / args.script
    if not script.is_file():
        available = sorted(p.name for p in BENCHMARKS.glob("*.py")) if BENCHMARKS.is_dir() else []
        where = f"available: {', '.join(available)}" if available else (
            f"{BENCHMARKS} is missing: the benchmarks ship with the source checkout, not the installed package")
        raise UsageError(f"benchmark script {args.script!r} not found ({where})")
    command = [sys.executable, str(script), *extra]
    print("running: " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command, cwd=BENCHMARKS.parent)


# ---------------------------------------------------------------------------------------------- main


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` (the subcommand about to run) lets heavy subcommands add their flags."""
    parser = ArgumentParser(prog="ov-jax", description="LLaVA-OneVision in JAX/Flax: command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("make-tiny", help="write a small random-weight checkpoint (offline)",
                               description="Write a small random-weight LLaVA-OneVision checkpoint in the transformers "
                                           "layout, with a real tokenizer, processor configs and chat template.")
    tiny.add_argument("out", metavar="OUT", help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed")
    tiny.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (as the 0.5B)")
    tiny.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype in the file")
    tiny.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier make-tiny output")

    from convert.convert_checkpoint import add_arguments

    add_arguments(commands.add_parser(
        "convert", help="convert a checkpoint to an ov_jax (orbax) directory that loads faster",
        description="Convert a LLaVA-OneVision safetensors checkpoint (directory or hub id) into an ov_jax orbax "
                    "directory; streaming and atomic."))

    gen = commands.add_parser("generate", help="answer a prompt about images / a video, streaming tokens",
                              description="Load a checkpoint, warm up the buckets this request needs, and stream the "
                                          "answer to stdout; the last line reports tokens/s.")
    gen.add_argument("--model", required=True, help="checkpoint directory, converted directory or hub id")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image file, http(s) URL or base64 data; repeat for several images (multi-image mode)")
    gen.add_argument("--video", metavar="PATH", help="a video file")
    gen.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (default 8)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the user's question")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="read the question from a UTF-8 file ('-' = stdin; one final newline is dropped), for "
                             "prompts longer than a command line allows")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit in tokens")
    gen.add_argument("--temperature", type=float,
                     help="0 = greedy, > 0 samples (default: the checkpoint's generation_config.json, else greedy)")
    gen.add_argument("--top-p", type=float,
                     help="nucleus filter when sampling, 1 = off (default: the checkpoint's, else 1)")
    gen.add_argument("--top-k", type=int,
                     help="top-k filter when sampling, 0 = off (default: the checkpoint's, else 50 as transformers)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--allow-beyond-max-positions", action="store_true",
                     help="run even when prompt + --max-new-tokens exceeds the model's max_position_embeddings")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    gen.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4, a preset name or a mesh .json file")

    cmp = commands.add_parser("compare", help="cross-check against transformers (PyTorch), stage by stage",
                              description="Load the same checkpoint in transformers and ov_jax, run the same inputs "
                                          "and print max abs / max rel diff and top-1 agreement per stage. Exit 1 when "
                                          "a stage is over the tolerance. Needs torch and transformers.")
    cmp.add_argument("--model", required=True, help="transformers checkpoint directory or hub id")
    cmp.add_argument("--jax-model", help="load the ov_jax side from here instead (e.g. the converted copy of --model)")
    cmp.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeatable")
    cmp.add_argument("--video", metavar="PATH",
                     help="a video file (decoded and preprocessed by ov_jax for both models)")
    cmp.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (default 8)")
    cmp_prompt = cmp.add_mutually_exclusive_group()
    cmp_prompt.add_argument("--prompt", help="the user's question (default: a generic describe prompt)")
    cmp_prompt.add_argument("--prompt-file", metavar="PATH", help="read the question from a UTF-8 file ('-' = stdin)")
    cmp.add_argument("--dtype", choices=DTYPES, default="float32", help="both models' dtype (default float32)")
    cmp.add_argument("--tolerance", type=float, help="max abs diff allowed per stage (default: per dtype, see table)")
    cmp.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens compared (default 8; 0 skips)")

    batch = commands.add_parser(
        "batch", help="answer a jsonl of requests, resumable; multi-host on a pod",
        description="Batch inference: a jsonl of prompts with image/video paths in, a jsonl of answers out, written "
                    "incrementally so a restart resumes where it stopped.")
    if command == "batch":  # its flags live in ov_jax.batch_inference, which imports jax: only when asked
        from ov_jax.batch_inference import add_arguments as add_batch_arguments

        add_batch_arguments(batch)

    srv = commands.add_parser("serve", help="an OpenAI-compatible chat server with continuous batching",
                              description="Serve POST /v1/chat/completions (text, image_url, video_url, streaming), "
                                          "GET /v1/models, /health and /metrics on FastAPI + uvicorn. Multi-host: "
                                          "run the same command on every host with --coordinator, --num-processes "
                                          "and --process-id; process 0 serves, the others follow its steps.")
    srv.add_argument("--model", required=True, help="checkpoint directory, converted directory or hub id")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--max-batch-size", type=_positive, default=8, help="rows decoded together (default 8)")
    srv.add_argument("--max-queue", type=_positive, default=64,
                     help="requests waiting beyond the running ones; more are answered 429 (default 64)")
    srv.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    srv.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4, a preset name or a mesh .json file")
    srv.add_argument("--cache-length", type=_positive, default=4096,
                     help="KV slots per row: prompt (padded to its bucket) + answer must fit (default 4096)")
    srv.add_argument("--prompt-buckets", type=_bucket_list, default=(64, 128, 256, 512, 1024, 2048, 3072),
                     help="comma-separated prompt lengths compiled for (those up to --cache-length are used)")
    srv.add_argument("--decode-steps", type=_positive, default=8,
                     help="decode steps per device call: where rows join and leave (default 8)")
    srv.add_argument("--feature-cache-mb", type=int, default=256,
                     help="vision-feature cache size in MiB (0 = off; default 256)")
    srv.add_argument("--allow-local-media", action="store_true",
                     help="accept local file paths as image_url / video_url (off: only http(s) and data URIs)")
    srv.add_argument("--no-warmup", dest="warmup", action="store_false",
                     help="compile on first use instead of before serving")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds running requests may finish after SIGINT/SIGTERM before they are cancelled")
    srv.add_argument("--served-model-name", help="the model id clients use (default: the --model folder's name)")
    if command == "serve":  # the multi-host flags live in ov_jax.distributed, which imports jax: only when asked
        from ov_jax.distributed import add_arguments as add_distributed_arguments

        add_distributed_arguments(srv)
    add_finetune_arguments(commands.add_parser(
        "finetune", help="fine-tune on a chat jsonl (resumable runs)",
        description="Fine-tune a checkpoint on a jsonl of conversations: labels on the assistant turns, vision "
                    "tokens counted in --max-length, orbax checkpoints every --save-every steps, metrics.jsonl; "
                    "--resume continues a stopped run with the same losses."))
    export = commands.add_parser("export", help="write a fine-tuning run as a transformers checkpoint",
                                 description="Write the latest checkpoint of a fine-tuning run as a checkpoint that "
                                             "transformers' from_pretrained loads (base model's tokenizer and "
                                             "processor files included).")
    export.add_argument("run", metavar="RUN", help="run directory written by ov-jax finetune")
    export.add_argument("out", metavar="OUT", help="output directory (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")

    bench = commands.add_parser("bench", help="run the engine benchmarks (source checkout only)",
                                description="Run a script from the repository's benchmarks/ folder with this Python; "
                                            "further arguments are passed to it (e.g. ov-jax bench -- --help).")
    bench.add_argument("--script", default="bench_engine.py",
                       help="benchmark script in benchmarks/ (default bench_engine.py: the engine vs transformers)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _bucket_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}") from None


def run_serve(args: argparse.Namespace) -> int:
    from ov_jax.serve.app import ServeOptions, serve

    serve(ServeOptions(model=args.model, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                       max_queue=args.max_queue, dtype=args.dtype, mesh=args.mesh, cache_length=args.cache_length,
                       prompt_buckets=args.prompt_buckets, decode_steps=args.decode_steps,
                       feature_cache_mb=args.feature_cache_mb, allow_local_media=args.allow_local_media,
                       warmup=args.warmup, shutdown_timeout=args.shutdown_timeout,
                       served_name=args.served_model_name, coordinator=args.coordinator,
                       num_processes=args.num_processes, process_id=args.process_id))
    return EXIT_OK


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra[:1] == ["--"]:
        extra = extra[1:]
    runners = {"make-tiny": run_make_tiny, "convert": run_convert, "generate": run_generate, "compare": run_compare,
               "batch": run_batch, "finetune": run_finetune, "export": run_export, "serve": run_serve}
    try:
        if args.command == "bench":
            return run_bench(args, extra)
        return runners[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, NotImplementedError) as err:  # bad input: config, files, mesh, media
        if os.environ.get("OV_JAX_TRACEBACK"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # a bug: still one line, with the way to see more
        if os.environ.get("OV_JAX_TRACEBACK"):
            raise
        print(f"error: internal error ({type(err).__name__}: {_one_line(err)}); set OV_JAX_TRACEBACK=1 to see "
              "the traceback", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
