"""Video decoding, frame sampling and per-frame preprocessing for LLaVA-OneVision.

Frames are PyAV's, as transformers' default reader returns them. decord decodes the files on which its
frames are bit-identical to PyAV's (:func:`decord_matches_pyav`: not odd heights with 4:2:0 chroma), and
PyAV takes over when decord is not installed, cannot open the file (e.g. AV1), crashes, or hangs. decord's ``get_batch`` can spin forever in native code holding the
GIL (dmlc/decord #373, #375): a watchdog thread could neither run nor stop it, so decord runs in a
worker process (a ``subprocess`` running a small script: no ``multiprocessing`` bootstrapping, no
``__main__`` guard needed, no jax imported there) that is SIGKILLed when it misses the deadline.
Idle workers are reused. PyAV decodes in-process. Sampling follows transformers'
``default_sample_indices_fn``; frames are resized with PIL (as the original LLaVA-OneVision did) and
normalized as transformers' video processor does. docs/VIDEO.md has the design notes and numbers.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import logging
import math
import numbers
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

import numpy as np
from PIL import Image

from ov_jax.processing.media import MediaError, check_local_file

logger = logging.getLogger(__name__)

BACKENDS = ("decord", "pyav")


@dataclasses.dataclass
class VideoMetadata:
    """What was decoded; field names match transformers' ``VideoMetadata`` so either side can read it."""

    total_num_frames: int
    fps: float | None  # frame rate of the file (None for frame arrays)
    duration: float | None  # seconds (None for frame arrays)
    frames_indices: np.ndarray  # indices of the returned frames in the source
    video_backend: str  # "decord", "pyav" or "frames" (arrays / PIL images given directly)
    height: int
    width: int


# ----------------------------------------------------------------------------------------------
# Sampling


def _check_sampling_request(num_frames, fps) -> None:
    if num_frames is not None and fps is not None:
        raise ValueError("`num_frames` and `fps` are mutually exclusive, please use only one!")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral)):
        raise TypeError(f"num_frames must be an integer, got {num_frames!r}")
    if num_frames is not None and num_frames <= 0:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")


def sample_frame_indices(total_frames, *, num_frames=None, fps=None, video_fps=None) -> np.ndarray:
    """Indices of the frames to keep, exactly as transformers' ``default_sample_indices_fn``.

    ``num_frames``: ``arange(n) * total // n``. ``fps``: ``n = max(1, int(total / video_fps * fps))``,
    then the same. Neither: every frame. Asking for more frames than the video has is an error.
    """
    _check_sampling_request(num_frames, fps)
    if isinstance(total_frames, bool) or not isinstance(total_frames, numbers.Integral):
        raise TypeError(f"total_frames must be an integer, got {total_frames!r}")
    if total_frames <= 0:
        raise ValueError(f"the video has no frames (total_frames={total_frames})")
    total_frames = int(total_frames)
    if fps is not None:
        if video_fps is None or not (math.isfinite(video_fps) and video_fps > 0):
            raise ValueError(f"sampling at fps={fps} needs the video's own frame rate, got video_fps={video_fps!r}")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_frames, dtype=np.int64)
    if num_frames > total_frames:
        raise ValueError(f"asked for {num_frames} frames but the video has only total_frames={total_frames}")
    return np.arange(num_frames, dtype=np.int64) * total_frames // num_frames


# ----------------------------------------------------------------------------------------------
# Frames given directly


def _frame_to_rgb_uint8(frame, position: int) -> np.ndarray:
    """One frame (PIL image or HWC/HW uint8 array) as a contiguous uint8 [H, W, 3] RGB array."""
    if isinstance(frame, Image.Image):
        if frame.mode in ("RGBA", "LA", "PA") or "transparency" in frame.info:
            rgba = frame.convert("RGBA")
            frame = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(frame.convert("RGB"))
    array = np.asarray(frame)
    if array.dtype != np.uint8:
        raise TypeError(f"frame {position}: expected uint8 pixels, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frame {position}: expected a channels-last [H, W, C] image (C = 1, 3, 4), got {array.shape}")
    if array.shape[-1] == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=-1))
    if array.shape[-1] == 4:  # composite on white, like transformers' convert_to_rgb
        alpha = array[..., 3:].astype(np.float64) / 255.0
        array = np.round((1.0 - alpha) * 255.0 + alpha * array[..., :3]).astype(np.uint8)
    return np.ascontiguousarray(array)


