"""Batch inference over a dataset: a jsonl of requests in, a jsonl of answers out, resumable.

Input, one JSON object per line::

    {"id": "q1", "prompt": "What is in the image?", "images": ["a.jpg"], "max_new_tokens": 64}
    {"id": "q2", "prompt": "Describe the clip.", "video": "clip.mp4"}
    {"id": "q3", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}

``id`` defaults to the line number (give explicit ids if the input file may change between runs). The whole
file is checked before anything runs (``ov_jax.batch_requests``: UTF-8, one JSON object per line, known
fields of the right types, unique ids); an error names ``file:line``. Output, one line per request:
``{"id": ..., "answer": ...}`` (plus whatever else the inference function returns), or ``{"id": ...,
"error": "..."}`` when that request failed on its own. The output is never the requests file, a directory
or a file that is not a results file (:func:`check_output_path`, :func:`finished_ids`).

Each result line is written with a single ``write`` and ``fsync``ed before the next, so after a crash or a
kill the file holds whole lines plus at most one torn last line. A restart drops the torn tail, skips every
id already answered and processes the rest: nothing is redone, nothing is lost. In a multi-host job every
process runs the same batches (the model is one SPMD program over all hosts); process 0 alone reads and
writes the output file and broadcasts which requests are done.

The per-batch work is an injectable ``infer(records) -> results`` function; :func:`make_generate_fn` builds
the real one from a model and a processor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ov_jax import distributed
from ov_jax.batch_requests import Record, RequestFileError, check_records, id_key, is_integer, read_requests
from ov_jax.paths import MISSING, check_directory, check_file, decode_utf8, path_problem

InferFn = Callable[[list[Record]], Sequence[Any]]


class OutputFileError(OSError):
    """The results path cannot be written or resumed (a directory, the requests file itself, not writable...)."""


@dataclasses.dataclass
class BatchSummary:
    total: int
    already_done: int
    answered: int
    failed: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.total} requests: {self.already_done} already done, {self.answered} answered, "
                f"{self.failed} failed in {self.seconds:.1f} s")


RESULT_PREFIX = b'{"id":'  # every results line starts so: the writer puts the id first


def _check_torn_tail(path: str | os.PathLike, tail: bytes) -> None:
    """A torn tail must look like the start of one of our lines (``{"id": ...``); anything else means the file
    is not a results file, and nothing in it may be cut."""
    if tail and not (tail.startswith(RESULT_PREFIX) or RESULT_PREFIX.startswith(tail)):
        raise RequestFileError(f"{path}: its last line is not a results line (no final newline, and it does not "
                               "start with '{\"id\":'); not a results file of this tool? Nothing was changed")


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut a partial last line (a write interrupted by a crash); returns the number of bytes removed.

    Only a tail that starts like a results line (``{"id":``) is cut; anything else is a
    :class:`RequestFileError` and the file is left as it is.
    """
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            keep, position, block = 0, size, 1 << 16
            while position > 0:  # scan backwards for the last newline
                start = max(0, position - block)
                f.seek(start)
                chunk = f.read(position - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    break
                position = start
            f.seek(keep)
            _check_torn_tail(path, f.read(size - keep))
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return size - keep
    except FileNotFoundError:
        return 0


def finished_ids(path: str | os.PathLike, *, retry_errors: bool = False) -> set[str]:
    """Id keys already in a results file (errors count as done unless ``retry_errors``). Read only: a torn
    last line (see :func:`repair_torn_tail`) is not done; any other line that is not a UTF-8 JSON object with
    an ``id``, or that is a request (``prompt`` / ``messages`` without ``answer`` / ``error``), is a
    :class:`RequestFileError` naming ``file:line``."""
    done: set[str] = set()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return done
    with f:
        for number, data in enumerate(f):
            if not data.endswith(b"\n"):
                _check_torn_tail(path, data)
                break
            if not data.strip():
                continue
            try:
                result = json.loads(decode_utf8(data, "the line"))
                key = id_key(result["id"])
            except (ValueError, KeyError, TypeError) as err:
                raise RequestFileError(f"{path}:{number + 1}: results line is not a JSON object with an id "
                                       f"({type(err).__name__}); fix or remove it to resume") from None
            if {"prompt", "messages"} & result.keys() and not {"answer", "error"} & result.keys():
                raise RequestFileError(f"{path}:{number + 1}: this is a request, not a result (it has a prompt or "
                                       "messages and no answer or error); is the output another requests file? "
                                       "Nothing was changed")
            if retry_errors and "error" in result:
                continue
            done.add(key)
    return done


def check_output_path(results_path: str | os.PathLike, requests_path: str | os.PathLike | None = None) -> None:
    """An :class:`OutputFileError` when ``results_path`` cannot be the results file: a directory, a special file,
    the requests file itself (also through a symlink or a hard link), a symlink loop or broken symlink, not
    writable, or missing under a directory that cannot be created."""
    path = os.fspath(results_path)
    problem = path_problem(path)
    if problem is None:
        if os.path.isdir(path):
            raise OutputFileError(f"output {path!r} is a directory; give a file path, e.g. "
                                  f"{os.path.join(path, 'answers.jsonl')!r}")
        if not os.path.isfile(path):
            raise OutputFileError(f"output {path!r} is not a regular file")
        if requests_path is not None and os.path.samefile(path, requests_path):
            raise OutputFileError(f"output {path!r} is the requests file {os.fspath(requests_path)!r}; the answers "
                                  "must go to another file")
        if not os.access(path, os.W_OK):
            raise OutputFileError(f"output {path!r} is not writable (permission denied)")
        return
    if problem != MISSING:
        raise OutputFileError(f"output {path!r} {problem}")
    parent = os.path.dirname(os.path.abspath(path))
    while path_problem(parent) == MISSING:  # directories that will be created: the first existing one decides
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFileError(f"output {path!r} cannot be created: {parent!r} is not a writable directory")


class ResultWriter:
    """Appends one JSON line per result: one ``os.write`` of the whole line, then ``fsync``."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_tail(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputFileError(f"output {os.fspath(path)!r} cannot be written: {err.strerror or err}") from None

    def write(self, result: Record) -> None:
        data = (json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # short writes only happen on a full disk or a signal; finish the line
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pending(records: list[Record], results_path: str | os.PathLike, retry_errors: bool,
             requests_path: str | os.PathLike | None = None) -> list[Record]:
    """Requests not yet answered. Process 0 checks the output (:func:`check_output_path`, :func:`finished_ids`)
    and broadcasts what is done, or that it refused the output, so every host runs the same batches or stops."""
    flags = np.zeros(len(records) + 1, np.bool_)  # done per request, then "process 0 refused the output"
    refusal = None
    if distributed.is_writer():
        try:
            check_output_path(results_path, requests_path)
            done = finished_ids(results_path, retry_errors=retry_errors)
            flags[:-1] = [id_key(r["id"]) in done for r in records]
        except (OSError, ValueError) as err:
            refusal, flags[-1] = err, True
    flags = distributed.broadcast_from_writer(flags)
    if refusal is not None:
        raise refusal
    if flags[-1]:
        raise OutputFileError(f"process 0 refused the output {os.fspath(results_path)!r} (its error says why)")
    return [r for r, done in zip(records, flags[:-1]) if not done]


def _as_result(record: Record, output: Any) -> Record:
    if isinstance(output, dict):
        return {"id": record["id"], **{k: v for k, v in output.items() if k != "id"}}
    return {"id": record["id"], "answer": output}


def _error_result(record: Record, err: BaseException) -> Record:
    return {"id": record["id"], "error": f"{type(err).__name__}: {err}"}


def _infer_batch(infer: InferFn, batch: list[Record], on_error: str) -> list[Record]:
    """Results for one batch; with ``on_error="record"`` a failing batch is retried request by request."""
    try:
        outputs = list(infer(batch))
        if len(outputs) != len(batch):
            raise RuntimeError(f"the inference function returned {len(outputs)} results for {len(batch)} requests")
        return [_as_result(r, o) for r, o in zip(batch, outputs)]
    except Exception as err:
        if on_error == "raise":
            raise
        if len(batch) == 1:
            return [_error_result(batch[0], err)]
    return [_infer_batch(infer, [r], on_error)[0] for r in batch]


def run_batch_inference(requests: str | os.PathLike | Iterable[Record], results_path: str | os.PathLike,
                        infer: InferFn, *, batch_size: int = 8, on_error: str = "record",
                        retry_errors: bool = False, progress: bool = False) -> BatchSummary:
    """Answer every request not yet in ``results_path``, ``batch_size`` at a time, appending results as they come.

    ``requests`` is a jsonl path (read with :func:`read_requests`) or already-read records (each with an
    ``id``; checked with :func:`check_records`). ``on_error``: "record" writes a failing request as an error
    line and goes on; "raise" stops (a restart then retries that batch). ``retry_errors`` re-runs requests
    whose earlier result was an error. Every argument, every request and the output path
    (:func:`check_output_path`; never the requests file) are checked before the first request runs: a bad one
    is a ``ValueError`` / ``OSError`` and nothing is written.
    """
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    start = time.perf_counter()
    from_file = isinstance(requests, (str, os.PathLike))
    records = read_requests(requests) if from_file else check_records(requests)
    pending = _pending(records, results_path, retry_errors, requests if from_file else None)
    answered = failed = 0
    writer = ResultWriter(results_path) if distributed.is_writer() and pending else None
    bar = None
    if progress and distributed.is_writer():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), initial=len(records) - len(pending), unit="req", desc="batch inference")
    try:
        for first in range(0, len(pending), batch_size):
            results = _infer_batch(infer, pending[first:first + batch_size], on_error)
            for result in results:
                failed += "error" in result
                answered += "error" not in result
                if writer is not None:
                    writer.write(result)
            if bar is not None:
                bar.update(len(results))
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    return BatchSummary(len(records), len(records) - len(pending), answered, failed, time.perf_counter() - start)


# --- the real per-batch work: processor + model.generate ------------------------------------------------------


def request_conversation(record: Record, media_root: str | os.PathLike | None = None) -> list[Record]:
    """The chat conversation of a request: its ``messages``, or one user turn built from ``prompt``,
    ``images`` / ``image`` and ``videos`` / ``video`` (relative paths resolve against ``media_root``; URLs and
    base64 images are kept as they are, for the processor's image loader)."""
    from ov_jax.processing.media import resolve_image_source

    if "messages" in record:
        return record["messages"]
    if not isinstance(record.get("prompt"), str):
        raise ValueError(f"request {record.get('id')!r} has neither 'messages' nor a string 'prompt'")

    def paths(plural: str, singular: str) -> list[str]:
        value = record.get(plural, record.get(singular, []))
        items = [value] if isinstance(value, str) else list(value)
        return [resolve_image_source(str(p), media_root) for p in items]

    content = [{"type": "image", "path": p} for p in paths("images", "image")]
    content += [{"type": "video", "path": p} for p in paths("videos", "video")]
    content.append({"type": "text", "text": record["prompt"]})
    return [{"role": "user", "content": content}]


def make_generate_fn(model: Any, processor: Any, *, max_new_tokens: int = 128, num_frames: int | None = None,
                     media_root: str | os.PathLike | None = None, **generate_kwargs: Any) -> InferFn:
    """``infer(records)`` that renders the chat template, runs ``model.generate`` on the whole batch and
    decodes the new tokens. A request's own ``max_new_tokens`` caps its answer (the batch runs to the largest).

    Stop / pad ids and the sampling values not in ``generate_kwargs`` come from ``model.generation_config``
    (`ov_jax.generation`); a bad value in ``generate_kwargs`` raises here, before any request runs.
    """
    from ov_jax.generation import generation_overrides

    model.generation_config.merged(max_new_tokens=max_new_tokens, **generation_overrides(generate_kwargs))

    def infer(records: list[Record]) -> list[str]:
        conversations = [request_conversation(r, media_root) for r in records]
        frames = {"num_frames": num_frames} if num_frames is not None else {}
        inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, **frames)
        limits = [int(r.get("max_new_tokens", max_new_tokens)) for r in records]
        tokens = np.asarray(model.generate(**inputs, max_new_tokens=max(limits), **generate_kwargs))
        return processor.batch_decode([row[:limit] for row, limit in zip(tokens.tolist(), limits)],
                                      skip_special_tokens=True)

    return infer


def add_arguments(parser) -> None:
    """Flags of the batch command (shared by ``python -m ov_jax.batch_inference`` and the CLI)."""
    parser.add_argument("--model", required=True, help="checkpoint directory, converted directory or hub id")
    parser.add_argument("--input", required=True, help="requests jsonl (id, prompt / messages, images, video)")
    parser.add_argument("--output", required=True,
                        help="answers jsonl; an existing one is resumed (never the --input file)")
    parser.add_argument("--mesh", help="device mesh: 'data=2,tensor=4', a preset (72b-tp8...) or a .json file")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (bfloat16 halves the memory; on CPUs without bf16 units it is slow)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="answer length limit in tokens (a request's own max_new_tokens overrides it)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled per video")
    parser.add_argument("--media-root", help="directory relative media paths resolve against (default: the input's)")
    parser.add_argument("--retry-errors", action="store_true", help="re-run requests whose result was an error")
    distributed.add_arguments(parser)


def check_arguments(args) -> None:
    """A ``ValueError`` / ``OSError`` for the first batch flag that cannot work (numbers, input, media root)."""
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--num-frames", args.num_frames)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    check_file(args.input, "requests file")
    if args.media_root is not None:
        check_directory(args.media_root, "--media-root")


def run_from_args(args) -> BatchSummary:
    """Check the flags, the requests and the output; start multi-host if asked; load processor and model onto
    the mesh (only when some request is still to answer); answer the dataset."""
    check_arguments(args)
    records = read_requests(args.input)
    distributed.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if not _pending(records, args.output, args.retry_errors, args.input):
        return BatchSummary(len(records), len(records), 0, 0, 0.0)
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.from_pretrained(args.model)
    model = LlavaOnevision.from_pretrained(args.model, dtype=args.dtype, mesh=args.mesh)
    media_root = args.media_root or os.path.dirname(os.path.abspath(args.input))
    infer = make_generate_fn(model, processor, max_new_tokens=args.max_new_tokens, num_frames=args.num_frames,
                             media_root=media_root)
    return run_batch_inference(records, args.output, infer, batch_size=args.batch_size,
                               retry_errors=args.retry_errors, progress=True)


if __name__ == "__main__":
    import argparse

    import sys

    cli = argparse.ArgumentParser(prog="python -m ov_jax.batch_inference", description=__doc__.split("\n")[0])
    add_arguments(cli)
    try:
        print(run_from_args(cli.parse_args()))
    except (ValueError, OSError) as err:  # bad input: one line, as `ov-jax batch` reports it
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
