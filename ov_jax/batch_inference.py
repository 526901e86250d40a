"""Batch inference over a dataset: a jsonl of requests in, a jsonl of answers out, resumable.

Input, one JSON object per line::

    {"id": "q1", "prompt": "What is in the image?", "images": ["a.jpg"], "max_new_tokens": 64}
    {"id": "q2", "prompt": "Describe the clip.", "video": "clip.mp4"}
    {"id": "q3", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}

``id`` defaults to the line number (give explicit ids if the input file may change between runs). Output,
one line per request: ``{"id": ..., "answer": ...}`` (plus whatever else the inference function returns),
or ``{"id": ..., "error": "..."}`` when that request failed on its own.

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

Record = dict[str, Any]
InferFn = Callable[[list[Record]], Sequence[Any]]


class RequestFileError(ValueError):
    """The requests jsonl cannot be processed (bad JSON, duplicate ids...); the message names the line."""


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


def _id_key(value: Any) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay distinct and any JSON scalar works."""
    return json.dumps(value, sort_keys=True)


def read_requests(path: str | os.PathLike) -> list[Record]:
    """All requests of a jsonl file, each with an ``id`` (default: its 0-based line number)."""
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RequestFileError(f"{path}:{number + 1}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise RequestFileError(f"{path}:{number + 1}: a request must be a JSON object, got {type(record).__name__}")
            record.setdefault("id", number)
            key = _id_key(record["id"])
            if key in seen:
                raise RequestFileError(f"{path}:{number + 1}: id {record['id']!r} repeats line {seen[key]}; ids must be "
                                       "unique for resuming to know what is done")
            seen[key] = number + 1
            records.append(record)
    return records


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut a partial last line (a write interrupted by a crash); returns the number of bytes removed."""
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
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return size - keep
    except FileNotFoundError:
        return 0


def finished_ids(path: str | os.PathLike, *, retry_errors: bool = False) -> set[str]:
    """Id keys already in a results file (errors count as done unless ``retry_errors``)."""
    done: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    result = json.loads(line)
                    key = _id_key(result["id"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise RequestFileError(f"{path}:{number + 1}: results line is not a JSON object with an id "
                                           f"({type(err).__name__}); fix or remove it to resume") from None
                if retry_errors and "error" in result:
                    continue
                done.add(key)
    except FileNotFoundError:
        pass
    return done


class ResultWriter:
    """Appends one JSON line per result: one ``os.write`` of the whole line, then ``fsync``."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

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


def _pending(records: list[Record], results_path: str | os.PathLike, retry_errors: bool) -> list[Record]:
    """Requests not yet answered; decided on process 0 and broadcast so every host runs the same batches."""
    done_mask = np.zeros(len(records), np.bool_)
    if distributed.is_writer():
        repair_torn_tail(results_path)
        done = finished_ids(results_path, retry_errors=retry_errors)
        done_mask = np.array([_id_key(r["id"]) in done for r in records], np.bool_)
    done_mask = distributed.broadcast_from_writer(done_mask)
    return [r for r, done in zip(records, done_mask) if not done]


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

    ``requests`` is a jsonl path or already-read records (each with an ``id``). ``on_error``: "record" writes
    a failing request as an error line and goes on; "raise" stops (a restart then retries that batch).
    ``retry_errors`` re-runs requests whose earlier result was an error.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    start = time.perf_counter()
    records = read_requests(requests) if isinstance(requests, (str, os.PathLike)) else list(requests)
    pending = _pending(records, results_path, retry_errors)
    answered = failed = 0
    writer = ResultWriter(results_path) if distributed.is_writer() else None
    bar = None
    if progress and writer is not None:
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
    parser.add_argument("--output", required=True, help="answers jsonl; an existing file is resumed")
    parser.add_argument("--mesh", help="device mesh: 'data=2,tensor=4', a preset (72b-tp8...) or a .json file")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled per video (default 8)")
    parser.add_argument("--media-root", help="directory relative media paths resolve against (default: the input's)")
    parser.add_argument("--retry-errors", action="store_true", help="re-run requests whose result was an error")
    parser.add_argument("--coordinator", help="multi-host: host:port of process 0 (or OV_JAX_COORDINATOR)")
    parser.add_argument("--num-processes", type=int, help="multi-host: process count (or OV_JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="multi-host: this process (or OV_JAX_PROCESS_ID)")


def run_from_args(args) -> BatchSummary:
    """Start multi-host if asked, load processor and model onto the mesh, answer the dataset."""
    distributed.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from ov_jax.model import LlavaOnevision
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.from_pretrained(args.model)
    model = LlavaOnevision.from_pretrained(args.model, dtype=args.dtype, mesh=args.mesh)
    media_root = args.media_root or os.path.dirname(os.path.abspath(args.input))
    infer = make_generate_fn(model, processor, max_new_tokens=args.max_new_tokens, num_frames=args.num_frames,
                             media_root=media_root)
    return run_batch_inference(args.input, args.output, infer, batch_size=args.batch_size,
                               retry_errors=args.retry_errors, progress=True)


if __name__ == "__main__":
    import argparse

    cli = argparse.ArgumentParser(prog="python -m ov_jax.batch_inference", description=__doc__.split("\n")[0])
    add_arguments(cli)
    print(run_from_args(cli.parse_args()))