def _as_rgb_frames(frames) -> np.ndarray:
    """Frame arrays, lists of arrays or lists of PIL images as uint8 [F, H, W, 3]."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8:
        if len(frames):  # the common case, already in shape
            return np.ascontiguousarray(frames)
    if isinstance(frames, np.ndarray):
        if frames.ndim not in (3, 4):
            raise ValueError(f"expected frames shaped [F, H, W, C] (or [F, H, W]), got shape {frames.shape}")
        frames = list(frames)
    elif not isinstance(frames, (list, tuple)):
        raise TypeError(f"a video must be a file path, a uint8 array [F, H, W, 3] or a list of PIL images / arrays, "
                        f"got {type(frames).__name__}")
    if len(frames) == 0:
        raise ValueError("the video has no frames (empty frame list)")
    converted = [_frame_to_rgb_uint8(frame, position) for position, frame in enumerate(frames)]
    shapes = {frame.shape for frame in converted}
    if len(shapes) > 1:
        raise ValueError(f"all frames of a video must have the same size, got {sorted(shapes)}")
    return np.stack(converted)


# ----------------------------------------------------------------------------------------------
# decord in a worker process

_DECORD_WORKER_SOURCE = r'''
import os, pickle, struct, sys
if sys.platform.startswith("linux"):  # die with the parent even while hung in native code
    import ctypes, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        sys.exit(0)  # the parent died before prctl
requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # whatever native code prints goes to stderr, never into the replies

def send(message, payload=b""):
    data = pickle.dumps(message)
    replies.write(struct.pack("<Q", len(data)) + data)
    replies.write(payload)
    replies.flush()

def receive():
    head = requests.read(8)
    if len(head) < 8:
        sys.exit(0)  # the parent went away
    return pickle.loads(requests.read(struct.unpack("<Q", head)[0]))

try:
    import numpy as np
    from decord import VideoReader, cpu
except Exception as error:
    send(("error", f"cannot import decord: {error!r}"))
    sys.exit(0)
send(("ready", None))
while True:
    try:
        reader = VideoReader(receive(), ctx=cpu(0))
        send(("opened", (len(reader), float(reader.get_avg_fps()))))
    except Exception as error:
        send(("error", f"decord cannot open the file: {error!r}"))
        continue
    indices = receive()  # None: the parent does not want frames after all
    try:
        if indices is not None:
            frames = np.ascontiguousarray(reader.get_batch(indices).asnumpy(), dtype=np.uint8)
            send(("frames", frames.shape), memoryview(frames).cast("B"))
            del frames
    except Exception as error:
        send(("error", f"decord cannot read frames {indices[:8]}...: {error!r}"))
    del reader
'''


class DecordUnusable(RuntimeError):
    """decord could not decode this file (missing, unreadable, crashed or timed out)."""


class _DecordWorker:
    """One decord worker process, spoken to with length-prefixed pickles over its stdin/stdout."""

    def __init__(self):
        command = [sys.executable, "-c", _DECORD_WORKER_SOURCE, str(os.getpid())]
        # Its own process group: Ctrl-C at a terminal interrupts the parent only (which then kills the worker),
        # so the worker never prints a KeyboardInterrupt traceback of its own.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, process_group=0)
        self.ready = False

    def send(self, message) -> None:
        data = pickle.dumps(message)
        try:
            self.process.stdin.write(struct.pack("<Q", len(data)) + data)
            self.process.stdin.flush()
        except OSError as error:
            raise DecordUnusable(f"decord worker is gone ({error!r})") from error

    def _read_into(self, buffer: memoryview, deadline: float | None) -> None:
        """Fill ``buffer`` from the worker's stdout, giving up at ``deadline`` (monotonic seconds)."""
        descriptor = self.process.stdout.fileno()
        filled = 0
        while filled < len(buffer):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and (remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]):
                raise TimeoutError("decord did not answer in time")
            count = os.readv(descriptor, [buffer[filled:]])
            if count == 0:
                raise DecordUnusable(f"decord worker exited unexpectedly (exit code {self.process.wait()})")
            filled += count

    def receive(self, deadline: float | None):
        """The next ``(kind, value)`` reply; frames come back as a uint8 array read straight off the pipe."""
        head = bytearray(8)
        self._read_into(memoryview(head), deadline)
        body = bytearray(struct.unpack("<Q", head)[0])
        self._read_into(memoryview(body), deadline)
        kind, value = pickle.loads(body)
        if kind == "error":
            raise DecordUnusable(value)
        if kind == "frames":
            frames = np.empty(value, dtype=np.uint8)
            self._read_into(memoryview(frames).cast("B"), deadline)
            return kind, frames
        return kind, value

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        with contextlib.suppress(OSError):  # unflushed bytes to a dead process
            self.process.stdin.close()
        self.process.stdout.close()


_idle_workers: list[_DecordWorker] = []
_idle_workers_lock = threading.Lock()
_MAX_IDLE_WORKERS = 4


def _take_worker() -> _DecordWorker:
    with _idle_workers_lock:
        while _idle_workers:
            worker = _idle_workers.pop()
            if worker.process.poll() is None:
                return worker
            worker.kill()
    try:
        return _DecordWorker()
    except OSError as error:
        raise DecordUnusable(f"cannot start a decord worker process: {error!r}") from error


def _return_worker(worker: _DecordWorker) -> None:
    with _idle_workers_lock:
        if len(_idle_workers) < _MAX_IDLE_WORKERS:
            _idle_workers.append(worker)
            return
    worker.kill()


@atexit.register
def shutdown_decord_workers() -> None:
    """Stop the idle decord worker processes (new ones start on demand)."""
    with _idle_workers_lock:
        workers = list(_idle_workers)
        _idle_workers.clear()
    for worker in workers:
        worker.kill()


def _decord_installed() -> bool:
    try:
        return importlib.util.find_spec("decord") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["decord"] is None (import blocked)
        return False


def _load_with_decord(path: str, num_frames, fps, timeout_s) -> tuple[np.ndarray, VideoMetadata]:
    """Decode with decord in a worker process; DecordUnusable when it fails or misses the deadline."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    worker = _take_worker()
    try:
        if not worker.ready:
            worker.receive(deadline)
            worker.ready = True
        worker.send(path)
        _, (total_frames, video_fps) = worker.receive(deadline)
        try:
            if total_frames <= 0:
                raise DecordUnusable("decord found no frames")
            indices = _file_frame_indices(path, total_frames, num_frames=num_frames, fps=fps, video_fps=video_fps)
        except (DecordUnusable, ValueError):
            worker.send(None)  # tell the worker not to read
            raise
        worker.send(indices.tolist())
        _, frames = worker.receive(deadline)
    except (DecordUnusable, ValueError):
        if worker.ready and worker.process.poll() is None:
            _return_worker(worker)  # decord refused this file or the request was invalid; the worker is fine
        else:
            worker.kill()
        raise
    except BaseException as error:  # timeout, interrupt, protocol failure: the worker's state is unknown
        worker.kill()
        if isinstance(error, TimeoutError):
            raise DecordUnusable(f"decord took longer than timeout_s={timeout_s}") from error
        raise
    _return_worker(worker)
    return frames, _file_metadata(frames, total_frames, video_fps, indices, "decord")


def _file_frame_indices(path: str, total_frames: int, **sampling) -> np.ndarray:
    """:func:`sample_frame_indices` for a file: its ``ValueError`` (e.g. more frames asked than the file holds)
    names the video."""
    try:
        return sample_frame_indices(total_frames, **sampling)
    except ValueError as error:
        raise ValueError(f"video {path!r}: {error}") from None


def _file_metadata(frames, total_frames, video_fps, indices, backend) -> VideoMetadata:
    duration = total_frames / video_fps if video_fps else 0.0  # as transformers' readers
    height, width = frames.shape[1:3]
    return VideoMetadata(int(total_frames), video_fps, duration, indices, backend, int(height), int(width))


# ----------------------------------------------------------------------------------------------
# PyAV


def _import_pyav():
    """``import av``, with a Ctrl-C that arrives meanwhile held back until the import is done.

    Importing PyAV (about 60 modules, on the first decode) runs Python code where CPython cannot raise: the
    import machinery's weakref callbacks (``_get_module_lock``) and extension module initialization. A SIGINT
    handled there is lost (printed as "Exception ignored ... KeyboardInterrupt", or dropped) and the decode
    carries on as if no Ctrl-C had come. In the main thread the signal is recorded instead and raised again,
    to whatever handler was installed, once the import is done.
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if "av" in sys.modules or not callable(previous):  # already imported, another thread, or no Python handler
        import av

        return av
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        import av
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
    return av


def _open_with_pyav(path: str):
    av = _import_pyav()
    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise MediaError(f"cannot read video {path!r}: {error}") from error
    if not container.streams.video:
        container.close()
        raise MediaError(f"video {path!r} has no video stream")
    return container


def check_video_file(path: str | os.PathLike) -> str:
    """``path`` as a string if it is a readable file PyAV opens with a video stream; else a
    :class:`~ov_jax.processing.media.MediaError` naming it (missing, a directory, a symlink loop, no video...)."""
    path = check_local_file(path, "video")
    _open_with_pyav(path).close()
    return path


def decord_matches_pyav(path: str) -> bool:
    """Whether decord's frames of this file are bit-identical to PyAV's (and so to transformers').

    Measured (docs/VIDEO.md): equal for 8-bit streams of even height and for 8-bit streams whose chroma has
    full height (4:4:4); on odd heights with vertically subsampled chroma (4:2:0, MPEG-4 / H.264 / VP9 / MJPEG)
    decord's colour conversion differs by up to 77 uint8 levels (dmlc/decord #108). Anything else (more than
    8 bits, odd layouts) is not known to match and counts as different.
    """
    with _open_with_pyav(path) as container:
        video_format = container.streams.video[0].codec_context.format
    if video_format is None or not video_format.components:
        return False
    planes = [c for c in video_format.components if not c.is_alpha]
    if any(c.bits != 8 for c in video_format.components):
        return False
    return video_format.height % 2 == 0 or all(c.height == video_format.height for c in planes)


def _decode_selected_with_pyav(path: str, indices: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Decode from the start, keeping the frames at ``indices``; also returns how many frames were decoded."""
    av = _import_pyav()
    wanted = set(indices.tolist())
    last_wanted = int(indices.max())
    picked = {}
    decoded = 0
    with _open_with_pyav(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    picked[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > last_wanted:
                    break
        except av.error.FFmpegError as error:
            raise ValueError(f"cannot decode video {path!r} after frame {decoded}: {error}") from error
    return [picked[index] for index in indices.tolist() if index in picked], decoded


def _load_with_pyav(path: str, num_frames, fps) -> tuple[np.ndarray, VideoMetadata]:
    """Decode with PyAV. The frame count is the stream header's, or the packet count when the header
    has none (webm/mkv); if the file holds fewer decodable frames than announced, sample again from
    the true count (the file kind that makes decord hang)."""
    with _open_with_pyav(path) as container:
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate) if stream.average_rate else None
        total_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    if total_frames <= 0:
        raise ValueError(f"{path!r} has no video frames")
    indices = _file_frame_indices(path, total_frames, num_frames=num_frames, fps=fps, video_fps=video_fps)
    frames, decoded = _decode_selected_with_pyav(path, indices)
    if len(frames) < len(indices):
        if decoded == 0:
            raise ValueError(f"{path!r} has no decodable video frames")
        logger.warning("%s announces %d frames but %d decode; sampling from those", path, total_frames, decoded)
        total_frames = decoded
        indices = _file_frame_indices(path, total_frames, num_frames=num_frames, fps=fps, video_fps=video_fps)
        frames, _ = _decode_selected_with_pyav(path, indices)
    frames = np.stack(frames)
    return frames, _file_metadata(frames, total_frames, video_fps, indices, "pyav")


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_video(source, *, num_frames=None, fps=None, backend=None, timeout_s=60.0) -> tuple[np.ndarray, VideoMetadata]:
    """Frames of a video as uint8 RGB ``[F, H, W, 3]`` plus metadata.

    ``source``: a file path, or the frames themselves (uint8 array ``[F, H, W, 3]``, list of PIL
    images or of HWC arrays). ``num_frames`` / ``fps`` pick frames as transformers does; neither
    keeps them all. ``backend``: None (PyAV's frames, as transformers' default reader: decoded by decord where
    :func:`decord_matches_pyav`, falling back to PyAV), "decord" (decord only, whatever its colours) or "pyav".
    ``timeout_s`` bounds the decord attempt (None: no bound).
    """
    _check_sampling_request(num_frames, fps)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if timeout_s is not None and not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    if not isinstance(source, (str, os.PathLike)):
        if fps is not None:
            raise ValueError("frames given directly carry no frame rate, so fps sampling is impossible: use num_frames")
        all_frames = _as_rgb_frames(source)
        indices = sample_frame_indices(len(all_frames), num_frames=num_frames)
        frames = all_frames[indices] if num_frames is not None else all_frames
        height, width = frames.shape[1:3]
        return frames, VideoMetadata(len(all_frames), None, None, indices, "frames", height, width)
    path = os.fspath(source)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"video URLs are not supported, download the file first: {path!r}")
    check_local_file(path, "video")
    if backend is None and _decord_installed() and not decord_matches_pyav(path):
        backend = "pyav"  # decord's frames of this file would differ from the reference's
    if backend in (None, "decord"):
        if _decord_installed():
            try:
                return _load_with_decord(path, num_frames, fps, timeout_s)
            except DecordUnusable as error:
                if backend == "decord":
                    raise
                logger.warning("decord could not decode %s (%s); decoding with PyAV", path, error)
        elif backend == "decord":
            raise ImportError("backend='decord' was asked for but decord is not installed")
    return _load_with_pyav(path, num_frames, fps)


def _resample_filter(resample) -> Image.Resampling:
    """A PIL filter from its name ("bicubic") or its code (3, as in preprocessor_config.json)."""
    with contextlib.suppress(KeyError, ValueError, TypeError):
        if isinstance(resample, str):
            return Image.Resampling[resample.upper()]
        if isinstance(resample, numbers.Integral) and not isinstance(resample, bool):
            return Image.Resampling(int(resample))
    names = sorted(member.name.lower() for member in Image.Resampling)
    raise ValueError(f"resample must be one of {names} or a PIL filter code 0-5, got {resample!r}")


def _per_channel(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, 3)
    if array.size != 3 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be one number or three finite numbers, got {values!r}")
    return array


def preprocess_video_frames(frames, *, size=384, image_mean, image_std, rescale_factor=1 / 255, resample="bicubic"):
    """Frames -> float32 ``[F, 3, height, width]`` model input.

    Each frame is resized straight to ``size`` (an int, ``(height, width)`` or a dict; no aspect
    preservation) with PIL (bicubic by default, as the original LLaVA-OneVision did), then
    normalized as transformers' video processor does: ``(x - mean/rescale_factor) / (std/rescale_factor)``
    in float32 (mean and std scaled in float32).
    """
    if isinstance(size, Mapping):  # {"height": 384, "width": 384}, as in the processor configs
        size = (size["height"], size["width"])
    height, width = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    filter_ = _resample_filter(resample)
    if not (isinstance(rescale_factor, numbers.Real) and rescale_factor > 0):
        raise ValueError(f"rescale_factor must be positive, got {rescale_factor!r}")
    scale = np.float32(1.0 / rescale_factor)
    mean = _per_channel(image_mean, "image_mean") * scale
    std = _per_channel(image_std, "image_std") * scale
    if np.any(std == 0):
        raise ValueError(f"image_std must not contain zeros, got {image_std!r}")
    frames = _as_rgb_frames(frames)
    if frames.shape[1:3] != (height, width):
        frames = np.stack([np.asarray(Image.fromarray(frame).resize((width, height), filter_)) for frame in frames])
    pixels = frames.transpose(0, 3, 1, 2).astype(np.float32)
    return (pixels - mean[:, None, None]) / std[:, None, None]
